"""Output folders: refusing or claiming --out, the resume diff from field metadata, atomic file and folder writes."""

import json

import pytest

from mclip.store import outputs


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    outputs.write_json(target, {"a": 1})
    outputs.write_json(target, {"b": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"b": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert target.stat().st_mode & 0o777 == outputs.FILE_MODE


def test_contents_skip_the_lock_and_refuse_a_file(tmp_path):
    from mclip.errors import UserError
    from mclip.store.lock import LOCK_NAME

    assert outputs.contents(tmp_path / "missing") == []
    (tmp_path / LOCK_NAME).write_text("{}")
    assert outputs.contents(tmp_path) == []
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a").mkdir()
    assert outputs.contents(tmp_path) == ["a", "b.txt"]
    with pytest.raises(UserError, match=f"--out {tmp_path / 'b.txt'} is a file; choose a folder"):
        outputs.contents(tmp_path / "b.txt")


def test_check_refuses_a_non_empty_folder_and_foreign_files_and_changes_nothing(tmp_path):
    from mclip.errors import UserError

    out = tmp_path / "out"
    assert outputs.check(out, reuse=False) == [] and not out.exists()
    out.mkdir()
    (out / "report.md").write_text("old")
    with pytest.raises(
        UserError,
        match=r"is not empty; choose an empty folder, or pass --overwrite to replace a previous eval's files$",
    ):
        outputs.check(out, reuse=False, command="eval")
    with pytest.raises(UserError, match=r"is not empty; pass --resume$"):
        outputs.check(out, reuse=False, refusal="; pass --resume")
    assert outputs.check(out, reuse=True, owned=lambda name: name == "report.md", command="eval") == ["report.md"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files eval did not write \(notes.txt\); choose another folder"):
        outputs.check(out, reuse=True, owned=lambda name: name == "report.md", command="eval")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.md"]


def test_claim_makes_the_folder_and_removes_only_the_previous_runs_files(tmp_path):
    out = tmp_path / "a" / "out"
    outputs.claim(out, [], "rerun")
    assert out.is_dir()
    (out / "old.arrow").write_bytes(b"x")
    (out / "old").mkdir()
    (out / "old" / "f").write_text("y")
    (out / "keep.txt").write_text("mine")
    outputs.claim(out, [out / "old.arrow", out / "old", out / "never-written"], "rerun")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_changed_names_what_a_resume_must_repeat_and_ignores_runtime_fields():
    import dataclasses

    from mclip.config import TrainConfig, request

    made = TrainConfig(data="d", cache="c", out="o", lr=1e-3, epochs=2)
    saved = request(made)
    assert (
        outputs.changed(saved, dataclasses.replace(made, out="elsewhere", num_workers=0, save_every=5, resume=True))
        == []
    )
    assert outputs.changed(saved, dataclasses.replace(made, lr=2e-3, epochs=3)) == [
        "epochs: 2 -> 3",
        "lr: 0.001 -> 0.002",
    ]  # field order
    assert (
        outputs.changed({**saved, "student_layers": [1, 2]}, made, student_layers=[1, 2]) == []
    )  # a default resolved again
    assert outputs.changed({}, made)[0] == "student: None -> 'xlm-roberta-base'"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    outputs.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with outputs.atomic_file(target) as tmp, open(tmp, "wb") as handle:
            handle.write(b'{"half": ')
            raise RuntimeError("disk gone")
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_write_folder_swaps_a_whole_folder_in_and_keeps_the_old_one_on_failure(tmp_path):
    final, tmp = tmp_path / "final", tmp_path / ".final.tmp"

    def fill(version):
        def write(folder):
            folder.mkdir()
            (folder / "weights").write_text(version)
            if version == "broken":
                raise OSError(28, "No space left on device")

        return write

    outputs.write_folder(final, tmp, fill("v1"), "rerun")
    outputs.write_folder(final, tmp, fill("v2"), "rerun")
    assert (final / "weights").read_text() == "v2"
    from mclip.errors import UserError

    with pytest.raises(UserError, match=f"no space left on device writing {final}; free space and rerun"):
        outputs.write_folder(final, tmp, fill("broken"), "rerun")
    assert (final / "weights").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["final"]


def test_file_sha256_is_sha256_of_the_bytes(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(b"\0" * (5 << 20) + b"tail")  # more than one read block
    assert outputs.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
