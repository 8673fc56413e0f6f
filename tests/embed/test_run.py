"""Stage 1 end to end: the cache contract, input formats, dedup, batching invariance, layers, images, resume, torchrun."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import mclip
from mclip.config import EmbedConfig
from mclip.embed.run import run
from mclip.errors import UserError
from mclip.models.teacher import load_teacher
from mclip.store import shards
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
LONG = " ".join(["a cat sitting on a red sofa"] * 12)  # over 77 CLIP tokens


def _run(data, out, teacher, **kw):
    return run(EmbedConfig(data=str(data), out=str(out), teacher=str(teacher), progress=False, **kw))


def _by_id(out, column="embedding") -> dict[str, np.ndarray]:
    cache = shards.open_cache(out)
    ids = cache.ids()
    assert len(set(ids)) == len(ids), "every id exactly once"
    return dict(zip(ids, cache.embeddings(column)))


def _assert_same(a: dict, b: dict, atol=1e-5):
    assert list(a) == list(b)
    for key, value in a.items():
        np.testing.assert_allclose(value, b[key], atol=atol, err_msg=str(key))


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


@pytest.mark.parametrize("dtype,arrow,atol", [("float16", pa.float16(), 2e-3), ("float32", pa.float32(), 1e-5)])
def test_cache_contract(tmp_path, clip_teacher, captions, dtype, arrow, atol):
    import datasets
    import pyarrow.dataset as pads

    out = tmp_path / "cache"
    result = _run(captions, out, clip_teacher, id_column="id", dtype=dtype, shard_size=7)
    assert (result.rows, result.shards, result.computed_shards, result.captions) == (20, 3, 3, 20) and result.tokens > 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest == result.manifest
    teacher = load_teacher(str(clip_teacher))
    assert (
        manifest["teacher"]["name"] == str(clip_teacher)
        and manifest["teacher"]["fingerprint"] == teacher.info().fingerprint
    )
    assert {
        k: manifest[k]
        for k in (
            "format",
            "complete",
            "kind",
            "pooling",
            "dim",
            "dtype",
            "normalized",
            "max_length",
            "caption_column",
            "id_column",
            "image_column",
            "layers",
            "mclip_version",
        )
    } == {
        "format": shards.FORMAT,
        "complete": True,
        "kind": "clip",
        "pooling": "clip_projection",
        "dim": 16,
        "dtype": dtype,
        "normalized": True,
        "max_length": 77,
        "caption_column": "caption",
        "id_column": "id",
        "image_column": None,
        "layers": [],
        "mclip_version": mclip.__version__,
    }
    assert manifest["totals"] == {
        "input_rows": 20,
        "rows": 20,
        "skipped": 0,
        "truncated": 0,
        "duplicates": 0,
        "distinct_captions": 20,
        "embedded": 20,
    }
    assert manifest["format_version"] == shards.FORMAT_VERSION == 2
    assert [(s["file"], s["rows"], s["first_row"], s["end_row"]) for s in manifest["shards"]] == [
        ("shard-00000.arrow", 7, 0, 7),
        ("shard-00001.arrow", 7, 7, 14),
        ("shard-00002.arrow", 6, 14, 20),
    ]
    assert all(s["sha256"] == shards.file_sha256(out / s["file"]) for s in manifest["shards"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [s["file"] for s in manifest["shards"]]

    files = [str(out / s["file"]) for s in manifest["shards"]]
    table = pads.dataset(files, format="arrow").to_table()
    assert table.schema.names == ["id", "text", "caption_group", "embedding"]
    assert table.column("caption_group").to_pylist() == list(range(20))  # twenty distinct captions: each its own group
    assert table.schema.field("id").type == pa.string() and table.schema.field("embedding").type == pa.list_(arrow, 16)
    rows = _rows(captions)
    assert table.column("id").to_pylist() == [r["id"] for r in rows] and table.column("text").to_pylist() == [
        r["caption"] for r in rows
    ]
    hf = datasets.load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert hf["id"] == [r["id"] for r in rows]

    cache = shards.open_cache(out)
    assert cache.verify() == []
    emb = cache.embeddings()
    np.testing.assert_allclose(np.asarray(hf["embedding"], dtype=np.float32), emb)
    np.testing.assert_allclose(emb, teacher.encode([r["caption"] for r in rows]), atol=atol)


def test_ids_are_row_numbers_or_the_id_column_as_strings(tmp_path, clip_text_teacher):
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"key": 100 + i, "caption": tiny.CORPUS[i]} for i in range(5)])
    _run(data, tmp_path / "a", clip_text_teacher)
    assert shards.open_cache(tmp_path / "a").ids() == ["0", "1", "2", "3", "4"]
    _run(data, tmp_path / "b", clip_text_teacher, id_column="key")
    assert shards.open_cache(tmp_path / "b").ids() == ["100", "101", "102", "103", "104"]
    _assert_same(
        dict(zip(range(5), _by_id(tmp_path / "a").values())),
        dict(zip(range(5), _by_id(tmp_path / "b").values())),
        atol=0,
    )
    assert shards.open_cache(_run(data, tmp_path / "c", clip_text_teacher, limit=3).out).ids() == ["0", "1", "2"]


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same twelve captions as jsonl, csv, parquet, two-file glob, save_to_disk Dataset and DatasetDict."""
    import datasets

    folder = tmp_path_factory.mktemp("formats")
    ds = datasets.Dataset.from_list([{"id": f"r{i}", "caption": tiny.CORPUS[i]} for i in range(12)])
    ds.to_json(folder / "rows.jsonl")
    ds.to_csv(folder / "rows.csv", index=False)
    ds.to_parquet(folder / "rows.parquet")
    ds.select(range(5)).to_parquet(folder / "part-0.parquet")
    ds.select(range(5, 12)).to_parquet(folder / "part-1.parquet")
    ds.save_to_disk(str(folder / "disk"))
    datasets.DatasetDict({"train": ds.select(range(2)), "test": ds}).save_to_disk(str(folder / "diskdict"))
    return folder


