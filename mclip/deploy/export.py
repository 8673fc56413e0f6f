"""`mclip export`: a student -> an ONNX folder whose graph computes the finished embedding (pooling, projection and L2
normalisation inside the graph), checked against the student before it is reported; and the runtime that loads such a
folder with onnxruntime and transformers' tokenizer only, without importing torch (`mclip.load`, `mclip encode`).

The folder is also what sentence-transformers' ONNX backend reads (`onnx/model.onnx` beside modules.json, 1_Pooling,
2_Dense, 3_Normalize): the graph's second output is the backbone's `last_hidden_state`, and sentence-transformers pools,
projects and normalises it itself from those module folders, as it does for the torch student.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mclip import __version__
from mclip.config import ExportConfig, to_dict
from mclip.errors import UserError, first_line
from mclip.models.onnx import FORMAT, GRAPH, INPUTS, OUTPUTS, is_export, load_onnx
from mclip.store import outputs
from mclip.store.outputs import META
from mclip.store.verify import write_checksums

RERUN = "rerun the same command"
# Verification thresholds over PROBES, graph vs student: (least cosine of any text, mean cosine). An fp32 graph must equal
# the student. int8's activations are quantised per tensor per batch, so a very short text whose few tokens include
# BERT-style outlier states ([CLS]/[SEP] of all-MiniLM-L6-v2) moves most: there the least was 0.986 at a mean of 0.995.
MIN_COSINE = {None: (0.9999, 0.9999), "int8": (0.97, 0.99)}
# Activation ops whose outputs feed a transformer's FFN down-projection: torch's exporter decomposes GELU into a Mul
# named node_gelu (opset < 20), so names count as well as op types
FFN_ACTIVATIONS = ("Gelu", "Relu", "FastGelu", "BiasGelu")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What the verification encodes with both the student and the graph: several scripts, emoji, a text past any token limit.
PROBES = (
    "a photo of a dog running on the beach",
    "Zwei Kinder spielen Fußball im Park",
    "une tasse de café sur la table",
    "niño con un globo rojo",
    "İstanbul'da güneşli bir gün",
    "一只狗在草地上奔跑",
    "東京の夜景と桜の花",
    "바닷가에서 뛰는 개",
    "Собака бежит по пляжу",
    "قطة تجلس على الأريكة",
    "گربه روی مبل نشسته است",
    "🐶🏖️ dog at the beach 🎉",
    "👩‍👩‍👧‍👦",
    "x",
    "Ünïcödé ẞ ﬁ ｆｕｌｌｗｉｄｔｈ",
    " ".join(["woman standing next to a red car"] * 80),
)


@dataclass
class ExportResult:
    out: Path
    graph: Path  # the ONNX file
    quantize: str | None
    opset: int
    min_cosine: float  # over PROBES, graph vs mclip.load(model).encode
    mean_cosine: float
    graph_bytes: int
    seconds: float


# ---- loading an export (no torch) ----


def model_folder(path: str | Path) -> Path:
    """The folder behind --model: an export folder as it is (without importing torch), else `student.model_folder`
    (a final/, a checkpoint, or a run folder's final/)."""
    if is_export(path):
        return Path(path)
    from mclip.models.student import model_folder as student_folder

    return student_folder(path)


# ---- exporting ----


def _owned(name: str) -> bool:
    """What a previous export wrote (what --overwrite may replace)."""
    return name in (
        META,
        "onnx",
        "checksums.sha256",
        "config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling",
        "2_Dense",
        "3_Normalize",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    ) or name.startswith(("tokenizer", "vocab", "merges", "sentencepiece", "spiece"))


def _check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{folder} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); the export must carry the tokenizer "
            "the student was trained with: copy them from the run's final/ folder (or save the student again)"
        )


