"""--report-to: the TensorBoard event files, read back by tensorboard's own reader, hold every metrics.jsonl record's
values at the same steps, once each, also across SIGKILLs and --resume; wandb gets the same; a missing package is one
line."""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mclip.cli import main
from mclip.train.checkpoint import records
from mclip.train.report import TENSORBOARD, scalars

ROOT = Path(__file__).resolve().parents[2]


def curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: tag -> [(step, value)], as its EventAccumulator reads the folder
    (in file order, dropping what a purge_step drops)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TENSORBOARD), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    """The same from metrics.jsonl, with the values at the float32 precision of an event file."""
    want: dict[str, list] = {}
    for record in records(out):
        for tag, value in scalars(record).items():
            want.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    return want


def assert_same_curves(out: Path) -> dict:
    got, want = curves(out), expected(out)
    assert set(got) == set(want)
    for tag in want:
        steps = [step for step, _ in got[tag]]
        assert Counter(steps).most_common(1)[0][1] == 1, (tag, steps)  # each step once
        assert got[tag] == want[tag], tag  # the same steps, in order, with the same values
    return got


def _args(small_run, out: Path, *extra: str, report_to: str = "tensorboard") -> list[str]:
    return [
        "train-student",
        *small_run["train_args"],
        "--out",
        str(out),
        "--max-steps",
        "12",
        "--epochs",
        "5",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--val-fraction",
        "0.25",
        "--loss",
        "cl",
        "--report-to",
        report_to,
        *extra,
    ]


def test_the_event_files_hold_every_record_of_metrics_jsonl(small_run, tmp_path):
    out = tmp_path / "run"
    main(_args(small_run, out, "--max-steps", "4"))
    got = assert_same_curves(out)
    # train records: lr, temperature, grad norm, pairs/s and the loss parts; validation: loss and R@1 per language
    assert {"train/loss", "train/lr", "train/temperature", "train/grad_norm", "train/pairs_per_s"} <= set(got)
    assert {"val/loss", "val/r1_de", "val/r1_zh", "val/r1_en"} <= set(got)
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4] and [s for s, _ in got["val/loss"]] == [2, 4]
    files = list((out / TENSORBOARD).iterdir())
    main(_args(small_run, out, "--max-steps", "4", "--resume"))  # a finished run resumed: nothing new to draw
    assert list((out / TENSORBOARD).iterdir()) == files
    main(_args(small_run, out, "--max-steps", "4", "--overwrite", report_to="none"))
    assert not (out / TENSORBOARD).exists()  # --overwrite removes the curves of the run it replaces


