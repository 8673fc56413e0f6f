"""Stage 3 end to end on tiny models: a tiny BERT teacher's cache, students saved and loaded through mclip.json."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mclip.cli import main
from mclip.config import EmbedConfig, EvalConfig
from mclip.embed.run import run as embed
from mclip.errors import UserError
from mclip.evaluate import metrics as retrieval
from mclip.evaluate.run import run
from mclip.models.student import build_student
from mclip.store import shards
from tests import tiny
from tests.evaluate.test_metrics import oracle_ranks


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run several times faster on one thread than on two contended ones (torch and FAISS both spin)."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


N = 24


def caption(i: int) -> str:
    return f"{tiny.CORPUS[i % len(tiny.CORPUS)]} number {i}"


def parallel_rows(n: int = N) -> list[dict]:
    """de is a copy of English (an identity student must be perfect on it), sh a derangement of it (R@1 must be 0),
    fr other text."""
    return [
        {
            "id": f"c{i:03d}",
            "caption": caption(i),
            "caption_de": caption(i),
            "caption_sh": caption((i + 1) % n),
            "caption_fr": f"{tiny.CORPUS[(3 * i + 5) % len(tiny.CORPUS)]} nombre {i}",
        }
        for i in range(n)
    ]


def identity_student(teacher: Path, manifest: dict, folder: Path, record: bool = True) -> Path:
    """The teacher's own encoder as a student (mean pool + identity projection): it reproduces the cache exactly."""
    student = build_student(
        str(teacher), dim=manifest["dim"], meta={"teacher": manifest["teacher"]} if record else None
    )
    with torch.no_grad():
        student.projection.weight.copy_(torch.eye(manifest["dim"]))
        student.projection.bias.zero_()
    student.save(folder)
    return folder


