"""User errors: one line; an OSError while writing names the path and what to do; a library's error quoted by its first
line."""

import errno

import pytest

from mclip.errors import ConfigError, UserError, first_line, write_error, writing


def test_first_line_of_an_exception():
    assert first_line(ValueError("  bad value\n  at line 3\n")) == "bad value"
    assert first_line(ValueError("x" * 500), 200) == "x" * 200
    assert (
        first_line(KeyError()) == "KeyError" and first_line(RuntimeError("   ")) == "RuntimeError"
    )  # no message: its type


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, "no space left on device writing out/f; free space and rerun"),
        (errno.EACCES, "permission denied writing out/f"),
        (errno.ENOTDIR, "part of that path is a file, not a folder"),
        (errno.EIO, "cannot write out/f ("),
    ],
)
def test_a_failed_write_is_one_line_naming_the_path_and_the_fix(code, says):
    error = write_error(OSError(code, "boom"), "out/f", "rerun")
    assert isinstance(error, UserError) and says in str(error) and "\n" not in str(error)
    with pytest.raises(UserError, match="out/f"):
        with writing("out/f", "rerun"):
            raise OSError(code, "boom")


def test_a_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)
