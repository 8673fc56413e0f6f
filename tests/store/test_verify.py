"""Checksums of checkpoint and student folders, and `mclip verify` over caches, runs and final/ folders: one line per
problem, a summary, exit 0/1/2, and nothing changed."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mclip.cli import main
from mclip.store import lock, shards, verify


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: content hash and modification time, to show that nothing changed."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _verify(path, capsys) -> tuple[int, list[str], str]:
    capsys.readouterr()
    with _Exit() as code:
        main(["verify", str(path)])
    captured = capsys.readouterr()
    return code.value, captured.out.strip().splitlines(), captured.err


class _Exit:
    """main() returns on success and raises SystemExit otherwise: both as an exit code."""

    def __enter__(self):
        self.value = 0
        return self

    def __exit__(self, kind, exc, tb):
        if kind is SystemExit:
            self.value = exc.code
            return True
        return False


def test_checksums_list_every_file_and_match_sha256sum(small_run, tmp_path):
    final = small_run["run"] / "final"
    listing = (final / verify.CHECKSUMS).read_text(encoding="utf-8").splitlines()
    files = sorted(
        p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file() and p.name != verify.CHECKSUMS
    )
    assert [line.split("  ", 1)[1] for line in listing] == files
    assert {"model.safetensors", "2_Dense/model.safetensors", "mclip.json", "tokenizer.json"} <= set(files)
    for checkpoint in sorted((small_run["run"] / "checkpoints").iterdir()):
        assert (
            "trainer.pt" in (checkpoint / verify.CHECKSUMS).read_text(encoding="utf-8")
            and verify.check_folder(checkpoint) == []
        )
    if shutil.which("sha256sum"):  # the format is sha256sum's, so the standard tool checks it too
        done = subprocess.run(
            ["sha256sum", "--quiet", "-c", verify.CHECKSUMS], cwd=final, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_check_folder_names_changed_missing_and_added_files(small_run, tmp_path):
    folder = shutil.copytree(small_run["run"] / "final", tmp_path / "final")
    assert verify.check_folder(folder) == []
    flip_byte(folder / "model.safetensors")
    (folder / "tokenizer.json").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    assert verify.check_folder(folder) == [
        f"{folder / 'model.safetensors'}: checksum differs from checksums.sha256 (file corrupted or changed)",
        f"{folder / 'tokenizer.json'}: missing",
        f"{folder / 'pytorch_model.bin'}: not listed in checksums.sha256 (added after the save)",
    ]
    (folder / verify.CHECKSUMS).unlink()
    assert verify.check_folder(folder) == [
        (
            f"{folder / verify.CHECKSUMS}: missing, so {folder} cannot be checked "
            "(it was not written by this mclip, or was changed)"
        )
    ]


@pytest.mark.parametrize("what", ["cache", "run", "final", "checkpoint"])
def test_intact_folders_pass_and_nothing_changes(what, small_run, tmp_path, capsys):
    path = {
        "cache": small_run["cache"],
        "run": small_run["run"],
        "final": small_run["run"] / "final",
        "checkpoint": small_run["run"] / "checkpoints" / "step-0000002",
    }[what]
    before = snapshot(path)
    code, out, err = _verify(path, capsys)
    assert (
        code == 0
        and len(out) == 1
        and out[0].startswith("verify: ")
        and out[0].endswith("file(s) checked)")
        and "intact" in out[0]
    )
    assert err == ""
    assert snapshot(path) == before


def test_damaged_cache_one_line_per_problem_exit_1_nothing_changed(small_run, tmp_path, capsys):
    cache = shutil.copytree(small_run["cache"], tmp_path / "cache")
    flip_byte(cache / "shard-00001.arrow")  # inside the data: only hashing finds it
    (cache / "shard-00003.arrow").unlink()
    shards.open_cache(cache.parent / "cache", check=False)  # still opens without the cheap check
    before = snapshot(cache)
    code, out, _ = _verify(cache, capsys)
    assert code == 1
    assert out == [
        f"{cache / 'shard-00001.arrow'}: checksum differs from manifest.json (file corrupted or changed)",
        f"{cache / 'shard-00003.arrow'}: missing",
        f"verify: teacher cache {cache} has 2 problem(s) (4 file(s) checked)",
    ]
    assert snapshot(cache) == before


def test_damaged_run_names_each_file(small_run, tmp_path, capsys):
    run = shutil.copytree(small_run["run"], tmp_path / "run")
    flip_byte(run / "checkpoints" / "step-0000004" / "trainer.pt")
    (run / "final" / "2_Dense" / "model.safetensors").write_bytes(b"")
    before = snapshot(run)
    code, out, _ = _verify(run, capsys)
    assert code == 1 and out[-1].startswith(f"verify: run folder {run} has 2 problem(s)")
    assert out[:-1] == [
        f"{run / 'checkpoints' / 'step-0000004' / 'trainer.pt'}: checksum differs from checksums.sha256 (file corrupted or changed)",
        f"{run / 'final' / '2_Dense' / 'model.safetensors'}: checksum differs from checksums.sha256 (file corrupted or changed)",
    ]
    assert snapshot(run) == before


def test_incomplete_cache_and_broken_manifest_are_problems_not_errors(small_run, tmp_path, capsys):
    cache = shutil.copytree(small_run["cache"], tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    shards.write_json(cache / "manifest.json", manifest | {"complete": False})
    code, out, _ = _verify(cache, capsys)
    assert (
        code == 1 and "the cache is incomplete" in out[0] and "rerun the same `mclip embed-teacher` command" in out[0]
    )
    (cache / "manifest.json").write_text("{not json", encoding="utf-8")
    code, out, _ = _verify(cache, capsys)
    assert code == 1 and "is not valid JSON" in out[0]


def test_user_errors_exit_2(tmp_path, capsys):
    for path, message in ((tmp_path / "missing", "is not a folder"), (tmp_path, "is not an mclip folder")):
        code, out, err = _verify(path, capsys)
        assert (
            code == 2
            and out == []
            and err.strip().startswith("mclip: error: ")
            and message in err
            and "\n" not in err.strip()
        )


def test_a_folder_in_use_is_noted(small_run, tmp_path, capsys):
    cache = shutil.copytree(small_run["cache"], tmp_path / "cache")
    with lock.OutputLock(cache, "embed-teacher"):
        code, _, err = _verify(cache, capsys)
    assert code == 0 and err.startswith(f"mclip: note: {cache} is being written by mclip embed-teacher (pid ")


def test_a_cache_is_hashed_in_blocks_never_a_whole_shard_in_memory(tmp_path):
    """verify streams: its Python allocations stay within a few 4 MiB hash blocks while each shard is 30 MiB."""
    import tracemalloc

    from tests.store.test_shards import _write_cache

    cache = _write_cache(tmp_path / "cache", sizes=(60_000, 60_000), dim=128)
    assert min(f.stat().st_size for f in cache.files) > 30 * 2**20
    tracemalloc.start()
    try:
        result = verify.run(cache.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.ok and result.checked == 2
    assert peak < 12 * 2**20, f"verify held {peak / 2**20:.1f} MiB at once"
