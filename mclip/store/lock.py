"""One writer per output folder: a `.mclip.lock` file holding pid, host and start time, guarded by an flock.

The flock, not the file, is the lock: the kernel drops it when the holder dies, even by SIGKILL, so a lock file left by
a killed run is stale and the next run takes it over. Under torchrun only rank 0 takes it (`hold(..., ctx)`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from mclip.errors import UserError, write_error

LOCK_NAME = ".mclip.lock"


def holder(folder: str | Path) -> dict | None:
    """Who holds the lock on `folder` (pid, host, started, command), or None when nobody does. Changes nothing."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        info = None
    return info if isinstance(info, dict) else {}


def describe(info: dict) -> str:
    return (
        f"mclip {info.get('command', '?')} (pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
        f"started {info.get('started', '?')})"
    )


class OutputLock:
    """An exclusive lock on an output folder, created with the folder when missing; `release` removes what it created."""

    def __init__(self, folder: str | Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []  # folders this lock made, outermost first: removed again if still empty

    def acquire(self) -> OutputLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder} is a file; choose a folder")
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.folder, "rerun the same command") from None
        self.created = [p for p in reversed(missing) if p.is_dir()]
        for _ in range(10):  # another run may remove the lock file between our open and our flock: then try again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a finishing run removed the (then empty) folder it had made: make it again
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as exc:
                self._remove_created()
                raise write_error(exc, self.path, "rerun the same command") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise UserError(
                    f"--out {self.folder} is in use by {describe(info)}; wait for it to finish, or choose another --out"
                ) from None
            if _same_file(fd, self.path):
                self.fd = fd
                break
            os.close(fd)
        else:
            raise UserError(
                f"could not lock {self.path}: another run keeps replacing it; wait for it to finish, or choose another --out"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        except OSError as exc:
            self.release()
            raise write_error(exc, self.path, "rerun the same command") from None
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the flock, so nobody takes over a file about to vanish
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        """A refused run leaves no folder behind, so the fixed command can run with the same --out."""
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty

    def __enter__(self) -> OutputLock:
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def hold(folder: str | Path, command: str, ctx=None) -> Iterator[OutputLock | None]:
    """Hold the lock on `folder` for the block; under torchrun (`ctx` from `distributed.setup`) rank 0 holds it and every
    rank raises its refusal."""
    lock, refusal = None, None
    if ctx is None or ctx.is_main:
        try:
            lock = OutputLock(folder, command).acquire()
        except UserError as exc:
            refusal = exc
    if ctx is not None and ctx.enabled:
        from mclip import distributed

        refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        if lock is not None:
            lock.release()
        raise refusal
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def is_lock(name: str) -> bool:
    """Whether a file name in an output folder is the lock (not an output: checks for an empty folder skip it)."""
    return name == LOCK_NAME
