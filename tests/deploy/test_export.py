"""`mclip export`: the ONNX graph equals mclip.load(path).encode (fp32 and int8), runs without torch through mclip.load
and mclip encode, loads in sentence-transformers' ONNX backend, and every refusal is one line that leaves no folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import mclip  # noqa: E402
from mclip.config import ExportConfig  # noqa: E402
from mclip.deploy import export  # noqa: E402
from mclip.errors import UserError  # noqa: E402
from tests import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EMOJI_TEST = ROOT / "data" / "emoji" / "test.jsonl"
LANGUAGES = (
    "es",
    "de",
    "fr",
    "it",
    "pt",
    "id",
)  # scripts whose letters a random model can match to the English caption's
TEXTS = [
    "a photo of a dog",
    "Zwei Kinder spielen Fußball",
    "一只狗在草地上奔跑",
    "Собака бежит",
    "قطة تجلس",
    "🐶🎉 party",
    "x",
]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def emoji_rows():
    return [json.loads(line) for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def student(tmp_path_factory, emoji_rows):
    """A tiny CLS-pooled student whose character vocabulary covers the emoji test split, so retrieval there is not chance.

    Its weights start at 15x BERT's init range: at 0.02 a random tiny BERT gives every text nearly the same vector
    (pairwise cosine 0.99998 over the test captions), so which caption ranks first is noise and an R@1 comparison says
    nothing; at 0.3 the captions spread out (pairwise cosine ~0.83) and R@1 is well above chance in Latin scripts."""
    import torch
    from transformers import BertConfig, BertModel

    from mclip.models.student import build_student

    root = tmp_path_factory.mktemp("export")
    corpus = (
        tiny.CORPUS
        + TEXTS
        + [r[k] for r in emoji_rows for k in ("caption", *(f"caption_{lang}" for lang in LANGUAGES))]
    )
    backbone = tiny.write_tiny_bert(root / "backbone", hidden=32, seed=4, corpus=corpus)
    config = BertConfig.from_pretrained(backbone)
    config.initializer_range = 0.3
    torch.manual_seed(4)
    BertModel(config).eval().save_pretrained(backbone)
    return build_student(str(backbone), dim=16, pooler="cls", meta={"teacher": {"name": "tiny", "dim": 16}}).save(
        root / "final"
    )


@pytest.fixture(scope="module")
def fp32(student, tmp_path_factory):
    return export.run(
        ExportConfig(model=str(student), out=str(tmp_path_factory.mktemp("fp32") / "onnx-model"), progress=False)
    )


@pytest.fixture(scope="module")
def int8(student, tmp_path_factory):
    return export.run(
        ExportConfig(
            model=str(student), out=str(tmp_path_factory.mktemp("int8") / "onnx-int8"), quantize="int8", progress=False
        )
    )


def test_the_fp32_graph_equals_the_student(student, fp32):
    assert fp32.min_cosine >= 0.9999 and fp32.opset == 18
    got = mclip.load(fp32.out).encode(TEXTS + [" ".join(["woman standing"] * 100)], batch_size=3)
    ref = mclip.load(student).encode(TEXTS + [" ".join(["woman standing"] * 100)], batch_size=3)
    assert got.shape == ref.shape == (len(TEXTS) + 1, 16)
    assert export.cosines(got, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised inside the graph


def test_the_graph_has_dynamic_axes_and_the_projection_inside(fp32):
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32.graph))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert set(dims) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for shape in dims.values() for d in shape), dims  # symbolic batch and sequence
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert [o.name for o in model.graph.output] == ["sentence_embedding", "last_hidden_state"]
    assert (
        outs["sentence_embedding"][1] == 16 and outs["last_hidden_state"][2] == 32
    )  # D = the projection's, not the backbone's
    session = ort.InferenceSession(str(fp32.graph), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 3), (5, 40)):
        ids = np.full((batch, length), 7, dtype=np.int64)
        ids[:, 0] = 2
        emb, hidden = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert emb.shape == (batch, 16) and hidden.shape == (batch, length, 32)


def test_the_folder_holds_the_tokenizer_and_its_json(fp32, student):
    meta = json.loads((fp32.out / "mclip.json").read_text())
    assert {k: meta[k] for k in ("format", "pooler", "dim", "max_length", "quantize", "opset")} == {
        "format": "mclip-onnx",
        "pooler": "cls",
        "dim": 16,
        "max_length": 64,
        "quantize": None,
        "opset": 18,
    }
    assert meta["teacher"] == {"name": "tiny", "dim": 16} and meta["verification"]["min_cosine"] >= 0.9999
    assert (fp32.out / "tokenizer.json").is_file() and (fp32.out / "onnx" / "model.onnx").is_file()
    assert not (fp32.out / "model.safetensors").exists()  # the graph carries the weights
    from mclip.store.verify import check_folder

    assert check_folder(fp32.out) == []  # checksums.sha256 written last: `mclip verify DIR` checks an export
    assert not any(p.name.startswith(".") for p in fp32.out.parent.iterdir())  # no workspace or temp sibling left


def test_int8_is_close_and_keeps_r_at_1_on_the_emoji_test_split(student, int8, emoji_rows):
    """Dynamic int8: cosine >= 0.99 to the student, and R@1 (xx caption -> English caption, 300 test concepts) within 0.01
    of the torch student's in every language."""
    assert int8.min_cosine >= 0.99 and json.loads((int8.out / "mclip.json").read_text())["quantize"] == "int8"
    torch_model, onnx_model = mclip.load(student), mclip.load(int8.out)
    english = [r["caption"] for r in emoji_rows]
    gallery = {name: m.encode(english) for name, m in (("torch", torch_model), ("int8", onnx_model))}
    assert export.cosines(gallery["torch"], gallery["int8"]).min() >= 0.99
    for lang in LANGUAGES:
        queries = [r[f"caption_{lang}"] for r in emoji_rows]
        r1 = {}
        for name, model in (("torch", torch_model), ("int8", onnx_model)):
            hits = np.argmax(model.encode(queries) @ gallery[name].T, axis=1) == np.arange(len(queries))
            r1[name] = hits.mean()
        assert abs(r1["torch"] - r1["int8"]) <= 0.01, (lang, r1)
        assert r1["torch"] >= 10 / len(emoji_rows), (lang, r1)  # 10x chance: the comparison says something


