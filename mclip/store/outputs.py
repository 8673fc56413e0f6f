"""Output folders, the rules every stage shares: claim or refuse --out, its lock, atomic file and folder writes, checksums,
and which settings a resumed run may change.

A stage checks its --out read-only first (`check`), loads and checks its inputs, and only then makes the folder its own
(`claim`), so a refused run leaves nothing behind. Every file appears whole or not at all: written to a temp file in the
same folder, fsynced, renamed (`atomic_file`); a folder of files the same way (`write_folder`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mclip.config import request
from mclip.errors import UserError, writing
from mclip.store import lock

META = "mclip.json"  # the marker of an mclip model folder (a student, a checkpoint or an export): what it is and how it loads


def hold(folder: str | Path, command: str, ctx=None):
    """Hold --out for the block: a second run on it is refused with who holds it (see `mclip.store.lock`)."""
    return lock.hold(folder, command, ctx)


# ---- claim or refuse ----


def contents(out: Path) -> list[str]:
    """The names in --out besides the lock, sorted (none when it does not exist); refuses a file. Read-only."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    return sorted(p.name for p in out.iterdir() if not lock.is_lock(p.name)) if out.is_dir() else []


def check(
    out: Path, reuse: bool, refusal: str | None = None, owned: Callable[[str], bool] | None = None, command: str = ""
) -> list[str]:
    """Refuse a non-empty --out unless `reuse` (the user's --resume or --overwrite, or the stage's own output there);
    `refusal` ends the line after "--out OUT is not empty" (default: choose an empty folder or --overwrite). With `owned`,
    a reused folder may hold only the files `owned(name)` claims: --overwrite replaces a previous `command`'s own files
    and nothing else. Read-only; returns `contents(out)`."""
    present = contents(out)
    if present and not reuse:
        refusal = refusal or f"; choose an empty folder, or pass --overwrite to replace a previous {command}'s files"
        raise UserError(f"--out {out} is not empty{refusal}")
    foreign = [name for name in present if owned is not None and not owned(name)]
    if foreign:
        raise UserError(
            f"--out {out} holds files {command} did not write ({', '.join(foreign[:5])}); "
            "choose another folder (--overwrite only replaces a previous run's own files)"
        )
    return present


def claim(out: Path, previous: Iterable[Path], then: str) -> None:
    """Make --out this run's: create it and remove `previous`, the files and folders an earlier run of the same stage
    wrote there (never anything else). Called only once every input has been checked; `then`: what to do after a failed
    write (see `errors.writing`)."""
    with writing(out, then):
        Path(out).mkdir(parents=True, exist_ok=True)
    for path in previous:
        with writing(path, then):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def changed(saved: dict, config: Any, **resolved: Any) -> list[str]:
    """`name: old -> new` for each field that decides what the output holds (not `option(runtime=True)`) and differs from
    the `saved` values the output was made with: what a resume or rerun on it refuses. `resolved`: JSON values that stand
    for the config's own (a default the run resolves the same way again, as the saved value was)."""
    now = request(config) | resolved
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]


# ---- atomic writes, checksums ----


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; outputs are meant to be shared


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """A temp file beside `path` (`.NAME.*.tmp`) for the block to write; then fsynced and renamed onto `path`, so a reader
    sees the old file or the new one, never a partial one. A failed block removes the temp file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(payload)


def write_array(target: Any, array: Any) -> None:
    """An array's bytes written to an open binary file (appended where it stands), or to a new file at a path. Never
    `ndarray.tofile`: on a full disk it wrote nothing and raised nothing (its C stream's failed flush goes unchecked),
    while a Python file's write, or its close, raises ENOSPC."""
    import numpy as np

    data = memoryview(np.ascontiguousarray(array)).cast("B")
    if isinstance(target, (str, Path)):
        with open(target, "wb") as handle:
            handle.write(data)
    else:
        target.write(data)


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_folder(final: Path, tmp: Path, fill: Callable[[Path], None], then: str) -> Path:
    """Fill the folder `tmp`, then put it at `final` by renames: an older `final` is moved aside first and deleted last,
    so `final` is whole or absent. A failed fill removes `tmp` and leaves `final` as it was."""
    with writing(final, then):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            fill(tmp)
        except Exception as exc:
            full = None if isinstance(exc, (OSError, UserError)) else disk_full(tmp if tmp.is_dir() else tmp.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            if full is not None:  # torch.save's RuntimeError, safetensors' SafetensorError: a full disk, said so
                raise full from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def disk_full(folder: Path) -> OSError | None:
    """After a library failed a write with an error of its own, naming no errno (torch.save's `RuntimeError: ...
    unexpected pos`, safetensors' `I/O error`): the ENOSPC or EDQUOT a small write in `folder` meets now, or None when
    the disk still takes data (so the failure was something else)."""
    probe = Path(folder) / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"\0" * (1 << 16))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        return exc if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
