"""The one exception type a user can cause: its message is a single line saying what is wrong and what fixes it."""


class UserError(Exception):
    """A problem with what the user typed or supplied; the CLI prints it as one line and exits 2."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (raised from a config's __post_init__)."""