def _need_exporter() -> None:
    import importlib.util

    # onnxscript: torch's ONNX exporter translates with it
    missing = [module for module in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(
            f"mclip export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            "run `pip install 'mclip[onnx]'`"
        )


def _graph_module(student):
    """The student as one torch module of (input_ids, attention_mask) -> (unit embedding, last hidden state): the same
    pooling and projection as StudentEncoder.forward, then the L2 normalisation encode() applies."""
    import torch

    from mclip.models.student import pool

    class Graph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student = student

        def forward(self, input_ids, attention_mask):
            hidden = self.student.backbone(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state  # (B, T, H)
            emb = self.student.projection(pool(hidden, attention_mask, self.student.pooler))  # (B, D)
            return torch.nn.functional.normalize(emb, dim=-1), hidden

    return Graph().eval()


def _export_graph(student, path: Path, opset: int) -> bool:
    """torch.onnx (the torch.export-based exporter) with dynamic batch and sequence axes; True when the weights went to
    an external data file beside the graph (students over 1.8 GiB: protobuf's limit is 2 GiB)."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    sample = student.tokenize(
        ["a photo of a dog on the grass", "一只狗"]
    )  # batch 2 != length: neither axis is specialised
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    large = sum(p.numel() * p.element_size() for p in student.parameters()) > 1.8 * 2**30
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.onnx"), logging.getLogger("onnxscript")
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter; failures still raise
            program = torch.onnx.export(
                _graph_module(student),
                (sample["input_ids"], sample["attention_mask"]),
                None,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                opset_version=opset,
                dynamic_shapes=shapes,
                dynamo=True,
                verbose=False,
            )
        program.save(str(path), external_data=large)  # else one self-contained file
    except Exception as exc:  # torch.export raises many types; any of them means this student cannot be traced here
        if isinstance(exc, OSError):
            raise
        raise UserError(
            f"torch could not export the student to ONNX ({type(exc).__name__}: {first_line(exc, 200)}); "
            "rerun with mclip --debug export ... to see the trace"
        ) from exc
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return large


def _ffn_down_projections(model) -> list[str]:
    """The MatMul nodes that read an FFN activation's output (each layer's second FFN linear)."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def activation(node) -> bool:
        return node is not None and (
            node.op_type in FFN_ACTIVATIONS or node.name.startswith(("node_gelu", "node_relu"))
        )

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and activation(producer.get(n.input[0]))]


