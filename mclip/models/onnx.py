"""The runtime of an `mclip export --format onnx` folder: onnxruntime for the graph and transformers' tokenizer only,
without importing torch (`mclip.load`, `mclip encode`, eval-retrieval). `mclip.deploy.export` writes such folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mclip.errors import UserError, first_line
from mclip.models.texts import length_sorted
from mclip.store.outputs import META

FORMAT = "mclip-onnx"  # mclip.json's "format" in an export folder


GRAPH = "onnx/model.onnx"  # where sentence-transformers' ONNX backend looks for the graph


INPUTS = ("input_ids", "attention_mask")


OUTPUTS = ("sentence_embedding", "last_hidden_state")  # (B, D) unit vectors; (B, T, H) for sentence-transformers


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `mclip export` (its mclip.json says so). Reads one small file."""
    meta = Path(path) / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _providers(device: str | None) -> list[str]:
    """onnxruntime execution providers for mclip's --device values (auto: CUDA when this onnxruntime has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    device = str(device or "auto")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise UserError(
                f"device={device} but this onnxruntime has no CUDA provider ({', '.join(available)}); "
                "install onnxruntime-gpu or pass --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    raise UserError(f"device={device} is not available to onnxruntime; use auto, cpu or cuda")


def _need_onnxruntime(what: str):
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{what} needs onnxruntime, which is not installed; run `pip install 'mclip[onnx]'`") from None
    return onnxruntime


class OnnxEncoder:
    """An export folder run by onnxruntime. `encode(texts)` -> (N, D) float32 unit vectors, as StudentEncoder.encode gives:
    the same tokenizer call (padding, truncation to max_length), longest texts first, any batch size."""

    def __init__(self, session, tokenizer, meta: dict, path: Path | None = None):
        self.session, self.tokenizer, self.meta, self.path = session, tokenizer, dict(meta), path
        self.dim, self.max_length, self.pooler = int(meta["dim"]), int(meta["max_length"]), meta["pooler"]
        self.input_names = [i.name for i in session.get_inputs()]
        assert set(self.input_names) <= set(INPUTS), f"graph inputs {self.input_names} are not {INPUTS}"

    def tokenize(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask (B, T) int64 -> (B, D) float32 unit vectors."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        (emb,) = self.session.run([OUTPUTS[0]], {k: v for k, v in feed.items() if k in self.input_names})
        return emb

    def encode(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 64,
        device: str | None = None,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Texts -> (N, D) float32; `device` is fixed when the folder is loaded (`mclip.load(path, device=...)`)."""
        if not normalize:
            raise UserError(
                f"{self.path or 'this export'} is an ONNX export, whose graph L2-normalises inside; "
                "drop --no-normalize (normalize=False), or encode with the torch student it came from"
            )
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx in length_sorted(texts, batch_size, show_progress):  # as StudentEncoder.encode
            enc = self.tokenize([texts[i] for i in idx])
            out[idx] = self(enc["input_ids"], enc["attention_mask"])
        return out[0] if single else out


def load_onnx(path: str | Path, device: str | None = None) -> OnnxEncoder:
    """Load an `mclip export` folder: onnxruntime for the graph, transformers' tokenizer; torch is never imported."""
    path = Path(path)
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    assert meta.get("format") == FORMAT, f"{path} is not an mclip ONNX export"
    ort = _need_onnxruntime(f"loading the ONNX export {path}")
    graph = path / meta.get("onnx", GRAPH)
    if not graph.is_file():
        raise UserError(f"{path} has no {meta.get('onnx', GRAPH)}; export the student again with mclip export")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers mean nothing to a user
    try:
        session = ort.InferenceSession(str(graph), options, providers=_providers(device))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # an export carries no code
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"cannot load the ONNX export {path}: {first_line(exc, 200)}; export the student again"
        ) from None
    return OnnxEncoder(session, tokenizer, meta, path)