@pytest.mark.parametrize(
    "source,split",
    [
        ("rows.csv", "train"),
        ("rows.parquet", "train"),
        ("part-*.parquet", "train"),
        ("disk", "train"),
        ("diskdict", "test"),
    ],
)
def test_input_formats_give_the_same_cache(tmp_path, formats, clip_text_teacher, source, split):
    ref = tmp_path / "ref"
    _run(formats / "rows.jsonl", ref, clip_text_teacher, id_column="id", dtype="float32")
    _run(formats / source, tmp_path / "out", clip_text_teacher, id_column="id", dtype="float32", split=split)
    _assert_same(_by_id(tmp_path / "out"), _by_id(ref), atol=0)


def test_truncation_is_the_tokenizers_and_is_counted(tmp_path, clip_text_teacher):
    import torch
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    texts = ["red apple", LONG, "green tree", LONG + " again", LONG]  # the last repeats: counted per row
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"caption": t} for t in texts])
    result = _run(data, tmp_path / "out", clip_text_teacher, dtype="float32")
    assert result.totals["truncated"] == 3 and result.totals["duplicates"] == 1
    batch = AutoTokenizer.from_pretrained(clip_text_teacher)(
        texts, truncation=True, max_length=77, padding=True, return_tensors="pt"
    )
    assert batch["input_ids"].shape[1] == 77
    with torch.no_grad():
        ref = CLIPTextModelWithProjection.from_pretrained(clip_text_teacher).eval()(**batch).text_embeds
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(shards.open_cache(tmp_path / "out").embeddings(), ref, atol=1e-5)
    # a lower --max-length truncates more, and is recorded
    result = _run(data, tmp_path / "short", clip_text_teacher, max_length=8)
    assert result.totals["truncated"] == 5 and result.manifest["max_length"] == 8