def _quantize(fp32: Path, int8: Path, large: bool = False) -> None:
    """onnxruntime's dynamic quantisation: int8 weights, activations quantised per batch at run time.

    Its defaults (per-tensor weights, every MatMul) moved all-MiniLM-L6-v2's embeddings to a mean cosine of 0.94 with the
    fp32 graph. What brings it to 0.995: per-channel weight scales; only MatMuls with a weight matrix (MatMulConstBOnly:
    attention's activation x activation products stay fp32); and the FFN down-projections kept in fp32, whose GELU inputs
    have the widest range (0.990 -> 0.995 mean; a third of the linear weights stay fp32). The embedding tables (Gather)
    are quantised too: they are most of a small model's bytes (87 -> 33 MiB for MiniLM) for 0.001 of mean cosine."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter's optimiser leaves intermediate shape annotations that onnx's shape inference (which the quantiser
    # runs first) contradicts ("Inferred shape and existing shape differ"); they are hints only, so drop them.
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    onnx.save(model, str(fp32), save_as_external_data=large)
    int8.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its root-logger advice to pre-process applies to static quantisation, not this
    try:
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"],
            nodes_to_exclude=_ffn_down_projections(model),
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=large,
        )
    except Exception as exc:  # onnx's and onnxruntime's own error types; any means this graph cannot be quantised here
        if isinstance(exc, OSError):
            raise
        raise UserError(
            f"onnxruntime could not quantise the graph to int8 ({type(exc).__name__}: {first_line(exc, 200)}); "
            "export without --quantize"
        ) from exc
    finally:
        root.setLevel(level)


def _opset(graph: Path) -> int:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def interrupted(config: ExportConfig) -> tuple[str, str | None]:
    """An export is written beside --out and renamed onto it whole: an interrupted one leaves --out as it was."""
    return f"{config.out} as it was (an export appears whole or not at all)", None


def run(config: ExportConfig) -> ExportResult:
    """Export, verify against the student, and only then put the folder at --out (written beside it, then renamed)."""
    start = time.perf_counter()
    from mclip.models.student import load, model_folder

    out = Path(config.out)
    folder = model_folder(config.model)
    if is_export(folder):
        raise UserError(f"{folder} is already an ONNX export; pass the student it came from (a run's final/ folder)")
    _check_tokenizer(folder)
    _need_exporter()
    outputs.check(out, config.overwrite, owned=_owned, command="export")
    student = load(folder, device="cpu", trust_remote_code=config.trust_remote_code).eval()
    reference = student.encode(list(PROBES), batch_size=8)  # (N, D): what mclip.load(model).encode gives
    workspace = out.with_name(f".{out.name}.export")  # beside --out: the rename onto it stays on one filesystem
    report: dict = {}

    def fill(tmp: Path) -> None:
        graph = tmp / GRAPH
        if config.quantize:
            large = _export_graph(student, workspace / "fp32" / "model.onnx", config.opset)
            _quantize(workspace / "fp32" / "model.onnx", graph, large)
        else:
            _export_graph(student, graph, config.opset)
        opset = _opset(graph)
        if opset != config.opset:
            raise UserError(f"torch's exporter wrote opset {opset} instead of {config.opset}; pass --opset {opset}")
        student.tokenizer.save_pretrained(tmp)
        student.backbone.config.save_pretrained(tmp)  # config.json: what sentence-transformers' ONNX backend reads
        student.save_modules(tmp)
        meta = {
            "format": FORMAT,
            "mclip_version": __version__,
            "pooler": student.pooler,
            "dim": student.dim,
            "hidden_size": student.hidden_size,
            "max_length": student.max_length,
            "normalize": True,
            "teacher": student.meta.get("teacher"),
            "languages": student.meta.get("languages"),
            "onnx": GRAPH,
            "inputs": list(INPUTS),
            "outputs": list(OUTPUTS),
            "quantize": config.quantize,
            "opset": opset,
            "source": str(folder),
            "config": to_dict(config),
        }
        outputs.write_json(tmp / META, meta)
        got = load_onnx(tmp, device="cpu").encode(
            list(PROBES), batch_size=8
        )  # the runtime users get, on the files as written
        cos = cosines(got, reference)
        least, mean = MIN_COSINE[config.quantize]
        worst = int(np.argmin(cos))
        fix = "; export without --quantize" if config.quantize else "; report this with the model's config.json"
        if not cos.min() >= least:  # also refuses NaN
            raise UserError(
                f"the {config.quantize or 'fp32'} ONNX graph disagrees with the student: cosine {cos.min():.6f} < {least} "
                f"on {PROBES[worst][:40]!r}; nothing was written to {out}{fix}"
            )
        if not cos.mean() >= mean:
            raise UserError(
                f"the {config.quantize or 'fp32'} ONNX graph disagrees with the student: mean cosine {cos.mean():.6f} < "
                f"{mean} over {len(PROBES)} texts; nothing was written to {out}{fix}"
            )
        report.update(opset=opset, min_cosine=float(cos.min()), mean_cosine=float(cos.mean()))
        meta["verification"] = {
            "texts": len(PROBES),
            "min_cosine": round(float(cos.min()), 7),
            "mean_cosine": round(float(cos.mean()), 7),
            "thresholds": {"min": least, "mean": mean},
            "against": "mclip.load(source).encode",
        }
        outputs.write_json(tmp / META, meta)

        write_checksums(tmp)  # last, as for a final/: `mclip verify DIR` (and sha256sum -c) check the export

    import shutil

    with outputs.hold(workspace, "export"):
        try:
            outputs.write_folder(out, workspace / "folder", fill, RERUN)
        finally:
            shutil.rmtree(workspace / "fp32", ignore_errors=True)  # then the lock's release removes the empty workspace
    graph = out / GRAPH
    result = ExportResult(
        out,
        graph,
        config.quantize,
        report["opset"],
        report["min_cosine"],
        report["mean_cosine"],
        graph.stat().st_size,
        time.perf_counter() - start,
    )
    if config.progress:
        print(
            f"export: {folder} -> {graph} ({config.quantize or 'fp32'}, opset {result.opset}, {result.graph_bytes / 2**20:.1f} MiB); "
            f"cosine to the student over {len(PROBES)} texts: min {result.min_cosine:.6f}, mean {result.mean_cosine:.6f} "
            f"({result.seconds:.1f}s)",
            file=sys.stderr,
        )
    return result
