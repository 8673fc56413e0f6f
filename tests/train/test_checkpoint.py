"""Stage 2's run folder: a checkpoint saved and restored gives back the optimizer, the extras and the RNG exactly; the
listing ignores unfinished saves; claiming a folder trims a killed run's records and sets damaged checkpoints aside."""

import json

import numpy as np
import pytest
import torch

from mclip.config import TrainConfig
from mclip.errors import UserError
from mclip.models.student import build_student, load
from mclip.store import verify
from mclip.train import checkpoint
from mclip.train.distiller import Distiller, param_groups

POSITION = dict(
    epoch=0, epoch_step=3, steps_per_epoch=10, train_pairs=100, pairs_digest="abc", teacher_fingerprint="f" * 64
)


def _trained(student) -> tuple[Distiller, torch.optim.Optimizer, torch.amp.GradScaler]:
    """A Distiller with a learnt temperature after one AdamW step, so the optimizer has state to save."""
    model = Distiller(student, 0.05, learn_temperature=True)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-3)
    enc = student.tokenize(["a red apple", "ein Hund"])
    emb, _, temperature = model(enc["input_ids"], enc["attention_mask"])
    (emb.square().mean() + temperature).backward()
    optimizer.step()
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture
def student(bert_student):
    torch.manual_seed(0)
    return build_student(str(bert_student), 8, projection_init="random")


def test_save_then_restore_is_exact(student, tmp_path):
    model, optimizer, scaler = _trained(student)
    torch.manual_seed(7)
    np.random.seed(7)
    trainer = checkpoint.trainer_state(model, optimizer, scaler, step=3, **POSITION)
    folder = checkpoint.save(tmp_path, 3, model, trainer, keep_last=2)
    after_save = (torch.rand(3), np.random.rand())  # what the run draws next
    assert checkpoint.checkpoints(tmp_path) == [(3, folder)] and verify.check_folder(folder) == []

    again = Distiller(
        load(folder), 0.05, learn_temperature=True
    )  # the resumed run: the student from the checkpoint ...
    restored_optimizer = torch.optim.AdamW(param_groups(again, 1e-4), lr=1e-3)
    torch.manual_seed(999)
    np.random.seed(999)
    assert (
        checkpoint.restore(
            folder, again, restored_optimizer, torch.amp.GradScaler("cpu", enabled=False), 100, "abc", rank=0
        )
        == 3
    )
    assert (
        torch.equal(torch.rand(3), after_save[0]) and np.random.rand() == after_save[1]
    )  # ... its RNG where the save left it
    assert again.log_temperature.item() == model.log_temperature.item()  # the extras: the learnt temperature
    saved, loaded = optimizer.state_dict()["state"], restored_optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k]["exp_avg"], loaded[k]["exp_avg"]) for k in saved)
    with pytest.raises(UserError, match=r"pairs changed since the checkpoint \(100 training pairs then, 100 now\)"):
        checkpoint.restore(
            folder, again, restored_optimizer, torch.amp.GradScaler("cpu", enabled=False), 100, "other", rank=0
        )


def test_the_listing_holds_finished_saves_only_and_keeps_the_last_ones(student, tmp_path):
    model, optimizer, scaler = _trained(student)
    for step in (1, 2, 3):
        checkpoint.save(
            tmp_path,
            step,
            model,
            checkpoint.trainer_state(model, optimizer, scaler, step=step, **POSITION),
            keep_last=2,
        )
    (tmp_path / "checkpoints" / ".tmp-step-0000009-123").mkdir()  # a killed save
    (tmp_path / "checkpoints" / "step-0000010").mkdir()  # no trainer.pt: not finished
    assert [step for step, _ in checkpoint.checkpoints(tmp_path)] == [2, 3]
    assert checkpoint.checkpoints(tmp_path / "nowhere") == []


def test_claim_trims_a_killed_runs_records_and_sets_damaged_checkpoints_aside(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-0000004").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-0000006-99").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 7)))
    config = TrainConfig(data="d", cache="c", out=str(out), resume=True)
    damaged = [(out / "checkpoints" / "step-0000004", "checksum differs")]
    checkpoint.claim(
        config, damaged, out / "checkpoints" / "step-0000002", {"train": {"lr": 1.0}}, {"de": {"pairs": 3}}, step=2
    )
    assert [r["step"] for r in checkpoint.records(out)] == [
        1,
        2,
    ]  # what the killed run logged after its last checkpoint goes
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004.corrupt"]
    assert json.loads((out / "config.json").read_text()) == {"train": {"lr": 1.0}}
    assert json.loads((out / "join.json").read_text()) == {"de": {"pairs": 3}}
    assert "checkpoint" in capsys.readouterr().err and not checkpoint.is_finished(out)


def test_a_non_empty_folder_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    config = TrainConfig(data="d", cache="c", out=str(tmp_path))
    with pytest.raises(
        UserError, match="is not empty; pass --resume to continue the run in it, --overwrite to replace it"
    ):
        checkpoint.check_out(config, cache=None)
    resumed = TrainConfig(data="d", cache="c", out=str(tmp_path), resume=True)
    assert checkpoint.check_out(resumed, cache=None) == (None, [])  # nothing to resume: the run starts


def test_finish_writes_final_curves_and_summary(student, tmp_path):
    model, _, _ = _trained(student)
    checkpoint.log(tmp_path, {"kind": "train", "step": 1, "loss": 2.0})
    checkpoint.log(tmp_path, {"kind": "val", "step": 1, "val_loss": 1.5, "val_r1_de": 0.25})
    checkpoint.finish(tmp_path, model, {"steps": 1})
    assert verify.check_folder(tmp_path / "final") == [] and load(tmp_path / "final").dim == 8
    assert (tmp_path / "curves.png").stat().st_size > 0 and json.loads((tmp_path / "summary.json").read_text()) == {
        "steps": 1
    }
    assert checkpoint.is_finished(tmp_path)
