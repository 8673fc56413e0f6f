"""Stage 2 end to end on a toy parallel set: split, loss going down, layer-kd, DDP, kill-and-resume, errors."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mclip.cli import main
from mclip.config import EmbedConfig, TrainConfig
from mclip.embed.run import run as embed_teacher
from mclip.errors import ConfigError, UserError
from mclip.models.student import load
from mclip.store import shards
from mclip.train.checkpoint import checkpoints
from mclip.train.distiller import Distiller, lr_at
from mclip.train.pairs import prepare_pairs
from mclip.train.run import run
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]


def _toy_rows(n: int = 48) -> list[dict]:
    """Real parallel phrases: emoji names with their human CLDR translations (German, Chinese)."""
    import emoji

    for lang in ("de", "zh"):
        emoji.config.load_language(lang)
    clean = lambda s: s.strip(":").replace("_", " ")  # noqa: E731
    items = sorted(
        (clean(d["en"]), clean(d["de"]), clean(d["zh"]))
        for d in emoji.EMOJI_DATA.values()
        if "de" in d
        and "zh" in d
        and d.get("status") == emoji.STATUS["fully_qualified"]
        and "skin tone" not in clean(d["en"])
    )
    items = [t for t in items if len(t[0]) <= 30][:n]
    return [
        {"id": f"e{i:03d}", "caption": en, "caption_de": de, "caption_zh": zh} for i, (en, de, zh) in enumerate(items)
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, bert_teacher):
    """Parallel captions, a tiny student whose vocabulary covers them (no dropout, so runs compare exactly across process
    layouts), and a teacher cache from the tiny BERT teacher with both layers cached."""
    root = tmp_path_factory.mktemp("toy")
    rows = _toy_rows()
    data = tiny.write_captions(root / "parallel.jsonl", rows)
    corpus = [r[k] for r in rows for k in ("caption", "caption_de", "caption_zh")]
    student = tiny.write_tiny_bert(root / "student", hidden=32, seed=2, corpus=corpus)
    config = json.loads((student / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (student / "config.json").write_text(json.dumps(config))
    cache = root / "cache"
    embed_teacher(
        EmbedConfig(
            data=str(data),
            out=str(cache),
            teacher=str(bert_teacher),
            id_column="id",
            cache_layers=(1, 2),
            progress=False,
        )
    )
    return {"root": root, "rows": rows, "data": data, "student": student, "cache": cache, "corpus": corpus}


def _config(toy, out, **changes) -> TrainConfig:
    base = dict(
        data=str(toy["data"]),
        cache=str(toy["cache"]),
        out=str(out),
        student=str(toy["student"]),
        languages=("zh", "de"),
        batch_size=16,
        epochs=1,
        warmup_steps=2,
        lr=2e-3,
        num_workers=0,
        eval_every=0,
        save_every=0,
        log_every=1,
        progress=False,
        num_threads=1,
    )
    return TrainConfig(**{**base, **changes})


def _weights(final: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {
        **load_file(str(final / "model.safetensors")),
        **{f"dense.{k}": v for k, v in load_file(str(final / "2_Dense" / "model.safetensors")).items()},
    }


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pure pieces ----


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(data="d", cache="c", out="o", lr=1.0, warmup_steps=10, schedule="linear")
    assert lr_at(0, config, 110) == pytest.approx(0.1)
    assert lr_at(9, config, 110) == pytest.approx(1.0)
    assert lr_at(60, config, 110) == pytest.approx(0.5)
    assert lr_at(110, config, 110) == pytest.approx(0.0)
    cosine = dataclasses.replace(config, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(60, cosine, 110) == pytest.approx(0.55)
    assert lr_at(110, cosine, 110) == pytest.approx(0.1)
    assert lr_at(500, dataclasses.replace(config, schedule="constant"), 110) == 1.0


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(lr=-1e-4), "lr=-0.0001 must be > 0"),
        (dict(batch_size=0), "batch_size=0 must be >= 1"),
        (dict(loss="kl"), "loss='kl' is not valid"),
        (dict(alpha=1.5), r"alpha=1.5 must be in \[0, 1\]"),
        (dict(temperature=0), "temperature=0 must be > 0"),
        (dict(val_fraction=0.1, val_data="v.jsonl"), "either --val-data or --val-fraction"),
        (dict(student_layers=(1,)), "only used with --layer-kd"),
        (dict(batch_size=10, grad_accum=3), "multiple of grad_accum"),
        (dict(resume=True, overwrite=True), "either --resume or --overwrite"),
        (dict(languages=()), "at least one language"),
    ],
)
def test_bad_config_values_are_one_line_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{**dict(data="d", cache="c", out="o"), **changes})


# ---- training runs ----


def test_loss_decreases_and_the_run_folder_is_complete(toy, tmp_path):
    out = tmp_path / "run"
    result = run(
        _config(
            toy, out, loss="mse", epochs=6, val_fraction=0.2, eval_every=6, save_every=6, keep_last=2, num_workers=1
        )
    )
    train = _records(out, "train")
    assert result.steps == len(train) == train[-1]["step"] > 6
    first, last = np.mean([r["loss"] for r in train[:3]]), np.mean([r["loss"] for r in train[-3:]])
    assert last < 0.6 * first, (first, last)
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in train)  # num_workers=1: a worker makes the batches
    val = _records(out, "val")
    assert val[-1]["val_loss"] < val[0]["val_loss"] and {"val_r1_zh", "val_r1_de", "val_r1_en"} <= val[-1].keys()
    for name in ("config.json", "metrics.jsonl", "curves.png", "join.json", "summary.json", "final/mclip.json"):
        assert (out / name).exists(), name
    assert [s for s, _ in checkpoints(out)] == [result.steps - 6, result.steps]  # keep_last=2
    join = json.loads((out / "join.json").read_text())
    cache_ids = shards.open_cache(toy["cache"]).ids()
    assert join["validation_ids"] > 0 and join["train_ids"] + join["validation_ids"] == len(cache_ids)
    assert join["train_pairs"] + join["held_out_pairs"] == 3 * len(cache_ids)
    meta = json.loads((out / "final" / "mclip.json").read_text())
    manifest = shards.open_cache(toy["cache"]).manifest
    assert (
        meta["teacher"]["fingerprint"] == manifest["teacher"]["fingerprint"] and meta["teacher"]["normalized"] is True
    )
    assert meta["languages"] == ["zh", "de", "en"] and meta["train"]["loss"] == "mse" and meta["dim"] == manifest["dim"]
    saved = json.loads((out / "config.json").read_text())
    assert TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["train"].items()}).epochs == 6
    # the checkpoint of the last step holds the same student as final/
    assert _max_diff(_weights(out / "final"), _weights(checkpoints(out)[-1][1])) == 0.0
    assert load(out / "final").encode(toy["rows"][0]["caption_zh"]).shape == (manifest["dim"],)


def test_train_records_hold_the_share_of_time_spent_waiting_for_batches(toy, tmp_path, monkeypatch):
    from mclip.train import run as train_student

    slow = 0.05  # seconds each batch takes to make, in the loop's own process (num_workers=0)
    make = train_student.EpochSteps.__getitem__

    def slow_batch(self, k):
        time.sleep(slow)
        return make(self, k)

    monkeypatch.setattr(train_student.EpochSteps, "__getitem__", slow_batch)
    out = tmp_path / "run"
    run(_config(toy, out, max_steps=3, log_every=1))
    records = _records(out, "train")
    assert len(records) == 3
    for r in records:
        assert 0.0 <= r["data_wait"] <= 1.0
        step_seconds = 16 / r["pairs_per_s"]  # batch_size 16, one step per record
        assert r["data_wait"] * step_seconds >= 0.99 * slow, (
            r
        )  # the wait covers the fetch, whatever the machine's speed


def test_validation_ids_are_never_trained_on(toy, tmp_path):
    config = _config(toy, tmp_path / "unused", val_fraction=0.25)
    cache = shards.open_cache(toy["cache"])
    train, val, report = prepare_pairs(config, cache)
    assert val is not None and len(val) == 3 * len(np.unique(val.rows))  # every language of a held-out id is held out
    assert not set(train.rows) & set(val.rows)
    again, _, _ = prepare_pairs(config, cache)
    assert np.array_equal(train.rows, again.rows)
    val_file = tiny.write_captions(tmp_path / "val.jsonl", toy["rows"][:5])
    train2, val2, report2 = prepare_pairs(dataclasses.replace(config, val_fraction=0.0, val_data=str(val_file)), cache)
    assert (
        set(val2.rows) == {0, 1, 2, 3, 4} and not set(train2.rows) & {0, 1, 2, 3, 4} and report2["held_out_pairs"] == 15
    )


def test_contrastive_and_layer_kd_train_with_learnt_temperature(toy, tmp_path):
    out = tmp_path / "run"
    result = run(_config(toy, out, loss="cl", alpha=0.5, layer_kd=True, epochs=2, grad_accum=2))
    record = _records(out, "train")[-1]
    assert {"mse", "infonce", "layer_kd"} <= record.keys() and record["loss"] == pytest.approx(
        record["mse"] + record["infonce"] + record["layer_kd"], rel=1e-5
    )
    assert record["temperature"] != pytest.approx(0.05, abs=1e-7)  # learnt
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["student_layers"] == [1, 2]  # the default maps teacher layers 1,2 of 2 onto student layers 1,2 of 2
    state = torch.load(checkpoints(out)[-1][1] / "trainer.pt", weights_only=True)
    assert state["extra"]["layer_proj.0.weight"].shape == (24, 32)  # student hidden 32 -> teacher hidden 24
    assert state["step"] == result.steps


def test_layer_kd_shapes(toy):
    from mclip.models.student import build_student

    student = build_student(str(toy["student"]), dim=24)
    model = Distiller(student, 0.05, True, student_layers=(1, 2), teacher_width=24)
    enc = student.tokenize(["goldmedaille", "金牌 and more"])
    emb, states, temperature = model(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (2, 24) and [s.shape for s in states] == [(2, 24), (2, 24)] and temperature.shape == ()
    assert Distiller(student, 0.05, False).log_temperature.requires_grad is False


def test_layer_kd_needs_cached_layers(toy, tmp_path, bert_teacher, capsys):
    bare = tmp_path / "bare"
    embed_teacher(
        EmbedConfig(data=str(toy["data"]), out=str(bare), teacher=str(bert_teacher), id_column="id", progress=False)
    )
    with pytest.raises(UserError, match="--cache-layers"):
        run(_config(toy, tmp_path / "run", cache=str(bare), layer_kd=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(toy, tmp_path, monkeypatch):
    import mclip.train.losses

    real, calls = mclip.train.losses.mse, []

    def poisoned(student, target):
        calls.append(1)
        parts = real(student, target)
        return {"mse": parts["mse"] * float("nan")} if len(calls) > 3 else parts

    monkeypatch.setattr(mclip.train.losses, "mse", poisoned)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"loss is nan at step 4 .*step-0000002"):
        run(_config(toy, out, loss="mse", save_every=2))
    assert [s for s, _ in checkpoints(out)] == [2] and not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2], ids=["1-node-x-2", "2-nodes-x-1"])
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(toy, tmp_path, nodes):
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
        "--log-every",
        "1",
        "--no-progress",
        "--loss",
        "cl",
        "--alpha",
        "0.5",
        "--layer-kd",
        "--num-threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    # two nodes: two torchrun launchers, as on two machines (node ranks 0 and 1, the master on 127.0.0.1), over gloo
    layout = (
        [["--nproc-per-node", "2"]]
        if nodes == 1
        else [
            ["--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
            for r in range(2)
        ]
    )
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *flags,
                "--master-port",
                port,
                "-m",
                "mclip",
                "train-student",
                "--out",
                str(tmp_path / "ddp"),
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flags in layout
    ]
    for launcher in launchers:
        _, stderr = launcher.communicate(timeout=240)
        assert launcher.returncode == 0, stderr[-3000:]
    single = run(_config(toy, tmp_path / "single", loss="cl", alpha=0.5, layer_kd=True))
    ddp_records, single_records = _records(tmp_path / "ddp", "train"), _records(tmp_path / "single", "train")
    assert len(ddp_records) == len(single_records) == single.steps
    assert np.allclose([r["loss"] for r in ddp_records], [r["loss"] for r in single_records], rtol=1e-4)
    # gloo's all-reduce sums in another order than one process; Adam's normalised step turns that float rounding on
    # near-zero gradients into drifts of ~1e-5 at lr 2e-3, so weights agree to 1e-4 (resume, same process layout, is exact)
    assert _max_diff(_weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "single" / "final")) < 1e-4
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


# ---- user errors: one line, exit code 2 ----


def _cli_args(toy, out, *extra) -> list[str]:
    return [
        "train-student",
        "--data",
        str(toy["data"]),
        "--cache",
        str(toy["cache"]),
        "--out",
        str(out),
        "--student",
        str(toy["student"]),
        "--languages",
        "zh,de",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_refuses_a_non_empty_run_folder(toy, tmp_path, cli_error):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "--resume" in cli_error(_cli_args(toy, out))
    main(_cli_args(toy, out, "--overwrite"))
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "final"
    ).is_dir()  # --overwrite replaces only the run's files


def test_resume_refuses_a_cache_from_another_teacher(toy, tmp_path, cli_error):
    out = tmp_path / "run"
    main(_cli_args(toy, out, "--save-every", "1"))
    other_teacher = tiny.write_tiny_bert(tmp_path / "other_teacher", hidden=24, seed=7)
    other = tmp_path / "other_cache"
    embed_teacher(
        EmbedConfig(data=str(toy["data"]), out=str(other), teacher=str(other_teacher), id_column="id", progress=False)
    )
    args = _cli_args(toy, out, "--resume")
    args[args.index("--cache") + 1] = str(other)
    assert "was made by teacher" in cli_error(args)
    assert "was trained with other arguments (lr: 0.0001 -> 0.001)" in cli_error(
        _cli_args(toy, out, "--resume", "--lr", "1e-3")
    )


def test_resume_refuses_a_cache_of_another_dimension(toy, tmp_path, clip_text_teacher, cli_error):
    out = tmp_path / "run"
    main(_cli_args(toy, out, "--save-every", "1"))
    clip_cache = tmp_path / "clip_cache"
    embed_teacher(
        EmbedConfig(
            data=str(toy["data"]), out=str(clip_cache), teacher=str(clip_text_teacher), id_column="id", progress=False
        )
    )
    args = _cli_args(toy, out, "--resume")
    args[args.index("--cache") + 1] = str(clip_cache)
    assert "projects to 24 dims but cache" in cli_error(args)
    # the same mismatch when continuing from an exported student
    args = _cli_args(toy, tmp_path / "continue")
    args[args.index("--cache") + 1], args[args.index("--student") + 1] = str(clip_cache), str(out / "final")
    assert "projects to 24 dims" in cli_error(args)


def test_missing_language_column(toy, tmp_path, cli_error):
    args = _cli_args(toy, tmp_path / "run")
    args[args.index("--languages") + 1] = "zh,fr"
    assert "'caption_fr' for language 'fr' not found" in cli_error(args)


def test_empty_join(toy, tmp_path, cli_error):
    other_ids = tiny.write_captions(tmp_path / "other.jsonl", [{**r, "id": "x" + r["id"]} for r in toy["rows"]])
    args = _cli_args(toy, tmp_path / "run")
    args[args.index("--data") + 1] = str(other_ids)
    assert "no caption id in" in cli_error(args)
    assert not (
        tmp_path / "run"
    ).exists()  # a refused run leaves nothing behind, so the fixed command runs in the same --out


def test_bad_values_from_the_command_line(toy, tmp_path, cli_error):
    assert "lr=-0.001 must be > 0" in cli_error(_cli_args(toy, tmp_path / "a", "--lr", "-1e-3"))
    assert "alpha=2.0 must be in [0, 1]" in cli_error(_cli_args(toy, tmp_path / "b", "--alpha", "2"))
    assert "larger than the" in cli_error(_cli_args(toy, tmp_path / "c", "--batch-size", "4096"))
    assert not (tmp_path / "c").exists()  # refused after the pairs were built: their scratch folder went with it
    assert "loss='nope' is not valid" in cli_error(_cli_args(toy, tmp_path / "d", "--loss", "nope"))


def test_embedding_lr_scale_moves_only_the_embedding_matrix_faster(toy, tmp_path):
    """One Adam step moves each weight by about lr: with embedding_lr_scale=10 the word-embedding rows move 10x as far,
    and every other weight takes exactly the step it takes at scale 1."""
    from safetensors.numpy import load_file

    start = load_file(str(toy["student"] / "model.safetensors"))
    moved = {}
    for scale in (1.0, 10.0):
        out = tmp_path / f"s{scale:g}"
        run(_config(toy, out, max_steps=1, warmup_steps=1, clip_grad=0, weight_decay=0, embedding_lr_scale=scale))
        moved[scale] = {k: v - start[k] for k, v in load_file(str(out / "final" / "model.safetensors")).items()}
    emb = next(k for k in start if k.endswith("word_embeddings.weight"))
    rows = np.abs(moved[1.0][emb]).max(1) > 0  # the tokens of the batch
    assert rows.any() and not rows.all()
    ratio = np.abs(moved[10.0][emb][rows]).mean() / np.abs(moved[1.0][emb][rows]).mean()
    assert 9.0 < ratio < 11.0, ratio
    assert all(np.array_equal(moved[1.0][k], moved[10.0][k]) for k in start if k != emb)


def test_embedding_lr_scale_old_slows_only_the_rows_the_student_had_before_extend_vocab(toy, tmp_path):
    """embedding_lr_scale speeds the whole matrix; embedding_lr_scale_old gives the student's own rows their own lr (one
    Adam step moves a weight by about its lr), while extend-vocab's new rows still take the full embedding_lr_scale step."""
    from safetensors.numpy import load_file

    start = load_file(str(toy["student"] / "model.safetensors"))
    emb = next(k for k in start if k.endswith("word_embeddings.weight"))
    old = start[emb].shape[0]
    final = {}
    for scale_old in (None, 1.0, 0.0):
        out = tmp_path / f"s{scale_old}"
        run(
            _config(
                toy,
                out,
                max_steps=1,
                warmup_steps=1,
                clip_grad=0,
                weight_decay=0,
                embedding_lr_scale=10.0,
                embedding_lr_scale_old=scale_old,
                extend_vocab=True,
                extend_vocab_words=1,
            )
        )
        final[scale_old] = load_file(str(out / "final" / "model.safetensors"))[emb]
    assert final[None].shape[0] > old  # new rows were added, and they move the same in all three runs
    assert np.allclose(final[None][old:], final[1.0][old:], atol=1e-7) and np.allclose(
        final[None][old:], final[0.0][old:], atol=1e-7
    )
    moved = {k: v[:old] - start[emb] for k, v in final.items()}
    rows = np.abs(moved[None]).max(1) > 0
    assert rows.any()
    assert np.allclose(moved[1.0], moved[None] / 10, atol=1e-7)  # lr instead of 10 x lr
    assert np.array_equal(final[0.0][:old], start[emb])  # frozen


