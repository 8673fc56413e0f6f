"""The one exception type a user can cause: its message is a single line saying what is wrong and what fixes it."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A problem with what the user typed or supplied; the CLI prints it as one line and exits 2."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value (raised from a config's __post_init__)."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM ended a command: `kept` says what its output holds now, `flag` the option that
    continues it (None: the same command). Not a KeyboardInterrupt, which typer would turn into a returned exit code."""

    def __init__(self, kept: str, flag: str | None = None):
        super().__init__(kept)
        self.kept, self.flag = kept, flag


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when it has none: how a
    library's error is quoted inside one of mclip's one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def write_error(exc: OSError, path: str | Path, then: str) -> UserError:
    """An OSError met while writing `path` as one line: what failed, where, and what to do (`then`: how to carry on)."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on device writing {path}; free space and {then}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(
            f"permission denied writing {path} ({exc.strerror}); make it writable (or choose another --out) and {then}"
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"cannot write {path}: part of that path is a file, not a folder; choose another --out")
    return UserError(f"cannot write {path} ({exc.strerror or exc}); fix that and {then}")


@contextlib.contextmanager
def writing(path: str | Path, then: str) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a one-line UserError (see `write_error`)."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path, then) from exc