def test_dedup_embeds_each_caption_once(tmp_path, bert_teacher):
    texts = ["red apple", "green tree", "red apple", "blue car on the street", "red apple", "green tree"]
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"id": f"x{i}", "caption": t} for i, t in enumerate(texts)])
    dedup = _run(data, tmp_path / "dedup", bert_teacher, id_column="id", dtype="float32")
    assert dedup.captions == 3 and dedup.totals["duplicates"] == 3 and dedup.totals["rows"] == 6
    emb = _by_id(tmp_path / "dedup")
    assert list(emb) == [f"x{i}" for i in range(6)]
    assert (
        np.array_equal(emb["x0"], emb["x2"])
        and np.array_equal(emb["x0"], emb["x4"])
        and np.array_equal(emb["x1"], emb["x5"])
    )
    assert not np.allclose(emb["x0"], emb["x1"])
    plain = _run(data, tmp_path / "plain", bert_teacher, id_column="id", dtype="float32", dedup=False)
    assert plain.captions == 6 and plain.totals["duplicates"] == 0
    _assert_same(_by_id(tmp_path / "plain"), emb, atol=1e-6)


def _repeats(n: int) -> list[dict]:
    """n rows whose captions repeat across shards (and a few blank ones), ids k0.."""
    pool = ["red apple", "green tree", "blue car on the street", "", "a dog", "red apple", None, LONG]
    return [{"id": f"k{i}", "caption": pool[(i * 5) % len(pool)]} for i in range(n)]


def _groups_oracle(rows: list[dict]) -> list[int]:
    first: dict[str, int] = {}
    return [first.setdefault(r["caption"], i) for i, r in enumerate(rows) if r["caption"] and r["caption"].strip()]


def test_each_distinct_caption_is_embedded_once_per_cache(tmp_path, bert_teacher, monkeypatch):
    from mclip.embed import dedup, inputs
    from mclip.store import spill

    monkeypatch.setattr(spill, "PARTITION_ROWS", 4)  # several partitions, row buckets and input chunks
    monkeypatch.setattr(dedup, "BUCKET_ROWS", 8)
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 5)
    rows = _repeats(30)
    source = tiny.write_captions(tmp_path / "rows.jsonl", rows)
    dedup_run = _run(source, tmp_path / "dedup", bert_teacher, id_column="id", dtype="float32", shard_size=4)
    kept = len(_groups_oracle(rows))
    assert dedup_run.captions == 5 and dedup_run.totals == {
        "input_rows": 30,
        "rows": kept,
        "skipped": 30 - kept,
        "truncated": 4,
        "duplicates": kept - 5,
        "distinct_captions": 5,
        "embedded": 5,
    }
    plain = _run(source, tmp_path / "plain", bert_teacher, id_column="id", dtype="float32", shard_size=4, dedup=False)
    assert plain.captions == kept and plain.totals | {"duplicates": kept - 5, "embedded": 5} == dedup_run.totals
    for out in ("dedup", "plain"):  # caption_group is the same contract with or without --dedup
        table = shards.open_cache(tmp_path / out).table(["caption_group"])
        assert table.column(0).to_pylist() == _groups_oracle(rows)
        assert not (tmp_path / out / dedup.PLAN).exists()
    _assert_same(_by_id(tmp_path / "dedup"), _by_id(tmp_path / "plain"), atol=1e-6)