def test_mclip_load_and_encode_run_the_export_without_torch(fp32, student, tmp_path):
    """The deployment path: a fresh interpreter where `import torch` fails loads the folder with mclip.load and runs the
    `mclip encode` command on it; both give the student's vectors."""
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    script = tmp_path / "no_torch.py"
    script.write_text(
        f"""
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError, and find_spec("torch") says it is not installed
import numpy as np
import mclip
from mclip.cli import main
model = mclip.load({str(fp32.out)!r})
np.save({str(tmp_path / "load.npy")!r}, model.encode({TEXTS!r}))
main(["encode", "--model", {str(fp32.out)!r}, "--input", {str(tmp_path / "texts.txt")!r}, "--out", {str(tmp_path / "enc")!r},
      "--npy", "--no-progress"])
assert "torch" not in sys.modules or sys.modules["torch"] is None, "imported torch"
""",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ref = mclip.load(student).encode(TEXTS)
    assert export.cosines(np.load(tmp_path / "load.npy"), ref).min() >= 0.9999
    assert export.cosines(np.load(tmp_path / "enc" / "embeddings.npy"), ref).min() >= 0.9999
    assert json.loads((tmp_path / "enc" / "encode.json").read_text())["rows"] == len(TEXTS)


def test_encode_refuses_no_normalize_on_an_export(fp32, tmp_path, cli_error):
    (tmp_path / "t.txt").write_text("a dog\n", encoding="utf-8")
    err = cli_error(
        [
            "encode",
            "--model",
            str(fp32.out),
            "--input",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "o"),
            "--no-normalize",
        ]
    )
    assert "normalises inside" in err and not (tmp_path / "o").exists()


