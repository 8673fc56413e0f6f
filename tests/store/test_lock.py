"""The output-folder lock: a second writer is refused with who holds it, a dead holder's lock is taken over, every verb
locks its --out, and a refused run leaves no folder behind."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mclip.cli import main
from mclip.errors import UserError
from mclip.store import lock

ROOT = Path(__file__).resolve().parents[2]


def test_second_lock_is_refused_with_who_holds_it(tmp_path):
    out = tmp_path / "out"
    with lock.OutputLock(out, "embed-teacher") as first:
        assert first.path == out / ".mclip.lock"  # the name users see in their folders and older runs left
        info = json.loads(first.path.read_text(encoding="utf-8"))
        assert (
            info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["command"] == "embed-teacher"
        )
        assert info["started"].endswith("+00:00")
        # flock belongs to an open file description: a second open in this same process conflicts like another process
        with pytest.raises(
            UserError,
            match=rf"--out {out} is in use by mclip embed-teacher \(pid {os.getpid()} on host "
            rf"{socket.gethostname()}, started .*\); wait for it to finish, or choose another --out",
        ):
            lock.OutputLock(out, "train-student").acquire()
        assert lock.holder(out) == info
    assert lock.holder(out) is None
    assert not out.exists()  # the lock made the folder and nothing else went in: it goes again


def test_release_keeps_a_folder_with_outputs_and_one_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    with lock.OutputLock(out, "encode"):
        (out / "result.txt").write_text("kept")
    assert sorted(p.name for p in out.iterdir()) == ["result.txt"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with lock.OutputLock(existing, "encode"):
        pass
    assert existing.is_dir() and not any(existing.iterdir())


def test_a_stale_lock_file_without_a_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / lock.LOCK_NAME).write_text(
        json.dumps({"pid": 999999, "host": "gone", "command": "embed-teacher"}), encoding="utf-8"
    )
    assert lock.holder(out) is None  # a file is not a lock: nobody holds the flock
    with lock.OutputLock(out, "train-student") as taken:
        assert json.loads(taken.path.read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert not (out / lock.LOCK_NAME).exists()


def test_the_kernel_releases_the_lock_of_a_sigkilled_holder(tmp_path):
    out = tmp_path / "out"
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from mclip.store.lock import OutputLock\n"
        f"OutputLock({str(out)!r}, 'embed-teacher').acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert lock.holder(out)["pid"] == proc.pid
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            lock.OutputLock(out, "embed-teacher").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert (out / lock.LOCK_NAME).exists() and lock.holder(out) is None  # the file stays, the lock does not
    with lock.OutputLock(out, "embed-teacher"):
        assert lock.holder(out)["pid"] == os.getpid()


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; choose a folder"):
        lock.OutputLock(tmp_path / "file", "encode").acquire()


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path):
    from mclip.distributed import Dist

    out = tmp_path / "out"
    with lock.hold(
        out, "embed-teacher", Dist(rank=1, world_size=1)
    ) as held:  # world 1: no process group to broadcast over
        assert held is None and not out.exists()
    with lock.hold(out, "embed-teacher", Dist(rank=0, world_size=1)) as held:
        assert held is not None and lock.holder(out)["pid"] == os.getpid()
    assert not out.exists()


def _argv(verb: str, small_run, out: Path) -> list[str]:
    s = small_run
    return {
        "embed-teacher": [
            "embed-teacher",
            "--data",
            str(s["data"]),
            "--teacher",
            str(s["teacher"]),
            "--id-column",
            "id",
        ],
        "train-student": ["train-student", *s["train_args"]],
        "eval-retrieval": [
            "eval-retrieval",
            "--model",
            str(s["run"]),
            "--cache",
            str(s["cache"]),
            "--data",
            str(s["data"]),
            "--languages",
            "de",
            "--split",
            "train",
        ],
        "encode": ["encode", "--model", str(s["run"]), "--data", str(s["data"]), "--column", "caption_de"],
    }[verb] + ["--out", str(out), "--no-progress"]


@pytest.mark.parametrize("verb", ["embed-teacher", "train-student", "eval-retrieval", "encode"])
def test_every_verb_refuses_an_output_folder_in_use(verb, small_run, tmp_path, capsys):
    out = tmp_path / "out"
    with lock.OutputLock(out, "some-other-run"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(_argv(verb, small_run, out))
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.startswith(f"mclip: error: --out {out} is in use by mclip some-other-run (pid {os.getpid()}")
            and "\n" not in err
        )
        assert sorted(p.name for p in out.iterdir()) == [lock.LOCK_NAME]  # the refused run wrote nothing
    main(_argv(verb, small_run, out))  # free again: the same command runs, and leaves no lock behind
    assert out.is_dir() and not (out / lock.LOCK_NAME).exists() and any(out.iterdir())