def test_a_killed_run_reuses_its_plan_and_finished_parts(tmp_path, bert_teacher, monkeypatch):
    from mclip.embed import dedup
    from mclip.embed import run as embed_teacher

    source = tiny.write_captions(tmp_path / "rows.jsonl", _repeats(30))
    ref = _run(source, tmp_path / "ref", bert_teacher, id_column="id", dtype="float32", shard_size=2)
    read_shard = embed_teacher._read_shard

    def dies_at_shard_3(k, *args, **kwargs):
        if k == 3:
            raise KeyboardInterrupt  # stands in for a kill after the units are embedded
        return read_shard(k, *args, **kwargs)

    monkeypatch.setattr(embed_teacher, "_read_shard", dies_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        _run(source, tmp_path / "out", bert_teacher, id_column="id", dtype="float32", shard_size=2)
    parts = tmp_path / "out" / dedup.PLAN / "parts"  # five distinct captions, units of two
    assert sorted(p.name for p in parts.iterdir()) == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    monkeypatch.setattr(embed_teacher, "_read_shard", read_shard)
    again = _run(source, tmp_path / "out", bert_teacher, id_column="id", dtype="float32", shard_size=2)
    assert again.captions == 0 and ref.captions == 5 and again.totals == ref.totals  # plan and every unit reused
    assert not (tmp_path / "out" / dedup.PLAN).exists() and shards.open_cache(tmp_path / "out").verify() == []
    _assert_same(_by_id(tmp_path / "out"), _by_id(tmp_path / "ref"), atol=0)


@pytest.mark.parametrize("which", ["clip_teacher", "bert_teacher"])
def test_results_do_not_depend_on_batching(tmp_path, captions, which, request):
    teacher = request.getfixturevalue(which)
    _run(captions, tmp_path / "a", teacher, id_column="id", dtype="float32", cache_layers=(1,))
    _run(
        captions,
        tmp_path / "b",
        teacher,
        id_column="id",
        dtype="float32",
        cache_layers=(1,),
        shard_size=3,
        batch_tokens=40,
        max_batch_size=3,
    )
    assert len(shards.open_cache(tmp_path / "b").files) == 7
    for column in ("embedding", "layer_1"):
        _assert_same(_by_id(tmp_path / "b", column), _by_id(tmp_path / "a", column), atol=1e-5)


@pytest.mark.parametrize("which", ["clip_teacher", "bert_teacher"])
def test_cache_layers_hold_the_pooled_hidden_state(tmp_path, captions, which, request):
    import torch
    from transformers import AutoModel, AutoTokenizer, CLIPTextModel

    path = request.getfixturevalue(which)
    result = _run(captions, tmp_path / "out", path, id_column="id", dtype="float32", cache_layers=(2, 1))
    cache = shards.open_cache(tmp_path / "out")
    hidden = {"clip_teacher": 32, "bert_teacher": 24}[which]
    assert cache.layers == [2, 1] and result.manifest["layer_dim"] == hidden
    assert result.manifest["layer_pooling"] == ("eos_token" if which == "clip_teacher" else "mean")
    assert cache.table().schema.names == ["id", "text", "caption_group", "embedding", "layer_1", "layer_2"]
    texts = [r["caption"] for r in _rows(captions)]
    tok = AutoTokenizer.from_pretrained(path)
    model = (CLIPTextModel if which == "clip_teacher" else AutoModel).from_pretrained(path).eval()
    for layer in (1, 2):
        got = cache.embeddings(f"layer_{layer}")
        assert got.shape == (20, hidden)
        for i in (0, 7, 19):  # one caption at a time: no padding involved in the reference
            ids = tok(texts[i], return_tensors="pt")
            with torch.no_grad():
                state = model(**ids, output_hidden_states=True).hidden_states[layer][0]  # (T, H)
            ref = state[-1] if which == "clip_teacher" else state.mean(0)  # CLIP: the EOS token closes the sequence
            np.testing.assert_allclose(got[i], ref.numpy(), atol=1e-5)


def test_cache_layer_beyond_depth_is_refused(tmp_path, captions, bert_teacher):
    with pytest.raises(UserError, match=r"--cache-layers \[3\] exceed the teacher's 2 layers") as err:
        _run(captions, tmp_path / "out", bert_teacher, cache_layers=(1, 3))
    assert "\n" not in str(err.value)


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 44, 3), dtype=np.uint8)) for i in range(3)]


def _image_reference(path, images):
    import torch
    from transformers import AutoImageProcessor, CLIPModel

    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(path).eval().get_image_features(pixel_values=pixels).pooler_output
    return torch.nn.functional.normalize(ref, dim=-1).numpy()