@pytest.fixture(scope="module")
def setup(bert_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = tiny.write_captions(root / "parallel.jsonl", parallel_rows())
    cache = embed(
        EmbedConfig(
            data=str(data),
            out=str(root / "cache"),
            teacher=str(bert_teacher),
            id_column="id",
            dtype="float32",
            progress=False,
        )
    )
    model = identity_student(bert_teacher, cache.manifest, root / "model")
    return {
        "root": root,
        "data": data,
        "cache": root / "cache",
        "model": model,
        "manifest": cache.manifest,
        "teacher": bert_teacher,
    }


def config(setup, out, **overrides) -> EvalConfig:
    values = dict(
        model=str(setup["model"]),
        cache=str(setup["cache"]),
        data=str(setup["data"]),
        out=str(out),
        languages=("de",),
        split="train",  # the split datasets names a local file
        progress=False,
    )
    values.update(overrides)
    return EvalConfig(**values)


def test_identity_student_is_perfect_a_derangement_scores_zero_and_the_report_is_written(setup, tmp_path):
    result = run(config(setup, tmp_path / "out", languages=("de", "sh", "fr"), teacher_baseline=True))
    m = result.metrics
    for key in (
        "de/text_to_text",
        "de/text_to_text_reverse",
        "en/text_to_text",
        "en/text_to_text_reverse",
        "de/teacher_baseline/text_to_text",
    ):
        assert m[f"{key}/R@1"] == m[f"{key}/MRR@10"] == 1.0, key
    assert m["sh/text_to_text/R@1"] == 0.0  # each caption's exact text belongs to another id
    assert m["sh/text_to_text/R@10"] > 0.0
    for name in ("R@1", "R@5", "R@10", "MRR@10"):
        per_language = [m[f"{code}/text_to_text/{name}"] for code in ("de", "sh", "fr")]
        assert m[f"avg/text_to_text/{name}"] == pytest.approx(np.mean(per_language))
        assert f"avg/teacher_baseline/text_to_text_reverse/{name}" in m
    assert not any(k.startswith("en/teacher_baseline/text_to_text") for k in m)  # trivially perfect: not reported
    assert result.counts["de"] == {"captions": N, "english_targets": N, "missing_ids": 0, "empty": 0}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "metrics.json", "r_at_1.png", "report.md"]
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    report = (out / "report.md").read_text()
    assert "| de | student | de→en | text_to_text | 24 | 24 | 100.0 | 100.0 | 100.0 | 100.0 |" in report
    assert "| sh | student | sh→en | text_to_text | 24 | 24 | 0.0 |" in report
    assert (out / "r_at_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["config"]["languages"] == ["de", "sh", "fr"]
    assert saved["model_teacher"]["fingerprint"] == setup["manifest"]["teacher"]["fingerprint"]


def test_metrics_equal_a_brute_force_oracle_on_a_real_student(setup, bert_student, tmp_path):
    student = build_student(
        str(bert_student), dim=setup["manifest"]["dim"], meta={"teacher": setup["manifest"]["teacher"]}
    )
    student.save(tmp_path / "student")
    result = run(config(setup, tmp_path / "out", model=str(tmp_path / "student"), languages=("fr",)))
    cache = shards.open_cache(setup["cache"])
    teacher_en = retrieval.l2_normalize(cache.embeddings())  # cache rows follow the data rows here, one per id
    queries = retrieval.l2_normalize(student.encode([r["caption_fr"] for r in parallel_rows()]))
    ranks = oracle_ranks(queries, teacher_en, np.arange(N), np.arange(N))
    for k in (1, 5, 10):
        assert result.metrics[f"fr/text_to_text/R@{k}"] == pytest.approx(np.mean(ranks <= k), abs=1e-9)


def test_ivf_index_probing_every_list_gives_the_exact_numbers(setup, tmp_path):
    exact = run(config(setup, tmp_path / "flat", languages=("fr",))).metrics
    ivf = run(config(setup, tmp_path / "ivf", languages=("fr",), index="IVF2,Flat", nprobe=2)).metrics
    assert ivf == exact


def test_limit_scores_the_first_captions_only(setup, tmp_path):
    result = run(config(setup, tmp_path / "out", limit=5))
    assert result.counts["de"]["captions"] == result.counts["en"]["captions"] == 5
    assert result.metrics["de/text_to_text/R@1"] == 1.0


def test_long_format_data_and_ids_missing_from_the_cache_are_counted(setup, tmp_path):
    rows = [{"id": r["id"], "lang": "de", "text": r["caption_de"]} for r in parallel_rows()]
    rows += [{"id": f"extra{i}", "lang": "de", "text": "ein Hund im Park"} for i in range(3)]
    data = tiny.write_captions(tmp_path / "long.jsonl", rows)
    result = run(config(setup, tmp_path / "out", data=str(data)))
    assert result.counts["de"]["missing_ids"] == 3 and result.counts["de"]["captions"] == N
    assert any("3 of 27 ids are not in the cache" in w for w in result.warnings)
    assert result.metrics["de/text_to_text/R@1"] == 1.0
    assert result.counts["en"]["captions"] == N  # no English in the data: the cache's own captions of the scored ids


def test_model_without_a_teacher_record_is_scored_with_a_warning(setup, tmp_path):
    model = identity_student(setup["teacher"], setup["manifest"], tmp_path / "model", record=False)
    result = run(config(setup, tmp_path / "out", model=str(model)))
    assert [w for w in result.warnings if "records no teacher" in w] and len(result.warnings) == 1
    assert result.metrics["de/text_to_text/R@1"] == 1.0


def test_model_may_be_a_run_folder(setup, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "final").parent.mkdir()
    (run_dir / "final").symlink_to(setup["model"], target_is_directory=True)
    assert run(config(setup, tmp_path / "out", model=str(run_dir))).metrics["de/text_to_text/R@1"] == 1.0


def test_a_bf16_cache_has_the_fp32_fingerprint_and_passes_the_baseline_check(setup, tmp_path):
    """A cache made at bf16 (as on a GPU) records the checkpoint's fp32 fingerprint, so a CPU baseline accepts it."""
    bf16 = embed(
        EmbedConfig(
            data=str(setup["data"]),
            out=str(tmp_path / "cache"),
            teacher=str(setup["teacher"]),
            id_column="id",
            precision="bf16",
            progress=False,
        )
    )
    assert (
        bf16.manifest["precision"] == "bf16"
        and bf16.manifest["teacher"]["fingerprint"] == setup["manifest"]["teacher"]["fingerprint"]
    )
    model = identity_student(setup["teacher"], bf16.manifest, tmp_path / "model")
    result = run(
        config(setup, tmp_path / "out", model=str(model), cache=str(tmp_path / "cache"), teacher_baseline=True)
    )
    assert result.metrics["de/teacher_baseline/text_to_text/R@1"] == 1.0 and not result.warnings


def test_tiny_batches_give_the_metrics_of_one_batch(setup, tmp_path):
    """Queries encoded, searched and added in batches of 1 and 5, and galleries added 1 and 5 at a time: the same numbers."""
    whole = run(config(setup, tmp_path / "whole", languages=("de", "sh", "fr"), teacher_baseline=True, limit=17))
    for size in (1, 5):
        parts = run(
            config(
                setup,
                tmp_path / f"b{size}",
                languages=("de", "sh", "fr"),
                teacher_baseline=True,
                limit=17,
                query_batch_size=size,
                batch_size=2,
            )
        )
        assert parts.metrics == whole.metrics and parts.counts == whole.counts and parts.rows == whole.rows


def test_the_on_disk_passes_in_tiny_blocks_give_the_metrics_of_one_pass(setup, tmp_path, monkeypatch):
    """Captions read 3 rows at a time, targets labelled 4 captions at a time and placed 2 at a time, English captions
    shared by pairs of ids (a target with several captions): the same metrics, counts and rows, at any batch size."""
    from mclip.evaluate import captions as eval_captions
    from mclip.evaluate import gallery as eval_gallery
    from mclip.store import captions

    rows = parallel_rows()
    for i in range(1, N, 2):
        rows[i]["caption"] = rows[i - 1]["caption"]
    data = tiny.write_captions(tmp_path / "dups.jsonl", rows)
    embed(
        EmbedConfig(
            data=str(data),
            out=str(tmp_path / "cache"),
            teacher=str(setup["teacher"]),
            id_column="id",
            dtype="float32",
            shard_size=5,
            progress=False,
        )
    )
    kw = dict(cache=str(tmp_path / "cache"), data=str(data), languages=("de", "sh"), teacher_baseline=True)
    whole = run(config(setup, tmp_path / "whole", **kw))
    monkeypatch.setattr(captions, "CHUNK", 3)
    monkeypatch.setattr(eval_captions, "BLOCK", 4)
    monkeypatch.setattr(eval_gallery, "BLOCK", 4)
    monkeypatch.setattr(eval_gallery, "PART", 2)
    for size in (1, 7):
        parts = run(config(setup, tmp_path / f"b{size}", query_batch_size=size, **kw))
        assert parts.metrics == whole.metrics and parts.counts == whole.counts and parts.rows == whole.rows
    assert whole.counts["de"]["english_targets"] == N // 2 and whole.counts["en"]["captions"] == N


def test_an_index_trained_on_a_bounded_sample_probing_every_list_gives_the_exact_numbers(setup, tmp_path, monkeypatch):
    exact = run(config(setup, tmp_path / "flat", languages=("fr",))).metrics
    monkeypatch.setattr(retrieval, "TRAIN_MIN", 6)  # 24 targets and 24 captions: both indexes train on a sample of 6
    monkeypatch.setattr(retrieval, "TRAIN_PER_LIST", 3)
    assert (
        run(config(setup, tmp_path / "ivf", languages=("fr",), index="IVF2,Flat", nprobe=2, query_batch_size=4)).metrics
        == exact
    )


def rewrite_cache(cache: Path, out: Path, group=None) -> Path:
    """A copy of a cache whose caption_group column is `group(text, row)` per row, or, with group=None, dropped (the
    version-1 format, written before stage 1 had the column)."""
    import pyarrow as pa

    out.mkdir()
    manifest = json.loads((cache / shards.MANIFEST).read_text())
    row = 0
    for entry in manifest["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(cache / entry["file"]))).read_all()
        if "caption_group" in table.column_names:
            table = table.drop_columns(["caption_group"])
        if group is not None:
            values = [group(text, row + i) for i, text in enumerate(table.column("text").to_pylist())]
            table = table.append_column(
                pa.field("caption_group", pa.int64(), nullable=False), pa.array(values, pa.int64())
            )
        path = shards.write_shard(
            out,
            int(entry["file"][6:11]),
            table.replace_schema_metadata(None),
            {"rows": table.num_rows, "first_row": row},
        )
        entry.update(sha256=shards.file_sha256(path), bytes=path.stat().st_size)
        row += table.num_rows
    shards.write_manifest(out, dict(manifest, format_version=2 if group is not None else 1))
    return out


def test_identical_english_captions_are_one_target_by_caption_group_or_else_by_text(setup, tmp_path):
    rows = parallel_rows()
    for i in range(1, N, 2):
        rows[i]["caption"] = rows[i]["caption_de"] = rows[i - 1]["caption"]  # 12 English captions, each of two ids
    data = tiny.write_captions(tmp_path / "dups.jsonl", rows)
    embed(
        EmbedConfig(
            data=str(data),
            out=str(tmp_path / "cache"),
            teacher=str(setup["teacher"]),
            id_column="id",
            dtype="float32",
            shard_size=7,
            progress=False,
        )
    )
    by_group = run(
        config(setup, tmp_path / "group", cache=str(tmp_path / "cache"), data=str(data))
    )  # stage 1's caption_group
    assert by_group.counts["de"]["english_targets"] == 12 and by_group.metrics["de/text_to_text/R@1"] == 1.0
    v1 = rewrite_cache(tmp_path / "cache", tmp_path / "v1")  # no caption_group: grouped by the text
    assert "caption_group" not in shards.open_cache(v1).dataset().schema.names
    by_text = run(config(setup, tmp_path / "text", cache=str(v1), data=str(data)))
    assert by_text.metrics == by_group.metrics and by_text.counts == by_group.counts
    fours = rewrite_cache(
        tmp_path / "cache", tmp_path / "fours", lambda text, row: row // 4
    )  # the column, not the text, decides
    result = run(config(setup, tmp_path / "o2", cache=str(fours), data=str(data)))
    assert result.counts["de"]["english_targets"] == N // 4
    cached = retrieval.l2_normalize(
        shards.open_cache(fours).embeddings()
    )  # cache rows follow the data rows, one per id
    labels = np.arange(N) // 4
    ranks = oracle_ranks(
        cached, cached[::4], labels, np.arange(N // 4)
    )  # the identity student's de text is the English text
    for k in (1, 5, 10):
        assert result.metrics[f"de/text_to_text/R@{k}"] == pytest.approx(np.mean(ranks <= k), abs=1e-9)
    assert result.metrics["de/text_to_text/R@1"] < 1.0


def one_line_error(cfg: EvalConfig, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        run(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_errors_dimension_teacher_language_ids_index_images(setup, bert_student, tmp_path):
    other_dim = build_student(str(bert_student), dim=8, meta={"teacher": setup["manifest"]["teacher"]}).save(
        tmp_path / "dim8"
    )
    one_line_error(config(setup, tmp_path / "o1", model=str(other_dim)), "makes 8-d embeddings but cache .* holds 24-d")
    stranger = dict(setup["manifest"]["teacher"], name="someone/else", fingerprint="0" * 32)
    other_teacher = build_student(str(bert_student), dim=24, meta={"teacher": stranger}).save(tmp_path / "other")
    one_line_error(
        config(setup, tmp_path / "o2", model=str(other_teacher)),
        "was made by teacher .* but model .* was distilled from 'someone/else'",
    )
    one_line_error(config(setup, tmp_path / "o3", languages=("ja",)), "column 'caption_ja' for language 'ja' not found")
    strangers = tiny.write_captions(
        tmp_path / "strangers.jsonl", [{"id": f"x{i}", "caption": "a", "caption_de": "b"} for i in range(3)]
    )
    one_line_error(config(setup, tmp_path / "o4", data=str(strangers)), "none of the ids in .* are in cache")
    one_line_error(config(setup, tmp_path / "o5", index="IVF4,Nonsense"), "FAISS rejects index 'IVF4,Nonsense'")
    one_line_error(config(setup, tmp_path / "o6", images=True), "holds no image embeddings")
    one_line_error(config(setup, tmp_path / "o7", model=str(tmp_path)), "is not an mclip student")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))  # a refused run leaves no folder behind


def test_out_folder_is_refused_unless_overwrite_replaces_a_previous_eval(setup, tmp_path):
    out = tmp_path / "out"
    run(config(setup, out))
    one_line_error(config(setup, out), "is not empty; .* --overwrite")
    first = (out / "metrics.json").read_text()
    run(config(setup, out, overwrite=True, languages=("fr",)))
    assert (out / "metrics.json").read_text() != first and "fr/text_to_text/R@1" in json.loads(
        (out / "metrics.json").read_text()
    )
    (out / "notes.txt").write_text("mine")
    one_line_error(config(setup, out, overwrite=True), "holds files eval-retrieval did not write \\(notes.txt\\)")
    assert (out / "notes.txt").read_text() == "mine"


def test_scratch_lives_in_out_while_the_run_works_and_goes_after(setup, tmp_path, monkeypatch):
    from mclip.evaluate import gallery as eval_gallery

    out, seen = tmp_path / "out", []
    score = eval_gallery.score
    monkeypatch.setattr(
        eval_gallery,
        "score",
        lambda part, lang, cache, model, teacher, values, cfg, work: (
            seen.append(work),
            score(part, lang, cache, model, teacher, values, cfg, work),
        )[1],
    )
    (out / ".scratch").mkdir(parents=True)
    (out / ".scratch" / "left").write_text("by a killed run")  # is cleared, not refused
    run(config(setup, out, overwrite=True))
    assert seen and all(work == out / ".scratch" for work in seen)  # on --out's disk, not $TMPDIR
    assert not (out / ".scratch").exists() and (out / "metrics.json").exists()


def test_cli_runs_and_errors_are_one_line_exit_2(setup, tmp_path, capsys):
    args = [
        "eval-retrieval",
        "--model",
        str(setup["model"]),
        "--cache",
        str(setup["cache"]),
        "--data",
        str(setup["data"]),
        "--languages",
        "de,fr",
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as exit_info:  # the default --split test names nothing in a local file
        main(args + ["--out", str(tmp_path / "out0")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == (
        f"mclip: error: split 'test' does not apply to {setup['data']}: local files are read whole, as the one split "
        "datasets names 'train'; pass --split train (--val-split train for --val-data), or a dataset that has splits"
    )
    assert not (tmp_path / "out0").exists()
    args += ["--split", "train"]
    main(args + ["--out", str(tmp_path / "out"), "--ks", "1,3"])
    printed = capsys.readouterr().out
    assert "de→en" in printed and "R@3" in printed and "MRR@3" in printed
    assert "de/text_to_text/R@3" in json.loads((tmp_path / "out" / "metrics.json").read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--out", str(tmp_path / "out2"), "--index", "HNSW-bad"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mclip: error: FAISS rejects index 'HNSW-bad'") and "\n" not in err


# ---- images: a tiny CLIP cache with several captions per image ----


@pytest.fixture(scope="module")
def image_setup(clip_teacher, bert_student, tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("eval_images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):  # 4 images, 3 captions each
        image = root / f"img{i // 3}.png"
        if not image.exists():
            Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(image)
        rows.append(
            {
                "id": f"c{i}",
                "caption": caption(i),
                "caption_de": f"{tiny.CORPUS[(i + 6) % len(tiny.CORPUS)]} {i}",
                "image": str(image),
                "image_id": f"img{i // 3}",
            }
        )
    data = tiny.write_captions(root / "data.jsonl", rows)
    cache = embed(
        EmbedConfig(
            data=str(data),
            out=str(root / "cache"),
            teacher=str(clip_teacher),
            id_column="id",
            image_column="image",
            image_id_column="image_id",
            dtype="float32",
            progress=False,
        )
    )
    student = build_student(str(bert_student), dim=cache.manifest["dim"], meta={"teacher": cache.manifest["teacher"]})
    student.save(root / "model")
    return {
        "root": root,
        "data": data,
        "cache": root / "cache",
        "model": root / "model",
        "rows": rows,
        "student": student,
    }


def test_text_image_metrics_with_several_captions_per_image_match_the_oracle(image_setup, tmp_path):
    s = image_setup
    result = run(
        EvalConfig(
            model=str(s["model"]),
            cache=str(s["cache"]),
            data=str(s["data"]),
            split="train",
            out=str(tmp_path / "out"),
            languages=("de",),
            ks=(1, 2),
            progress=False,
        )
    )
    m = result.metrics
    assert result.counts["de"]["images"] == 4
    sizes = {(r["lang"], r["system"], r["direction"]): (r["queries"], r["gallery"]) for r in result.rows}
    assert sizes[("de", "student", "text_to_image")] == (12, 4) and sizes[("de", "student", "image_to_text")] == (4, 12)
    cache = shards.open_cache(s["cache"])
    table = cache.table(["image_id", "image_embedding"])
    image_ids = table.column("image_id").to_pylist()
    first = [image_ids.index(f"img{j}") for j in range(4)]
    images = retrieval.l2_normalize(shards.to_numpy(table.column("image_embedding"))[first])
    texts = retrieval.l2_normalize(s["student"].encode([r["caption_de"] for r in s["rows"]]))
    owner = np.repeat(np.arange(4), 3)
    t2i = oracle_ranks(texts, images, owner, np.arange(4))
    i2t = oracle_ranks(images, texts, np.arange(4), owner)
    for k in (1, 2):
        assert m[f"de/text_to_image/R@{k}"] == pytest.approx(np.mean(t2i <= k))
        assert m[f"de/image_to_text/R@{k}"] == pytest.approx(np.mean(i2t <= k))
    assert "en/teacher_baseline/text_to_image/R@1" in m and "en/teacher_baseline/text_to_text/R@1" not in m
    assert "| de | student | img→de | image_to_text | 4 | 12 |" in (tmp_path / "out" / "report.md").read_text()
    no_images = run(
        EvalConfig(
            model=str(s["model"]),
            cache=str(s["cache"]),
            data=str(s["data"]),
            split="train",
            out=str(tmp_path / "out2"),
            languages=("de",),
            images=False,
            progress=False,
        )
    )
    assert not any("image" in k for k in no_images.metrics)
    batched = run(
        EvalConfig(
            model=str(s["model"]),
            cache=str(s["cache"]),
            data=str(s["data"]),
            split="train",
            out=str(tmp_path / "out3"),
            languages=("de",),
            ks=(1, 2),
            query_batch_size=2,
            progress=False,
        )
    )
    assert batched.metrics == m  # images and captions searched and added two at a time
