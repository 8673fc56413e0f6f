"""--wise-ft: final/ is the stated mix of the trained weights and the step-0 ones, on a fresh run and on a resumed one."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mclip.config import TrainConfig
from mclip.errors import ConfigError, UserError
from mclip.train.checkpoint import START, checkpoints
from mclip.train.run import run
from tests import tiny
from tests.train.test_run import _config, _killed_after, _max_diff, _records, _weights, toy  # noqa: F401 (toy: the fixture)


def _start(out) -> dict[str, np.ndarray]:
    """start.pt in _weights' naming (backbone tensors bare, the projection as dense.*)."""
    state = torch.load(out / START, weights_only=True)
    named = {}
    for key, value in state.items():
        if value.is_floating_point():
            named[key.removeprefix("backbone.").replace("projection.", "dense.linear.")] = value.numpy()
    return named


def test_final_is_the_stated_mix_of_the_trained_and_the_step_zero_weights(toy, tmp_path):
    val = tiny.write_captions(tmp_path / "val.jsonl", toy["rows"][:6])
    result = run(_config(toy, tmp_path / "run", max_steps=4, wise_ft=0.25, val_data=str(val)))
    trained = _weights(
        checkpoints(result.out)[-1][1]
    )  # checkpoints keep the trained weights (a resume continues from them)
    start = _start(result.out)
    assert set(trained) <= set(start)
    final = _weights(result.final)
    mixed = {k: 0.25 * trained[k] + 0.75 * start[k] for k in trained}
    assert _max_diff(final, mixed) < 1e-6
    assert _max_diff(trained, start) > 1e-3  # it trained: the mix is not the trivial one
    # validation is scored on the weights that were exported, after the trained weights' own score at the same step
    vals = _records(result.out, "val")
    assert [r.get("wise_ft") for r in vals[-2:]] == [None, 0.25] and vals[-1]["step"] == vals[-2]["step"] == 4
    assert result.metrics["wise_ft"] == 0.25


def test_wise_ft_zero_exports_the_teacher_a_teacher_initialised_student_started_from(toy, bert_teacher, tmp_path):
    result = run(_config(toy, tmp_path / "run", student=str(bert_teacher), max_steps=3, wise_ft=0.0))
    teacher = load_file(str(bert_teacher / "model.safetensors"))
    final = _weights(result.final)
    shared = [k for k in final if k in teacher]
    assert len(shared) > 10
    assert max(float(np.abs(final[k] - teacher[k]).max()) for k in shared) < 1e-6
    dense = final["dense.linear.weight"]
    assert np.abs(dense - np.eye(len(dense))).max() < 1e-6  # the identity projection it started with


def test_a_resumed_run_mixes_the_same_step_zero_weights_and_refuses_when_they_are_gone(toy, tmp_path):
    whole = run(_config(toy, tmp_path / "whole", max_steps=4, save_every=1, wise_ft=0.5))
    out = tmp_path / "run"
    run(_config(toy, out, max_steps=4, save_every=1, wise_ft=0.5))
    _killed_after(out, 3)  # keep_last 2: checkpoints 3 and 4 were kept
    with pytest.raises(
        UserError, match=r"other arguments \(wise_ft: 0.5 -> 1.0\)"
    ):  # it sets what final/ is: not a runtime knob
        run(_config(toy, out, max_steps=4, resume=True))
    saved = (out / START).read_bytes()
    (out / START).unlink()
    with pytest.raises(
        UserError, match=r"--wise-ft 0.5 needs the run's step-0 weights .*start.pt, which are gone; put the file back"
    ):
        run(_config(toy, out, max_steps=4, resume=True, wise_ft=0.5))
    (out / START).write_bytes(saved)
    resumed = run(_config(toy, out, max_steps=4, resume=True, wise_ft=0.5))
    assert _max_diff(_weights(resumed.final), _weights(whole.final)) < 1e-6


def test_a_damaged_start_file_is_one_line(toy, tmp_path):
    out = tmp_path / "run"
    run(_config(toy, out, max_steps=3, save_every=1, wise_ft=0.5))
    _killed_after(out, 2)
    (out / START).write_bytes(b"not a torch file")
    with pytest.raises(
        UserError, match=r"cannot load the step-0 weights .*start.pt .*damaged: put the file back, or pass --overwrite"
    ):
        run(_config(toy, out, max_steps=3, resume=True, wise_ft=0.5))
    assert [step for step, _ in checkpoints(out)] == [2]  # refused before any step
    assert json.loads((out / "config.json").read_text())["train"]["wise_ft"] == 0.5  # the run folder stays this run's


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_wise_ft_outside_zero_one_is_a_config_error(value):
    with pytest.raises(ConfigError, match=rf"wise_ft={value} must be in \[0, 1\]"):
        TrainConfig(data="d", cache="c", out="o", student="s", wise_ft=value)


@pytest.mark.slow
def test_under_torchrun_rank_0_writes_the_same_step_zero_weights_and_final_is_their_mix(toy, tmp_path):
    import os
    import subprocess
    import sys

    from tests.train.test_run import ROOT, _free_port

    args = [
        "--data",
        str(toy["data"]),
        "--cache",
        str(toy["cache"]),
        "--student",
        str(toy["student"]),
        "--languages",
        "zh,de",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--warmup-steps",
        "2",
        "--lr",
        "2e-3",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--no-progress",
        "--num-threads",
        "1",
        "--wise-ft",
        "0.5",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(_free_port()),
            "-m",
            "mclip",
            "train-student",
            "--out",
            str(tmp_path / "ddp"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = run(_config(toy, tmp_path / "single", wise_ft=0.5, log_every=10))
    assert (
        _max_diff(_start(tmp_path / "ddp"), _start(single.out)) == 0.0
    )  # the same seeded init, written once by rank 0
    trained, start = _weights(checkpoints(tmp_path / "ddp")[-1][1]), _start(tmp_path / "ddp")
    assert (
        _max_diff(_weights(tmp_path / "ddp" / "final"), {k: 0.5 * trained[k] + 0.5 * start[k] for k in trained}) < 1e-6
    )
    assert _max_diff(_weights(tmp_path / "ddp" / "final"), _weights(single.final)) < 1e-4  # as the DDP test bounds it