def test_image_column(tmp_path, clip_teacher):
    import datasets

    images = _images()
    which = [0, 1, 0, 2, 1, 0, 2]  # several captions per image
    rows = {
        "id": [f"c{i}" for i in range(7)],
        "caption": [tiny.CORPUS[i] for i in range(7)],
        "image": [images[w] for w in which],
    }
    features = datasets.Features(
        {"id": datasets.Value("string"), "caption": datasets.Value("string"), "image": datasets.Image()}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "data"))
    result = _run(
        tmp_path / "data",
        tmp_path / "out",
        clip_teacher,
        id_column="id",
        image_column="image",
        dtype="float32",
        shard_size=4,
    )
    assert result.manifest["image_dim"] == 16 and result.manifest["image_column"] == "image"
    cache = shards.open_cache(tmp_path / "out")
    assert cache.has_images
    image_ids = cache.table(["image_id"]).column("image_id").to_pylist()
    assert [image_ids.index(x) for x in image_ids] == [
        0,
        1,
        0,
        3,
        1,
        0,
        3,
    ]  # same image <-> same image_id, across shards
    ref = _image_reference(clip_teacher, images)
    np.testing.assert_allclose(cache.embeddings("image_embedding"), ref[which], atol=1e-5)
    teacher = load_teacher(str(clip_teacher))
    np.testing.assert_allclose(cache.embeddings(), teacher.encode(rows["caption"]), atol=1e-5)

    # the same images as file paths, grouped by a given image id column
    for i, image in enumerate(images):
        image.save(tmp_path / f"img{i}.png")
    data = tiny.write_captions(
        tmp_path / "paths.jsonl",
        [
            {"caption": c, "path": str(tmp_path / f"img{w}.png"), "image": f"im{w}"}
            for c, w in zip(rows["caption"], which)
        ],
    )
    _run(data, tmp_path / "paths", clip_teacher, image_column="path", image_id_column="image", dtype="float32")
    cache = shards.open_cache(tmp_path / "paths")
    assert cache.table(["image_id"]).column("image_id").to_pylist() == [f"im{w}" for w in which]
    np.testing.assert_allclose(cache.embeddings("image_embedding"), ref[which], atol=1e-5)


def test_empty_captions_are_skipped_and_counted(tmp_path, clip_text_teacher):
    data = tiny.write_captions(
        tmp_path / "rows.jsonl",
        [
            {"id": "a", "caption": "red apple"},
            {"id": "b", "caption": ""},
            {"id": "c", "caption": None},
            {"id": "d", "caption": "  "},
            {"id": "e", "caption": "green tree"},
        ],
    )
    result = _run(data, tmp_path / "out", clip_text_teacher, id_column="id")
    assert result.totals == {
        "input_rows": 5,
        "rows": 2,
        "skipped": 3,
        "truncated": 0,
        "duplicates": 0,
        "distinct_captions": 2,
        "embedded": 2,
    }
    assert shards.open_cache(tmp_path / "out").table(["caption_group"]).column(0).to_pylist() == [0, 4]  # input rows
    assert shards.open_cache(tmp_path / "out").ids() == ["a", "e"]
    with pytest.raises(UserError, match=r"caption of id 'b' \(row 1\) is empty"):
        _run(data, tmp_path / "strict", clip_text_teacher, id_column="id", strict=True)


def test_blank_is_what_python_strip_calls_blank(tmp_path, clip_text_teacher):
    """Blank captions are found by an Arrow kernel; it skips exactly the captions `not text.strip()` calls blank."""
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert (
        len(spaces) == 29 and "\x1c" in spaces and "\u3000" in spaces
    )  # Python's set, wider than Unicode's White_Space
    blank = spaces + ["".join(spaces), "\x1c\x1d \x85"]
    kept = ["\u200b", "a", " x ", "\x1cb\x1c", "\u00a0\u00a0.", "_"]  # zero-width space and punctuation are text
    rows = [{"id": f"b{i}", "caption": t} for i, t in enumerate(blank)] + [
        {"id": f"k{i}", "caption": t} for i, t in enumerate(kept)
    ]
    result = _run(
        tiny.write_captions(tmp_path / "rows.jsonl", rows), tmp_path / "out", clip_text_teacher, id_column="id"
    )
    assert result.totals["skipped"] == len(blank) == sum(not r["caption"].strip() for r in rows)
    assert shards.open_cache(tmp_path / "out").ids() == [f"k{i}" for i in range(len(kept))]
    # --strict refuses what the skip would drop: the same notion of blank, \x1c included
    only_separator = tiny.write_captions(
        tmp_path / "sep.jsonl", [{"id": "a", "caption": "red apple"}, {"id": "b", "caption": "\x1c"}]
    )
    with pytest.raises(UserError, match=r"caption of id 'b' \(row 1\) is empty"):
        _run(only_separator, tmp_path / "strict", clip_text_teacher, id_column="id", strict=True)