def _killed_after(out: Path, step: int) -> None:
    """Leave a finished run folder as a run killed after checkpoint `step` would: later checkpoints and final/ gone."""
    import shutil

    for s, folder in checkpoints(out):
        if s > step:
            shutil.rmtree(folder)
    shutil.rmtree(out / "final")


def test_resume_accepts_a_run_written_before_a_setting_existed(toy, tmp_path):
    out = tmp_path / "run"
    run(_config(toy, out, max_steps=3, save_every=1))
    _killed_after(out, 2)
    saved = json.loads((out / "config.json").read_text())
    del saved["train"]["embedding_lr_scale"]  # as an older mclip wrote it
    (out / "config.json").write_text(json.dumps(saved))
    assert run(_config(toy, out, max_steps=3, save_every=1, resume=True)).steps == 3
    with pytest.raises(
        UserError, match="embedding_lr_scale: 1.0 -> 2.0"
    ):  # the default stands in, so a real change is refused
        run(_config(toy, out, max_steps=3, resume=True, embedding_lr_scale=2.0))


def test_resume_refuses_what_would_change_the_schedule_or_the_pairs(toy, tmp_path):
    # epochs and max_steps set the length of the lr schedule; another validation file of the same size moves ids
    # between training and validation. Each is one line, and the run folder is left as it was.
    out = tmp_path / "run"
    rows = toy["rows"]
    val_a = tiny.write_captions(tmp_path / "val_a.jsonl", rows[:6])
    val_b = tiny.write_captions(tmp_path / "val_b.jsonl", rows[6:12])
    run(_config(toy, out, max_steps=3, save_every=1, val_data=str(val_a)))
    _killed_after(out, 2)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(UserError, match=r"other arguments \(max_steps: 3 -> 5\)"):
        run(_config(toy, out, max_steps=5, resume=True, val_data=str(val_a)))
    with pytest.raises(UserError, match=r"other arguments \(epochs: 1 -> 2\)"):
        run(_config(toy, out, max_steps=3, epochs=2, resume=True, val_data=str(val_a)))
    with pytest.raises(UserError, match="pairs changed since the checkpoint .*--val-data"):
        run(_config(toy, out, max_steps=3, resume=True, val_data=str(val_b)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert run(_config(toy, out, max_steps=3, resume=True, val_data=str(val_a))).steps == 3  # the same inputs resume


def test_train_records_hold_the_mean_loss_of_their_window(toy, tmp_path):
    every = _records((run(_config(toy, tmp_path / "a", max_steps=6, log_every=1))).out, "train")
    windows = _records((run(_config(toy, tmp_path / "b", max_steps=6, log_every=3))).out, "train")
    assert [r["step"] for r in windows] == [3, 6]
    for record, steps in zip(windows, (every[:3], every[3:])):
        assert record["loss"] == pytest.approx(np.mean([r["loss"] for r in steps]), rel=1e-5)
        assert record["mse"] == pytest.approx(np.mean([r["mse"] for r in steps]), rel=1e-5)


def test_aligned_vocabulary_init_pairs_each_text_with_its_own_english_caption(toy, tmp_path, monkeypatch):
    from mclip.train import run as train_student

    seen = {}
    real = train_student.extend_vocabulary

    def spy(student, texts, min_word_count=0, english=None, keep=(), *rest):
        seen.update(texts=list(texts), english=english, keep=list(keep))
        return real(student, texts, min_word_count, english, keep, *rest)

    monkeypatch.setattr(train_student, "extend_vocabulary", spy)
    result = run(
        _config(
            toy, tmp_path / "run", max_steps=1, extend_vocab=True, extend_vocab_words=1, extend_vocab_init="aligned"
        )
    )
    english_of = {r[f"caption_{lang}"]: r["caption"] for r in toy["rows"] for lang in ("de", "zh")}
    # the new tokens come from the other languages only; the English captions are what they must leave as they were
    assert len(seen["texts"]) == len(seen["english"]) == result.join["train_pairs"] - result.join["train_ids"]
    assert all(english_of[text] == en for text, en in zip(seen["texts"], seen["english"]))
    assert sorted(seen["keep"]) == sorted({english_of[t] for t in seen["texts"]})
    assert json.loads((result.final / "mclip.json").read_text())["added_tokens"] > 0


@pytest.mark.parametrize("stems", [0, 2])
def test_a_teacher_initialised_student_equals_the_teacher_at_step_zero(toy, bert_teacher, tmp_path, stems):
    # the student is the teacher's own weights + identity projection + new tokens for the other languages (aligned):
    # its English must still be the cache, bit for bit up to float error, and no new row may start at zero. With stems:
    # the tiny vocabulary spells German letter by letter, so German stems match inside words, and none may reach English
    from mclip.train import run as train_student

    config = _config(
        toy,
        tmp_path / "run",
        student=str(bert_teacher),
        extend_vocab=True,
        extend_vocab_words=1,
        extend_vocab_init="aligned",
        extend_vocab_stems=stems,
    )
    cache = shards.open_cache(config.cache)
    train, _, _ = prepare_pairs(config, cache)
    base = len(load_tokenizer(bert_teacher))
    student = train_student._student(config, cache, None, train)
    assert len(student.tokenizer) > base  # the toy's Chinese and German are read through new tokens
    table = student.backbone.get_input_embeddings().weight.detach()
    assert (table[base:].abs().sum(1) > 0).all()
    en = train.subset(np.asarray(train.langs) == train.languages.index("en"))
    got = student.encode(en.texts())
    want = shards.to_numpy(cache.table(["embedding"]).column("embedding"))[en.rows]
    assert np.abs(got - want).max() < 1e-3  # the toy cache is float16
    # and the losses agree: mse of the teacher's English against its own cache is 0 at step 0
    from mclip.train import losses

    emb = torch.from_numpy(student.encode(en.texts(), normalize=False))
    assert float(np.linalg.norm(emb.numpy(), axis=1).mean()) > 1.5  # not unit: the loss must normalise it
    parts = losses.distillation(
        emb, torch.from_numpy(want), torch.arange(len(want)), torch.eye(len(want), dtype=torch.bool), "mse"
    )
    assert parts["mse"].item() < 1e-7


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_a_learnt_temperature_pushed_below_the_floor_comes_back(toy, tmp_path):
    from mclip.config import MIN_TEMPERATURE
    from mclip.models.student import load as load_student

    student = load_student(toy["root"] / "run-final") if (toy["root"] / "run-final").exists() else None
    model = Distiller(student or _tiny_student(toy), 0.05, learn_temperature=True)
    with torch.no_grad():
        model.log_temperature.fill_(np.log(MIN_TEMPERATURE) - 0.5)  # where momentum can carry it
    model.clamp_temperature_()
    assert model.temperature().item() == pytest.approx(MIN_TEMPERATURE, rel=1e-6)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    from mclip.train import losses

    losses.info_nce(s, t, torch.arange(4), torch.eye(4, dtype=torch.bool), model.temperature())["infonce"].backward()
    assert model.log_temperature.grad.abs() > 0  # at the floor it still has a gradient, so it can move back up
    fixed = Distiller(_tiny_student(toy), 0.001, learn_temperature=False)
    fixed.clamp_temperature_()
    assert fixed.temperature().item() == pytest.approx(0.001)  # a fixed temperature is the user's, floor or not
    with pytest.raises(ConfigError, match="below the floor 0.01 of a learnt temperature"):
        TrainConfig(data="d", cache="c", out="o", loss="cl", temperature=0.005)


def _tiny_student(toy):
    from mclip.models.student import build_student

    return build_student(str(toy["student"]), 8, projection_init="random")


def test_resume_with_an_optimizer_state_that_does_not_fit_is_one_line(toy, tmp_path):
    from mclip.store import verify

    out = tmp_path / "run"
    run(_config(toy, out, max_steps=3, save_every=2))
    folder = checkpoints(out)[0][1]  # step 2
    _killed_after(out, 2)
    state = torch.load(folder / "trainer.pt", weights_only=True)
    state["optimizer"]["param_groups"].pop()  # as a checkpoint from a version with other parameter groups
    torch.save(state, folder / "trainer.pt")
    verify.write_checksums(folder)
    with pytest.raises(UserError, match="optimizer state in .* does not fit this run .*--overwrite to start over"):
        run(_config(toy, out, max_steps=3, resume=True))


def test_training_gathers_targets_from_the_memory_map_and_never_copies_a_whole_column(toy, tmp_path, monkeypatch):
    """At laion28m x 512 dims a float copy of the targets is 56 GB per rank: the run must only gather the rows it uses."""
    from mclip.store import shards as mshards
    from mclip.store.columns import Column

    def no_whole_column(*args, **kwargs):
        raise AssertionError("a whole cache column was copied")

    monkeypatch.setattr(mshards, "to_numpy", no_whole_column)
    monkeypatch.setattr(mshards.TeacherCache, "embeddings", no_whole_column)
    gathered = []
    real = Column.gather
    monkeypatch.setattr(Column, "gather", lambda self, rows, *a: gathered.append(len(rows)) or real(self, rows, *a))
    out = tmp_path / "run"
    config = _config(toy, out, loss="cl", layer_kd=True, max_steps=3, num_workers=0, val_fraction=0.25, eval_every=2)
    _, val, _ = prepare_pairs(config, mshards.open_cache(config.cache), tmp_path / "pairs")
    validation = {
        len(val),
        len(np.unique(val.groups(np.arange(len(val))))),
    }  # evaluate(): its pairs' targets, then the gallery
    run(config)
    assert gathered and set(gathered) <= {16} | validation, (
        gathered
    )  # a batch's targets and layers, or the validation's
    assert not (out / ".pairs").exists()  # the pairs' scratch folder goes when the run finishes


# ---- settings not taken as given: honoured, or warned of in the log and the run's summary ----


def test_continuing_an_mclip_student_honours_extend_vocab_and_max_length(toy, tmp_path):
    """--student FINAL/ once ignored --extend-vocab and --max-length while final/mclip.json recorded them."""
    first = load(run(_config(toy, tmp_path / "first", max_steps=1, warmup_steps=1)).final)
    changes = dict(max_steps=1, warmup_steps=1, extend_vocab=True, extend_vocab_words=1, max_length=16)
    second = run(_config(toy, tmp_path / "second", student=str(tmp_path / "first" / "final"), **changes))
    after = load(second.final)
    assert len(after.tokenizer) > len(first.tokenizer)
    assert after.meta["added_tokens"] == len(after.tokenizer) - len(first.tokenizer)
    assert after.backbone.get_input_embeddings().weight.shape[0] == len(after.tokenizer)
    assert after.max_length == 16 == after.meta["train"]["max_length"] and first.max_length == 64


def _warned(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("mclip: warning: ")]


def test_warmup_longer_than_the_run_is_warned_in_the_log_and_the_summary(toy, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    result = run(_config(toy, out, max_steps=3, warmup_steps=1000))
    line = (
        "--warmup-steps 1000 is longer than the run's 3 steps, so the learning rate peaks at 6e-06, not --lr 0.002; "
        "lower --warmup-steps (e.g. 1)"
    )
    assert _warned(capsys) == [f"mclip: warning: {line}"] and result.warnings == [line]
    for name in ("summary.json", "config.json"):
        assert json.loads((out / name).read_text(encoding="utf-8"))["warnings"] == [line]


def test_a_max_length_above_the_students_positions_is_warned_and_the_limit_in_effect_recorded(toy, tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    result = run(_config(toy, out, max_steps=1, warmup_steps=1, max_length=100))
    line = (
        f"--max-length 100 is above the 64 positions of student {toy['student']}; captions are cut at 64 tokens "
        "(recorded as max_length)"
    )
    assert _warned(capsys) == [f"mclip: warning: {line}"] and result.warnings == [line]
    for name in ("summary.json", "config.json"):
        record = json.loads((out / name).read_text(encoding="utf-8"))
        assert record["max_length"] == 64 and record["warnings"] == [line]
    assert load(result.final).max_length == 64


def test_validation_r1_counts_ties_against_the_query_as_stage_3_does(toy, tmp_path, monkeypatch):
    """A student whose embeddings are all zero ties every English caption: stage 3 scores that R@1 = 0, and so must
    validation (argmax once gave the queries of the first gallery item a hit)."""
    from mclip.models.student import StudentEncoder

    zeros = lambda self, texts, **kw: np.zeros((len(texts), self.dim), np.float32)  # noqa: E731
    monkeypatch.setattr(StudentEncoder, "encode", zeros)
    out = tmp_path / "run"
    run(_config(toy, out, max_steps=1, warmup_steps=1, val_fraction=0.25))
    val = _records(out, "val")[-1]
    assert val["val_r1_zh"] == 0.0 and val["val_r1_de"] == 0.0, val


def test_validation_rank_one_is_stage_3s_rank_one_on_ties():
    """Stage 2 may not import stage 3, so validation applies the tie rule itself: on seeded scores with ties (equal
    gallery items, all-zero queries, near-equal scores within the tolerance), its hits equal ranks_from_labels <= 1."""
    from mclip.evaluate.metrics import ranks_from_labels
    from mclip.train.run import _first_without_ties

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(200, 7)).astype(np.float32) / 4  # few values: many exact ties
    scores[:20] = 0.0  # a query scoring every item alike
    scores[20:40, 1] = scores[20:40, 0] + 5e-7  # within the tolerance: a tie
    relevant = rng.integers(0, 7, size=200)
    ours = _first_without_ties(torch.from_numpy(scores), torch.from_numpy(relevant)).numpy()
    labels = np.arange(7)
    stage3 = ranks_from_labels(np.broadcast_to(labels, scores.shape), np.ones(scores.shape, bool), scores, relevant, 7)
    assert np.array_equal(ours, stage3 <= 1) and 0 < ours.sum() < 200
