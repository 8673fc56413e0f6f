"""mclip.models.onnx, the torch-free runtime of an export folder, on a graph written here by hand (a masked mean of an
embedding table, L2-normalised) so it is checked against numpy alone: encode in any batch, the folder marker, devices,
refusals, and loading without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import mclip  # noqa: E402
from mclip.errors import UserError  # noqa: E402
from mclip.models import onnx as runtime  # noqa: E402
from tests import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["a photo of a dog", "x", "Zwei Kinder spielen Fußball im Park", "一只狗", "", "red apple"]
DIM, MAX_LENGTH = 6, 8


def _graph(table: np.ndarray):
    """input_ids, attention_mask (B, T) -> sentence_embedding (B, D): the unit-length mean of table[input_ids] over the
    real tokens."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),  # (B, T, D)
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),  # (B, T, 1)
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "time"], ["total"], keepdims=0),  # (B, D)
        helper.make_node("ReduceSum", ["mask3", "time"], ["count"], keepdims=0),  # (B, 1)
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("ReduceL2", ["mean", "last"], ["norm"], keepdims=1),  # (B, 1)
        helper.make_node("Div", ["mean", "norm"], ["sentence_embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_mean",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
            for name in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", DIM])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.array([-1], np.int64), "last"),
            numpy_helper.from_array(np.array([1], np.int64), "time"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An export folder as `mclip export` lays it out: mclip.json, the tokenizer, onnx/model.onnx; and its table."""
    folder = tmp_path_factory.mktemp("onnx") / "export"
    tokenizer = tiny.write_bert_tokenizer(folder, corpus=TEXTS)
    table = np.random.default_rng(0).standard_normal((len(tokenizer), DIM)).astype(np.float32)
    (folder / "onnx").mkdir()
    onnx.save(_graph(table), str(folder / runtime.GRAPH))
    meta = {"format": runtime.FORMAT, "dim": DIM, "max_length": MAX_LENGTH, "pooler": "mean"}
    (folder / "mclip.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder, tokenizer, table


def _oracle(tokenizer, table, text: str) -> np.ndarray:
    ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    mean = table[ids].mean(0)
    return mean / np.linalg.norm(mean)


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_encode_equals_the_graph_applied_text_by_text(folder, batch_size):
    path, tokenizer, table = folder
    model = runtime.load_onnx(path, device="cpu")
    assert isinstance(model, runtime.OnnxEncoder) and (model.dim, model.max_length) == (DIM, MAX_LENGTH)
    want = np.stack([_oracle(tokenizer, table, t) for t in TEXTS])
    got = model.encode(TEXTS, batch_size=batch_size)
    assert got.shape == (len(TEXTS), DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)  # padding never counts, texts come back in their own order
    np.testing.assert_allclose(model.encode(TEXTS[2]), want[2], atol=1e-5)  # one string: one vector
    np.testing.assert_allclose(mclip.load(path).encode(TEXTS), want, atol=1e-5)  # mclip.load sees the marker


def test_the_marker_is_the_format_in_mclip_json(folder, tmp_path):
    assert runtime.is_export(folder[0])
    assert not runtime.is_export(tmp_path)  # no mclip.json
    (tmp_path / "mclip.json").write_text('{"format": "mclip-student"}')
    assert not runtime.is_export(tmp_path)
    (tmp_path / "mclip.json").write_text("{not json")
    assert not runtime.is_export(tmp_path)


def test_devices_map_to_providers(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert (
        runtime._providers("cpu") == runtime._providers("auto") == runtime._providers(None) == ["CPUExecutionProvider"]
    )
    with pytest.raises(UserError, match="no CUDA provider .*install onnxruntime-gpu or pass --device cpu"):
        runtime._providers("cuda:1")
    with pytest.raises(UserError, match="device=mps is not available to onnxruntime"):
        runtime._providers("mps")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime._providers("auto") == runtime._providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_refusals_are_one_line(folder, tmp_path):
    import shutil

    model = runtime.load_onnx(folder[0])
    with pytest.raises(UserError, match="is an ONNX export, whose graph L2-normalises inside"):
        model.encode(TEXTS, normalize=False)
    broken = shutil.copytree(folder[0], tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"^cannot load the ONNX export .*broken: .*; export the student again$") as err:
        runtime.load_onnx(broken)
    assert "\n" not in str(err.value)
    damaged = shutil.copytree(folder[0], tmp_path / "damaged")
    (damaged / runtime.GRAPH).write_bytes(b"not a protobuf")  # onnxruntime raises its own InvalidProtobuf
    with pytest.raises(UserError, match=r"^cannot load the ONNX export .*damaged: .*; export the student again$"):
        runtime.load_onnx(damaged)
    (broken / runtime.GRAPH).unlink()
    with pytest.raises(UserError, match=r"has no onnx/model.onnx; export the student again with mclip export"):
        runtime.load_onnx(broken)


def test_an_export_loads_and_encodes_without_torch(folder, tmp_path):
    path, tokenizer, table = folder
    script = (
        "import sys; sys.modules['torch'] = None\n"  # `import torch` raises ImportError
        "import numpy as np, mclip\n"
        f"np.save({str(tmp_path / 'got.npy')!r}, mclip.load({str(path)!r}).encode({TEXTS!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    want = np.stack([_oracle(tokenizer, table, t) for t in TEXTS])
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, atol=1e-5)
