"""Integrity: sha256 checksums of checkpoint and student folders, and `mclip verify` over a cache, a run or a student.

A checkpoint or an exported student gets `checksums.sha256` (the `sha256sum` format, so `sha256sum -c checksums.sha256`
checks it too) written last, before the folder is renamed into place; a teacher cache keeps its checksums in
manifest.json. Verifying reads every byte and changes nothing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mclip.errors import UserError
from mclip.store import shards
from mclip.store.lock import describe, holder
from mclip.store.outputs import META, atomic_write_bytes, file_sha256

CHECKSUMS = "checksums.sha256"


def write_checksums(folder: Path) -> Path:
    """List the sha256 of every file under `folder` in `folder/checksums.sha256` (written atomically, last)."""
    folder = Path(folder)
    lines = [f"{file_sha256(path)}  {path.relative_to(folder).as_posix()}\n" for path in _files(folder)]
    atomic_write_bytes(folder / CHECKSUMS, "".join(lines).encode("utf-8"))
    return folder / CHECKSUMS


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def check_folder(folder: Path) -> list[str]:
    """Problems of a checkpoint or student folder against its checksums.sha256, one line each; empty when intact."""
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return [f"{listing}: missing, so {folder} cannot be checked (it was not written by this mclip, or was changed)"]
    problems, listed = [], set()
    for number, line in enumerate(listing.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            problems.append(f"{listing}: line {number} is not '<sha256>  <file>'")
            continue
        listed.add(name)
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_sha256(path) != digest:
            problems.append(f"{path}: checksum differs from {CHECKSUMS} (file corrupted or changed)")
    for path in _files(folder):
        if path.relative_to(folder).as_posix() not in listed:
            problems.append(f"{path}: not listed in {CHECKSUMS} (added after the save)")
    return problems


@dataclass
class VerifyResult:
    path: Path
    kind: str  # "teacher cache", "run" or "student"
    problems: list[str]  # one line each; empty when intact
    checked: int  # files read and hashed
    notes: list[str] = field(default_factory=list)  # worth saying, not damage (a run in progress, leftovers of a kill)

    @property
    def ok(self) -> bool:
        return not self.problems


def run(path: str | Path) -> VerifyResult:
    """Check a teacher cache folder, a run folder (every checkpoint and final/) or a student folder, read-only."""

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(
            f"{folder} is not a folder; pass a teacher cache, a train-student run folder or a final/ folder"
        )
    if (folder / shards.MANIFEST).is_file():
        result = _cache(folder)
    elif (folder / META).is_file():
        problems = check_folder(folder)
        result = VerifyResult(folder, "student", problems, len(_files(folder)))
    elif (folder / "checkpoints").is_dir() or (folder / "final").is_dir():
        result = _run_folder(folder)
    else:
        raise UserError(
            f"{folder} is not an mclip folder (no manifest.json, mclip.json, checkpoints/ or final/); pass a teacher "
            "cache, a train-student run folder or a final/ folder"
        )
    info = holder(folder)
    if info is not None:
        result.notes.append(f"{folder} is being written by {describe(info)}; check again when it has finished")
    return result


def _cache(folder: Path) -> VerifyResult:
    try:
        manifest = shards.read_manifest(folder)
    except UserError as exc:
        return VerifyResult(folder, "teacher cache", [str(exc)], 0)
    if not manifest.get("complete"):
        problem = (
            f"{folder / shards.MANIFEST}: the cache is incomplete (its run was interrupted); "
            "rerun the same `mclip embed-teacher` command to finish it"
        )
        return VerifyResult(folder, "teacher cache", [problem], 0)
    cache = shards.TeacherCache(folder, manifest)
    notes = [
        f"{p}: temp file left by a killed run (removed by the next embed-teacher run)"
        for p in sorted(folder.glob(".shard-*.tmp"))
    ]
    return VerifyResult(folder, "teacher cache", cache.verify(), len(cache.files), notes)


def _run_folder(folder: Path) -> VerifyResult:
    problems, notes, checked = [], [], 0
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{config}: missing (a run cannot be resumed without it)")
    except (OSError, ValueError) as exc:
        problems.append(f"{config}: not valid JSON ({exc})")
    students = (
        sorted(p for p in (folder / "checkpoints").glob("step-*") if p.is_dir())
        if (folder / "checkpoints").is_dir()
        else []
    )
    for path in sorted((folder / "checkpoints").glob("*")) if (folder / "checkpoints").is_dir() else []:
        if path.name.startswith(".tmp-"):
            notes.append(f"{path}: an unfinished save left by a killed run (removed by the next run)")
        elif path.name.endswith(".corrupt"):
            notes.append(
                f"{path}: a corrupted checkpoint set aside by a resumed run (delete it when you no longer need it)"
            )
    if (folder / "final").is_dir():
        students.append(folder / "final")
    else:
        notes.append(f"{folder} has no final/ yet (the run has not finished)")
    for student in students:
        problems += check_folder(student)
        checked += len(_files(student))
    return VerifyResult(folder, "run", problems, checked, notes)


def summary(result: VerifyResult) -> str:
    what = {"teacher cache": "teacher cache", "run": "run folder", "student": "student folder"}[result.kind]
    if result.ok:
        return f"verify: {what} {result.path} is intact ({result.checked} file(s) checked)"
    return f"verify: {what} {result.path} has {len(result.problems)} problem(s) ({result.checked} file(s) checked)"


def report(result: VerifyResult) -> int:
    """Print one line per problem and the summary (stdout), notes on stderr; the exit code: 0 intact, 1 problems."""
    for note in result.notes:
        print(f"mclip: note: {note}", file=sys.stderr)
    for problem in result.problems:
        print(problem)
    print(summary(result))
    return 0 if result.ok else 1