def test_a_caption_column_of_numbers_is_one_line(tmp_path, clip_text_teacher):
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"caption": None}, {"caption": 3}, {"caption": 4}])
    with pytest.raises(
        UserError, match=r"caption column 'caption' holds int64 values \(row 1\); point --caption-column at the text"
    ):
        _run(data, tmp_path / "out", clip_text_teacher)


def test_rerun_is_a_no_op_other_arguments_are_refused(tmp_path, captions, clip_text_teacher):
    out = tmp_path / "out"
    _run(captions, out, clip_text_teacher, shard_size=8)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _run(
        captions, out, clip_text_teacher, shard_size=8, batch_tokens=64
    )  # a speed-only change is the same request
    assert again.computed_shards == 0 and again.rows == 20
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(UserError, match=r"other arguments \(dtype: 'float16' -> 'float32'.*pass --overwrite") as err:
        _run(captions, out, clip_text_teacher, shard_size=8, dtype="float32")
    assert "\n" not in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing touched by the refusal
    replaced = _run(captions, out, clip_text_teacher, shard_size=5, dtype="float32", overwrite=True)
    assert replaced.computed_shards == 4 and shards.open_cache(out).manifest["dtype"] == "float32"
    assert [p.name for p in shards.shard_files(out)] == [f"shard-0000{k}.arrow" for k in range(4)]


def test_foreign_output_folder_is_refused(tmp_path, captions, clip_text_teacher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="is not empty and holds no mclip cache"):
        _run(captions, out, clip_text_teacher)
    _run(captions, out, clip_text_teacher, overwrite=True)
    assert (out / "notes.txt").read_text(
        encoding="utf-8"
    ) == "mine"  # --overwrite replaces a cache, not the user's files
    assert len(shards.open_cache(out)) == 20