# Each run below is a fresh process that SIGKILLs itself right after the reporter has written the record of a given
# step (between two checkpoints), so what the killed run drew past its last checkpoint is in the event files.
KILLER = r"""
import os, signal, sys
from mclip.train import report

kill_at = int(sys.argv[1])
log = report.Reporter.log

def log_then_die(self, record):
    log(self, record)
    if record["step"] == kill_at and record["kind"] == "val":
        os.kill(os.getpid(), signal.SIGKILL)

report.Reporter.log = log_then_die
from mclip.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_the_curves_continue_across_kills_and_resume_with_each_step_once(small_run, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for kill_at in (2, 8):  # before the first checkpoint (step 3: the resume starts over), then after the one at 6
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(kill_at), *_args(small_run, out, "--resume")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == -9, proc.stderr[-3000:]
        assert max(step for step, _ in curves(out)["val/loss"]) == kill_at  # it drew up to where it died
    main(_args(small_run, out, "--resume"))
    assert len(list((out / TENSORBOARD).iterdir())) == 3  # one event file per process
    got = assert_same_curves(out)
    assert [step for step, _ in got["train/loss"]] == list(range(1, 13))
    assert [step for step, _ in got["val/r1_de"]] == list(range(2, 13, 2))


def test_report_to_is_a_runtime_option_a_resume_may_change(small_run, tmp_path):
    from mclip.config import TrainConfig, runtime_fields

    assert "report_to" in runtime_fields(TrainConfig)
    out = tmp_path / "run"
    main(_args(small_run, out, "--max-steps", "4", report_to="none"))
    assert not (out / TENSORBOARD).exists()
    main(_args(small_run, out, "--max-steps", "4", "--resume"))  # not refused as "trained with other arguments"


def test_a_backend_that_is_not_installed_is_one_line(small_run, tmp_path, cli_error, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "run"
    assert cli_error(_args(small_run, out, report_to="tensorboard,wandb")) == (
        "--report-to wandb needs the wandb package, which is not installed; run `pip install 'mclip[wandb]'`, "
        "or leave wandb out of --report-to"
    )
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("value", ["tensorboard,none", "comet", "tensorboard,tensorboard"])
def test_bad_report_to_values_are_one_line(value, small_run, tmp_path, cli_error):
    message = cli_error(_args(small_run, tmp_path / "run", report_to=value))
    assert message.startswith("report_to=") and "use none, tensorboard, wandb or tensorboard,wandb" in message


def test_scalars_name_each_curve_by_its_record():
    train = {"kind": "train", "step": 3, "loss": 0.5, "mse": 0.4, "grad_norm": None, "lr": 1e-4, "epoch": 0.5}
    assert scalars(train) == {"train/loss": 0.5, "train/mse": 0.4, "train/lr": 1e-4, "train/epoch": 0.5}
    val = {"kind": "val", "step": 4, "val_loss": 0.3, "val_r1_de": 0.25}
    assert scalars(val) == {"val/loss": 0.3, "val/r1_de": 0.25}
    mixed = {"kind": "val", "step": 4, "wise_ft": 0.5, "val_loss": 0.2, "val_r1_de": 0.5}
    assert scalars(mixed) == {"wise_ft/loss": 0.2, "wise_ft/r1_de": 0.5}


def test_a_resumed_writer_starts_a_file_that_sorts_after_the_killed_runs(tmp_path):
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was made in: a
    resumed run's file, made in the same second as the killed run's, must still come after it, or its purge comes
    before the points it should drop."""
    import time

    from mclip.train.report import EVENTS, Reporter

    folder = tmp_path / TENSORBOARD
    folder.mkdir()
    killed = folder / f"{EVENTS}{int(time.time()):010d}.~host.99999.0"  # '~' sorts after any host name made this second
    killed.write_bytes(b"")
    reporter = Reporter(tmp_path, ("tensorboard",), 3, {})
    reporter.log({"kind": "train", "step": 4, "loss": 1.0})
    reporter.close()
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0] == killed.name


class FakeWandb:
    """What mclip calls of wandb, recorded: init's arguments and each run's logged values and steps."""

    def __init__(self, fail_at: int | None = None):
        import importlib.machinery
        import types

        self.inits, self.logs, self.fail_at, self.finished = [], [], fail_at, 0
        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.module.Settings = lambda **kw: kw
        self.module.init = self.init

    def init(self, **kwargs):
        import types

        self.inits.append(kwargs)
        run = len(self.inits)

        def log(values, step):
            if step == self.fail_at:
                raise RuntimeError("killed")
            self.logs.append((run, step, values))

        return types.SimpleNamespace(log=log, finish=lambda: setattr(self, "finished", self.finished + 1))


def test_wandb_gets_every_record_and_a_resumed_run_continues_the_same_run_id(small_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fake = FakeWandb(fail_at=5)  # dies logging step 5, after the checkpoint at 3
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    with pytest.raises(RuntimeError, match="killed"):
        main(_args(small_run, out, "--max-steps", "6", report_to="wandb"))
    fake.fail_at = None
    main(_args(small_run, out, "--max-steps", "6", "--resume", report_to="wandb"))
    run_id = (out / "wandb" / "mclip-run-id").read_text().strip()
    assert [init["id"] for init in fake.inits] == [run_id, run_id] and fake.finished == 2
    assert all(init["resume"] == "allow" and init["dir"] == str(out) for init in fake.inits)
    resumed = [(step, values) for run, step, values in fake.logs if run == 2]
    assert resumed[0][0] == 4  # the second run starts after its checkpoint; wandb keeps the steps it already has
    kept = [(step, values) for run, step, values in fake.logs if run == 1 and step <= 3] + resumed
    assert kept == [(r["step"], scalars(r)) for r in records(out)]


def test_a_real_wandb_run_offline(small_run, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    main(_args(small_run, out, "--max-steps", "4", report_to="wandb"))
    run_id = (out / "wandb" / "mclip-run-id").read_text().strip()
    (run,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    assert (run / f"run-{run_id}.wandb").stat().st_size > 0