def test_sentence_transformers_modules_on_the_graphs_hidden_state_give_the_student(fp32, student):
    """The half of sentence-transformers' ONNX backend that runs without optimum: its own Pooling, Dense and Normalize
    modules, loaded from the export's module folders, applied to the graph's last_hidden_state output, give the student."""
    import onnxruntime as ort
    import torch
    from sentence_transformers.models import Dense, Normalize, Pooling

    modules = json.loads((fp32.out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
    enc = mclip.load(fp32.out).tokenize(TEXTS)
    session = ort.InferenceSession(str(fp32.out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(
        ["last_hidden_state"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    )
    features = {"token_embeddings": torch.from_numpy(hidden), "attention_mask": torch.from_numpy(enc["attention_mask"])}
    for module in (
        Pooling.load(str(fp32.out), subfolder="1_Pooling"),
        Dense.load(str(fp32.out), subfolder="2_Dense"),
        Normalize(),
    ):
        features = module(features)
    got = features["sentence_embedding"].detach().numpy()
    assert export.cosines(got, mclip.load(student).encode(TEXTS)).min() >= 0.9999


def test_sentence_transformers_onnx_backend_reads_the_folder(fp32, student):
    """sentence-transformers' ONNX backend reads onnx/model.onnx through optimum and pools, projects (2_Dense) and
    normalises the last_hidden_state output itself: the same vectors as the student. Skipped where optimum's
    onnxruntime part does not import: its latest release (optimum-onnx 0.1.0) requires transformers < 4.58."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx (sentence-transformers[onnx]) is not usable here")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(fp32.out), backend="onnx", device="cpu")
    got = model.encode(TEXTS, convert_to_numpy=True)
    assert export.cosines(got, mclip.load(student).encode(TEXTS)).min() >= 0.9999


# ---- refusals: one line each, and nothing left behind ----


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.mark.parametrize("opset", ["9", "17", "30"])
def test_a_bad_opset_is_one_line(opset, student, tmp_path, cli_error):
    err = cli_error(["export", str(student), "--out", str(tmp_path / "x"), "--opset", opset])
    assert f"opset={opset} is not supported" in err and "--opset 18 to 23" in err
    assert _leftovers(tmp_path) == []


def test_a_model_folder_without_tokenizer_files_is_refused(student, tmp_path, cli_error):
    copy = shutil.copytree(student, tmp_path / "final")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    err = cli_error(["export", str(copy), "--out", str(tmp_path / "x")])
    assert "has no tokenizer files" in err and "final/" in err
    assert _leftovers(tmp_path) == ["final"]


def test_not_a_student_and_an_export_as_model_are_refused(fp32, tmp_path, cli_error):
    assert "not an mclip student" in cli_error(["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "already an ONNX export" in cli_error(["export", str(fp32.out), "--out", str(tmp_path / "x")])
    assert _leftovers(tmp_path) == []


def test_an_out_under_a_file_is_one_line(student, tmp_path, cli_error):
    (tmp_path / "file").write_text("x")
    err = cli_error(["export", str(student), "--out", str(tmp_path / "file" / "x")])
    assert "part of that path is a file" in err
    assert _leftovers(tmp_path) == ["file"]


def test_an_unwritable_parent_is_one_line(student, read_only_dir, cli_error):
    """On a read-only mount, which root cannot write either (a chmod 555 folder skipped the test as root, as CI is)."""
    err = cli_error(["export", str(student), "--out", str(read_only_dir / "x")])
    assert err.startswith("permission denied writing ") and "Read-only file system" in err, err
    assert _leftovers(read_only_dir) == ["out"]  # the fixture's own folder, nothing else


def test_a_write_refused_midway_leaves_no_folder(student, tmp_path, cli_error, monkeypatch):
    import errno

    def refuse(student, path, opset):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(export, "_export_graph", refuse)
    err = cli_error(["export", str(student), "--out", str(tmp_path / "x")])
    assert err.startswith(f"permission denied writing {tmp_path / 'x'}")
    assert _leftovers(tmp_path) == []  # neither x nor the .x.export workspace


def test_a_failed_verification_is_one_line_and_leaves_no_folder(student, fp32, tmp_path, cli_error, monkeypatch):
    """A graph that disagrees with the student (here: another student's graph) is refused before --out exists."""
    from mclip.models.student import build_student

    other = build_student(str(student), dim=16, pooler="cls").save(
        tmp_path / "other"
    )  # same backbone, a new random projection
    monkeypatch.setattr(
        export,
        "_export_graph",
        lambda s, path, opset: (path.parent.mkdir(parents=True, exist_ok=True), shutil.copy(fp32.graph, path)),
    )
    err = cli_error(["export", str(other), "--out", str(tmp_path / "x")])
    assert "the fp32 ONNX graph disagrees with the student: cosine" in err and "nothing was written" in err
    assert _leftovers(tmp_path) == ["other"]


def test_a_non_empty_out_needs_overwrite_and_overwrite_replaces_a_previous_export(
    student, fp32, tmp_path, cli_error, monkeypatch
):
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "is not empty" in cli_error(["export", str(student), "--out", str(out)])
    assert "did not write (notes.txt)" in cli_error(["export", str(student), "--out", str(out), "--overwrite"])
    (out / "notes.txt").unlink()
    shutil.copytree(fp32.out, out, dirs_exist_ok=True)
    (out / "onnx" / "model.onnx").write_bytes(b"stale")
    monkeypatch.setattr(
        export,
        "_export_graph",
        lambda s, path, opset: (path.parent.mkdir(parents=True, exist_ok=True), shutil.copy(fp32.graph, path)),
    )
    from mclip.cli import main

    main(
        ["export", str(student), "--format", "onnx", "--out", str(out), "--overwrite", "--no-progress"]
    )  # MODEL is positional
    assert (out / "onnx" / "model.onnx").read_bytes() == fp32.graph.read_bytes()
    assert json.loads((out / "mclip.json").read_text())["verification"]["min_cosine"] >= 0.9999
    assert _leftovers(tmp_path) == ["x"]


def test_config_refusals():
    with pytest.raises(UserError, match="quantize='int4' is not valid"):
        ExportConfig(model="m", out="o", quantize="int4")
    with pytest.raises(UserError, match="format='tflite' is not valid"):
        ExportConfig(model="m", out="o", format="tflite")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["xlmr", "chinese_bert"])
def test_the_seed_student_families_export(family, tmp_path):
    """The seed's two student families in miniature (RoBERTa position ids from 2 and a SentencePiece vocabulary; a
    Chinese-character WordPiece BERT), mean pooled: the graph equals the student on every script."""
    from mclip.models.student import build_student

    write = tiny.write_tiny_xlmr if family == "xlmr" else tiny.write_tiny_chinese_bert
    backbone = write(tmp_path / "backbone", corpus=tiny.CORPUS + TEXTS, dropout=0.0)
    final = build_student(str(backbone), dim=16, pooler="mean").save(tmp_path / "final")
    result = export.run(ExportConfig(model=str(final), out=str(tmp_path / "onnx"), progress=False))
    texts = TEXTS + [" ".join(["一只狗 woman standing"] * 200)]  # past the 512-token cap
    assert export.cosines(mclip.load(result.out).encode(texts), mclip.load(final).encode(texts)).min() >= 0.9999


@pytest.mark.slow
def test_the_export_bench_prints_its_contract():
    """tests/bench/bench_export.py on a tiny student: its last line is the JSON the README's table is read from."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "bench" / "bench_export.py"), "--tiny", "--quick", "--texts", "64"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rates = ("torch_texts_per_s", "onnx_fp32_texts_per_s", "onnx_int8_texts_per_s")
    assert all(result[k] > 0 for k in rates) and result["texts"] == 64
    assert result["fp32_vs_torch"] == pytest.approx(
        result["onnx_fp32_texts_per_s"] / result["torch_texts_per_s"], rel=0.01
    )
    assert result["fp32_min_cosine"] >= 0.9999 and result["int8_min_cosine"] >= 0.97
    assert 0 < result["onnx_int8_mb"] < result["onnx_fp32_mb"]
    assert set(result["r_at_1"]) == {"torch", "fp32", "int8"} and "avg" in result["r_at_1"]["int8"]