def test_resume_recomputes_only_missing_or_broken_shards(tmp_path, captions, clip_text_teacher):
    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(captions, ref, clip_text_teacher, id_column="id", dtype="float32", shard_size=4)
    _run(captions, out, clip_text_teacher, id_column="id", dtype="float32", shard_size=4)
    # make it look like a killed run: manifest not final, one shard missing, one cut short, a temp file left
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    shards.write_json(
        out / "manifest.json",
        {k: v for k, v in manifest.items() if k not in ("shards", "totals")} | {"complete": False},
    )
    (out / "shard-00001.arrow").unlink()
    data = (out / "shard-00003.arrow").read_bytes()
    (out / "shard-00003.arrow").write_bytes(data[: len(data) // 2])
    (out / ".shard-00004.arrow.x1y2.tmp").write_bytes(data[:100])
    with pytest.raises(UserError, match="is incomplete"):
        shards.open_cache(out)
    kept = {k: (out / shards.shard_name(k)).stat().st_mtime_ns for k in (0, 2, 4)}
    time.sleep(0.01)
    result = _run(captions, out, clip_text_teacher, id_column="id", dtype="float32", shard_size=4)
    assert result.computed_shards == 2 and result.totals == manifest["totals"]
    assert {k: (out / shards.shard_name(k)).stat().st_mtime_ns for k in (0, 2, 4)} == kept
    assert not list(out.glob(".*")) and shards.open_cache(out).verify() == []
    _assert_same(_by_id(out), _by_id(ref), atol=1e-6)


def test_resume_with_other_teacher_weights_is_refused(tmp_path, captions):
    teacher = tiny.write_tiny_clip(tmp_path / "teacher", with_vision=False, seed=0)
    out = tmp_path / "out"
    _run(captions, out, teacher, shard_size=10)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    shards.write_json(out / "manifest.json", manifest | {"complete": False})
    (out / "shard-00001.arrow").unlink()
    tiny.write_tiny_clip(tmp_path / "teacher", with_vision=False, seed=1)
    with pytest.raises(UserError, match="was started with other weights"):
        _run(captions, out, teacher, shard_size=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, captions, clip_teacher):
    common = [
        "--data",
        str(captions),
        "--teacher",
        str(clip_teacher),
        "--id-column",
        "id",
        "--dtype",
        "float32",
        "--shard-size",
        "3",
        "--cache-layers",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "mclip",
        "embed-teacher",
        "--out",
        str(tmp_path / "dist"),
        *common,
    ]
    # its own session, so that a hang takes the launcher's worker processes down with it
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish within 240 s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    _run(
        captions,
        tmp_path / "single",
        clip_teacher,
        id_column="id",
        dtype="float32",
        shard_size=3,
        cache_layers=(1,),
        device="cpu",
    )
    dist, single = shards.open_cache(tmp_path / "dist"), shards.open_cache(tmp_path / "single")

    def layout(manifest):
        return [{k: s[k] for k in ("file", "rows", "first_row", "end_row")} for s in manifest["shards"]]

    assert layout(dist.manifest) == layout(single.manifest) and len(dist.files) == 7
    assert dist.manifest["totals"] == single.manifest["totals"] and dist.verify() == []
    for a, b in zip(dist.files, single.files):  # shard by shard: same rows, same vectors
        ta, tb = (pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in (a, b))
        assert ta.schema.metadata == tb.schema.metadata and ta.select(["id", "text"]).equals(tb.select(["id", "text"]))
        for column in ("embedding", "layer_1"):
            np.testing.assert_allclose(shards.to_numpy(ta[column]), shards.to_numpy(tb[column]), atol=1e-5)


def test_tokenizing_threads_leave_two_cores_to_the_forward_and_the_writer(monkeypatch):
    import torch

    from mclip.embed.batches import _tokenize_threads

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, want in [(16, 14), (128, 16), (3, 1), (1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert _tokenize_threads(cuda) == want and _tokenize_threads(cpu) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun ranks on one machine share it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert _tokenize_threads(cuda) == 14


def test_the_reader_pads_and_pins_the_batches_a_gpu_teacher_gets(tmp_path, clip_text_teacher, monkeypatch):
    """Batches are made in the reader thread, length-sorted within the token budget, and page-locked for a CUDA teacher
    (pin_memory needs CUDA, so here it is recorded instead): a unit of distinct captions with --dedup, a shard without."""
    import torch

    from mclip.embed import dedup
    from mclip.embed import run as embed_teacher

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    texts = ["red apple", LONG, "a dog", "red apple", "", "green tree on a hill"]
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"caption": t} for t in texts])
    config = EmbedConfig(data=str(data), out=str(tmp_path / "out"), teacher=str(clip_text_teacher), max_batch_size=2)
    rows, n = embed_teacher._load_rows(config)
    teacher = load_teacher(str(clip_text_teacher))
    plan = dedup.build(rows, n, config, tmp_path / "out", "fingerprint")
    assert plan.groups(0, n).tolist() == [0, 1, 2, 0, -1, 5] and (plan.distinct, plan.units) == (4, 1)
    work = embed_teacher._read_unit(0, plan, config, teacher, batch_tokens=4096, pin=True)
    assert work.unique == 4 and work.flags.tolist() == [False, True, False, False]  # the distinct captions by first row
    assert sorted(i for idx, _, _ in work.batches for i in idx.tolist()) == [0, 1, 2, 3] and len(work.batches) == 2
    widths = [mask.sum(1).tolist() for _, _, mask in work.batches]
    assert widths[0][-1] <= widths[1][0] and max(widths[1]) == 77  # sorted by length; the long caption cut to 77
    assert len(pinned) == 2 * len(work.batches)
    unpinned = embed_teacher._read_unit(0, plan, config, teacher, batch_tokens=4096, pin=False)
    assert len(pinned) == 2 * len(work.batches)
    for (i1, ids1, m1), (i2, ids2, m2) in zip(work.batches, unpinned.batches):
        assert i1.tolist() == i2.tolist() and torch.equal(ids1, ids2) and torch.equal(m1, m2)
    plain = dataclasses.replace(config, dedup=False)  # without --dedup a shard tokenises every kept row itself
    shard = embed_teacher._read_shard(0, rows, plain, n, teacher, batch_tokens=4096, plan=plan)
    assert (shard.unique, shard.skipped, len(shard.ids), shard.inverse.tolist(), shard.groups.tolist()) == (
        5,
        1,
        5,
        [0, 1, 2, 3, 4],
        [0, 1, 2, 0, 5],
    )


@pytest.mark.slow
def test_torchrun_two_nodes_equal_one_process(tmp_path, clip_teacher):
    """Two torchrun launchers on this machine stand in for two nodes (--nnodes 2, one process each, gloo on CPU):
    the plan, the distinct-caption units split over the nodes' ranks and the gathered shards equal one process's."""
    data = tiny.write_captions(tmp_path / "rows.jsonl", _repeats(40))
    common = [
        "--data",
        str(data),
        "--teacher",
        str(clip_teacher),
        "--id-column",
        "id",
        "--dtype",
        "float32",
        "--shard-size",
        "3",
        "--cache-layers",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    port = _free_port()
    launchers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "mclip",
                "embed-teacher",
                "--out",
                str(tmp_path / "dist"),
                *common,
            ],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    deadline, errors = time.monotonic() + 90, []
    for proc in launchers:
        try:
            errors.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
        except subprocess.TimeoutExpired:
            for other in launchers:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"two-node torchrun did not finish within 90 s: {proc.communicate()[1][-3000:]}")
    assert [proc.returncode for proc in launchers] == [0, 0], "\n".join(e[-2000:] for e in errors)
    single = _run(
        data,
        tmp_path / "single",
        clip_teacher,
        id_column="id",
        dtype="float32",
        shard_size=3,
        cache_layers=(1,),
        device="cpu",
    )
    dist = shards.open_cache(tmp_path / "dist")
    assert (
        single.captions == 5 and dist.manifest["totals"] == single.totals and dist.verify() == []
    )  # 2 units: one per node
    assert len(dist.files) == 14 and [p.name for p in dist.files] == [
        p.name for p in shards.open_cache(tmp_path / "single").files
    ]
    for a, b in zip(
        dist.files, shards.open_cache(tmp_path / "single").files
    ):  # shard by shard: same rows, groups, vectors
        ta, tb = (pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in (a, b))
        assert ta.schema.metadata == tb.schema.metadata and ta.select(["id", "text", "caption_group"]).equals(
            tb.select(["id", "text", "caption_group"])
        )
        for column in ("embedding", "layer_1"):
            np.testing.assert_allclose(shards.to_numpy(ta[column]), shards.to_numpy(tb[column]), atol=1e-5)
    assert not (tmp_path / "dist" / ".plan").exists()


def test_csv_ids_are_cached_in_their_string_form(tmp_path, bert_teacher):
    """A CSV's ids 000..011 were cached as '0'..'11', so a caption file with the same ids as strings joined nothing."""
    path = tmp_path / "rows.csv"
    path.write_text("id,caption\n" + "".join(f"{i:03d},{tiny.CORPUS[i]}\n" for i in range(12)), encoding="utf-8")
    run(
        EmbedConfig(
            data=str(path), out=str(tmp_path / "cache"), teacher=str(bert_teacher), id_column="id", progress=False
        )
    )
    assert shards.open_cache(tmp_path / "cache").ids() == [f"{i:03d}" for i in range(12)]
