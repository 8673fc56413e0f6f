"""Ctrl-C and SIGTERM through the real CLI: a `python -m mclip` process stopped by the signal at a given point exits 130
(SIGINT) or 143 (SIGTERM) with one line saying what was kept and the exact command that continues; that command then
finishes, and nothing written before the signal is lost."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mclip.store import shards, verify
from mclip.train.checkpoint import checkpoints
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts three to four Python processes that import torch


def _start(argv: list[str], err: Path) -> subprocess.Popen:
    """`python -m mclip ARGV` with stderr into `err`; SIGINT as a terminal delivers it (a shell that started the tests
    in the background would have left it ignored, and Python keeps an ignored SIGINT ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mclip", *argv],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=open(err, "w", encoding="utf-8"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _stop_when(proc: subprocess.Popen, ready, sig: int, err: Path) -> tuple[int, list[str]]:
    """Send `sig` once `ready()` holds (the process must still be running then); its exit code and stderr lines."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"ended ({proc.returncode}) before the point to stop it:\n{err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.002)
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=120)
    return code, err.read_text(encoding="utf-8").strip().splitlines()


def _continue(line: str, kept: str, argv: list[str], sig: int, flag: str | None, err: Path) -> None:
    """The line names the signal, what was kept and the command that continues (argv with `flag`); run that command,
    which must finish."""
    name = signal.Signals(sig).name
    command = [a for a in argv if a != "--overwrite" or flag != "--resume"] + ([flag] if flag else [])
    assert line == f"mclip: interrupted by {name}; {kept}; continue with: {shlex.join(['mclip', *command])}"
    again = shlex.split(line.split("; continue with: ", 1)[1])
    assert again[0] == "mclip"
    proc = _start(again[1:], err)
    assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]


def _has(folder: Path, pattern: str):
    return lambda: folder.is_dir() and any(folder.glob(pattern))


def test_sigint_during_stage_one_keeps_the_finished_shards(small_run, tmp_path):
    rows = [{"id": f"k{i}", "caption": f"{tiny.CORPUS[i % len(tiny.CORPUS)]} {i}"} for i in range(400)]
    data = tiny.write_captions(tmp_path / "rows.jsonl", rows)
    out, err = tmp_path / "cache", tmp_path / "err"
    argv = ["embed-teacher", "--data", str(data), "--out", str(out), "--teacher", str(small_run["teacher"])]
    argv += ["--id-column", "id", "--shard-size", "4", "--max-batch-size", "1", "--no-progress"]
    code, lines = _stop_when(_start(argv, err), _has(out, "shard-*.arrow"), signal.SIGINT, err)
    assert code == 130 and len(lines) == 1, lines
    kept = shards.shard_files(out)
    assert 0 < len(kept) < 100 and all(shards.read_shard_stats(p) is not None for p in kept)
    mtimes = {p.name: p.stat().st_mtime_ns for p in kept}
    _continue(lines[0], f"{len(kept)} finished shard(s) kept in {out}", argv, signal.SIGINT, None, err)
    assert {p.name: p.stat().st_mtime_ns for p in kept} == mtimes  # the kept shards were not computed again
    cache = shards.open_cache(out)
    assert cache.ids() == [r["id"] for r in rows] and cache.verify() == []


def test_sigterm_during_training_keeps_the_checkpoint_and_resume_finishes(small_run, tmp_path):
    out, err = tmp_path / "run", tmp_path / "err"
    argv = ["train-student", *small_run["train_args"], "--out", str(out), "--overwrite"]
    argv += ["--max-steps", "200", "--epochs", "200", "--save-every", "5"]
    code, lines = _stop_when(_start(argv, err), _has(out / "checkpoints", "step-*/trainer.pt"), signal.SIGTERM, err)
    assert code == 143 and len(lines) == 1, lines
    step, folder = checkpoints(out)[-1]
    assert step < 200 and not (out / "final").exists() and verify.check_folder(folder) == []
    _continue(lines[0], f"checkpoint {folder} kept (step {step})", argv, signal.SIGTERM, "--resume", err)
    assert (out / "final").is_dir() and checkpoints(out)[-1][0] == 200 and verify.run(out).problems == []


def test_sigint_during_eval_retrieval_leaves_no_report_and_the_same_command_finishes(small_run, tmp_path):
    from mclip.config import EmbedConfig
    from mclip.embed.run import run as embed

    rows = [
        {"id": f"v{i:04d}", "caption": f"{tiny.CORPUS[i % 14]} {i}", "caption_de": f"{tiny.CORPUS[(i + 6) % 14]} {i}"}
        for i in range(600)
    ]
    data = tiny.write_captions(tmp_path / "val.jsonl", rows)
    cache = tmp_path / "cache"
    embed(
        EmbedConfig(data=str(data), out=str(cache), teacher=str(small_run["teacher"]), id_column="id", progress=False)
    )
    out, err = tmp_path / "eval", tmp_path / "err"
    argv = ["eval-retrieval", "--model", str(small_run["run"]), "--cache", str(cache), "--data", str(data)]
    argv += ["--languages", "de", "--split", "train", "--out", str(out), "--batch-size", "1", "--teacher-baseline"]
    argv += ["--no-progress"]
    code, lines = _stop_when(_start(argv, err), _has(out, ".scratch/*"), signal.SIGINT, err)
    assert code == 130 and len(lines) == 1, lines
    assert not out.exists()  # the scratch folder went with the run that made it
    _continue(lines[0], "no report written yet (it is written at the end)", argv, signal.SIGINT, None, err)
    assert (out / "metrics.json").is_file() and (out / "eval.json").is_file()


def test_sigint_during_encode_names_overwrite(small_run, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"{tiny.CORPUS[i % 14]} {i}\n" for i in range(1500)), encoding="utf-8")
    out, err = tmp_path / "enc", tmp_path / "err"
    argv = ["encode", "--model", str(small_run["run"]), "--input", str(texts), "--out", str(out)]
    argv += ["--batch-size", "1", "--shard-size", "100", "--no-progress"]
    code, lines = _stop_when(_start(argv, err), _has(out, "shard-*.arrow"), signal.SIGINT, err)
    assert code == 130 and len(lines) == 1, lines
    written = len(list(out.glob("shard-*.arrow")))
    kept = f"{written} file(s) in {out} incomplete (encode has no resume)"
    _continue(lines[0], kept, argv, signal.SIGINT, "--overwrite", err)
    assert len(list(out.glob("shard-*.arrow"))) == 15 and (out / "encode.json").is_file()


def test_sigterm_during_a_pipeline_keeps_the_cache_and_the_same_command_finishes(small_run, tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text(
        f"""
name = "tiny"
out = "run"
[embed]
data = "{small_run["data"]}"
id_column = "id"
teacher = "{small_run["teacher"]}"
progress = false
[train]
data = "{small_run["data"]}"
languages = ["de", "zh"]
student = "{small_run["student"]}"
batch_size = 16
max_steps = 150
epochs = 100
save_every = 5
warmup_steps = 1
num_workers = 0
progress = false
[eval]
data = "{small_run["data"]}"
languages = ["de"]
split = "train"
progress = false
""",
        encoding="utf-8",
    )
    run, err = tmp_path / "run", tmp_path / "err"
    argv = ["run", str(toml)]
    ready = _has(run / "train" / "checkpoints", "step-*/trainer.pt")
    code, lines = _stop_when(_start(argv, err), ready, signal.SIGTERM, err)
    assert code == 143 and lines[-1].startswith("mclip: interrupted by SIGTERM"), lines
    step, folder = checkpoints(run / "train")[-1]
    _continue(lines[-1], f"cache complete; checkpoint {folder} kept (step {step})", argv, signal.SIGTERM, None, err)
    assert (run / "eval" / "metrics.json").is_file() and checkpoints(run / "train")[-1][0] == 150


def test_sigint_during_export_leaves_out_as_it_was(small_run, tmp_path):
    pytest.importorskip("onnxscript", reason="mclip export needs the [onnx] extra")
    out, err = tmp_path / "onnx", tmp_path / "err"
    argv = ["export", str(small_run["run"]), "--out", str(out), "--no-progress"]
    workspace = tmp_path / f".{out.name}.export"
    code, lines = _stop_when(_start(argv, err), _has(workspace, "folder/*"), signal.SIGINT, err)
    assert code == 130 and len(lines) == 1, lines
    assert not out.exists() and not workspace.exists()
    _continue(lines[0], f"{out} as it was (an export appears whole or not at all)", argv, signal.SIGINT, None, err)
    assert verify.check_folder(out) == []
