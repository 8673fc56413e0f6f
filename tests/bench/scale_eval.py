"""Scale check of stage 3 and `mclip verify`: peak RSS and wall time on a synthetic teacher cache of N rows.

    python tests/bench/scale_eval.py --rows 100000 1000000 --query-batch-size 1024 8192   # several minutes at 1M
    python tests/bench/scale_eval.py --rows 2000 --query-batch-size 64 256 --index IVF16,PQ8 # seconds

For each N: a cache of N rows written straight through `shards.write_shard` with a manifest as `mclip embed-teacher`
writes it (random unit vectors, dim --dim, float16), an eval dataset of the same N ids with one short caption per
language (a `save_to_disk` folder, memory-mapped as `datasets` loads it) and a tiny random student that records the
cache's teacher. Then `mclip eval-retrieval --index ... --query-batch-size B` for each B and `mclip verify` each run in
their own process under `/usr/bin/time -v`: peak RSS (everything resident, memory-mapped file pages included) and wall.
Scores are near chance (random vectors); what is checked is that memory is bounded by the batch and the index, not the
rows, and that every batch size gives the same metrics. The last printed line is the JSON result.

`measure_eval(rows, workdir, ...) -> dict` is the function other benchmarks call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

try:
    from tests.bench import common
except ImportError:  # run as `python tests/bench/scale_eval.py`: the script's folder is on sys.path
    import common  # noqa: F401  (also puts this checkout first on sys.path)

import numpy as np

TEACHER = {
    "name": "synthetic/random-unit-vectors",
    "kind": "clip",
    "pooling": "clip_projection",
    "dim": None,
    "hidden_size": None,
    "num_layers": 0,
    "max_length": 77,
    "fingerprint": "5ca1e0000000000000000000000000ff",
}
WORDS = (
    "dog cat man woman child car bus tree house street beach mountain river table chair bowl food bicycle horse bird boat "
    "train plane kitchen window door field grass sky cloud water road red blue green small large old young"
).split()


def captions(rows: int, seed: int, first: int = 0) -> list[str]:
    """Short distinct captions (a word and the row number): tokenising dominates a tiny student's encoding, so they are
    kept short and the run measures stage 3 rather than the tokenizer."""
    picks = np.random.default_rng(seed).integers(0, len(WORDS), size=rows).tolist()
    return [f"{WORDS[w]} {first + i}" for i, w in enumerate(picks)]


def write_cache(
    folder: Path, rows: int, dim: int, dtype: str = "float16", shard_size: int = 100_000, seed: int = 0
) -> dict:
    """A finished teacher cache of `rows` random unit vectors, in the layout stage 1 writes (ids c00000000...)."""
    import pyarrow as pa

    from mclip import __version__
    from mclip.store import shards
    from mclip.store.outputs import file_sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = shards.cache_schema(dim, dtype)
    entries = []
    for k, first in enumerate(range(0, rows, shard_size)):
        end = min(rows, first + shard_size)
        vectors = rng.standard_normal((end - first, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = pa.table(
            {
                "id": pa.array([f"c{i:08d}" for i in range(first, end)], pa.string()),
                "text": pa.array(captions(end - first, seed + 1 + k, first), pa.string()),
                "caption_group": pa.array(np.arange(first, end), pa.int64()),  # the captions are distinct
                "embedding": shards.fixed_list(vectors, dtype),
            },
            schema=schema,
        )
        stats = {
            "shard": k,
            "first_row": first,
            "end_row": end,
            "rows": end - first,
            "skipped": 0,
            "truncated": 0,
            "duplicates": 0,
        }
        path = shards.write_shard(folder, k, table, stats)
        entries.append(
            {
                "file": path.name,
                "rows": end - first,
                "first_row": first,
                "end_row": end,
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )
    teacher = dict(TEACHER, dim=dim, hidden_size=dim)
    manifest = {
        "format": shards.FORMAT,
        "format_version": shards.FORMAT_VERSION,
        "mclip_version": __version__,
        "complete": True,
        "teacher": teacher,
        "kind": teacher["kind"],
        "pooling": teacher["pooling"],
        "dim": dim,
        "dtype": dtype,
        "normalized": True,
        "max_length": 77,
        "precision": "fp32",
        "caption_column": "caption",
        "id_column": "id",
        "image_column": None,
        "image_dim": None,
        "layers": [],
        "layer_dim": None,
        "layer_pooling": None,
        "data": {"source": "synthetic", "split": "train", "limit": None},
        "shards": entries,
        "totals": {"input_rows": rows, "rows": rows, "skipped": 0, "truncated": 0, "duplicates": 0},
    }
    shards.write_manifest(folder, manifest)
    return manifest


def write_eval_data(folder: Path, rows: int, lang: str = "de", seed: int = 0) -> Path:
    """The eval captions: id (the cache's ids) and caption_<lang>, as a `save_to_disk` folder (no English column: stage 3
    scores English on the cache's own text)."""
    import datasets
    import pyarrow as pa

    table = pa.table(
        {
            "id": pa.array([f"c{i:08d}" for i in range(rows)], pa.string()),
            f"caption_{lang}": pa.array(captions(rows, seed + 10_000), pa.string()),
        }
    )
    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(str(folder))
    return Path(folder)


def write_student(folder: Path, manifest: dict) -> Path:
    """A tiny random student (BERT, hidden 32, 2 layers) projecting to the cache's dim and recording its teacher."""
    from mclip.models.student import build_student
    from tests import tiny

    backbone = tiny.write_tiny_bert(
        Path(folder).with_name(Path(folder).name + "-backbone"),
        hidden=32,
        seed=2,
        corpus=[" ".join(WORDS) + " 0123456789"],
    )
    build_student(str(backbone), dim=manifest["dim"], meta={"teacher": manifest["teacher"]}).save(folder)
    return Path(folder)


def timed(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """common.sampled, niced: exit code, peak RSS, the most anonymous (heap) and file-backed (mapped files) memory one
    process held at once, so a peak made of mapped cache pages is told from one made of the process's own memory."""
    run = common.sampled(["nice", "-n", "10", *cmd], env, timeout)
    run["stderr_tail"] = run["stderr_tail"][-1500:] if run["rc"] else ""
    return run


def measure_eval(
    rows: int,
    workdir: str | Path,
    query_batch_sizes: tuple[int, ...] = (1024, 8192),
    index: str = "IVF1024,PQ16",
    nprobe: int | None = 4,
    dim: int = 64,
    threads: int = 1,
    verify: bool = True,
    timeout: float | None = None,
) -> dict:
    """Build the synthetic cache, data and student of `rows` rows in `workdir` (reused when already there), then run
    eval-retrieval once per query batch size and verify once, each in its own process. Returns
    {"rows", "dim", "index", "nprobe", "cache_mb", "setup_s", "eval": {B: {peak_rss_mb, wall_s, rc, R@1...}}, "verify": {...},
    "same_metrics": bool}."""
    workdir = Path(workdir)
    cache, data, model = workdir / "cache", workdir / "data", workdir / "student"
    start = time.perf_counter()
    from mclip.store import shards

    manifest = shards.read_manifest(cache) if cache.is_dir() else None
    if not (
        manifest
        and manifest.get("complete")
        and manifest["totals"]["rows"] == rows
        and manifest["dim"] == dim
        and manifest.get("format_version") == shards.FORMAT_VERSION
    ):
        for stale in (cache, data, model):  # built for another size: start over
            shutil.rmtree(stale, ignore_errors=True)
        manifest = write_cache(cache, rows, dim)
    if not (data / "state.json").exists():
        write_eval_data(data, rows)
    if not (model / "mclip.json").exists():
        write_student(model, manifest)
    setup_s = time.perf_counter() - start
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(common.ROOT),
    )
    result = {
        "rows": rows,
        "dim": manifest["dim"],
        "index": index,
        "nprobe": nprobe,
        "threads": threads,
        "cache_mb": round(sum(f.stat().st_size for f in shards.shard_files(cache)) / 2**20, 1),
        "setup_s": round(setup_s, 1),
        "eval": {},
    }
    metrics = []
    for batch in query_batch_sizes:
        out = workdir / f"eval-qb{batch}"
        cmd = [
            sys.executable,
            "-m",
            "mclip",
            "eval-retrieval",
            "--model",
            str(model),
            "--cache",
            str(cache),
            "--data",
            str(data),
            "--languages",
            "de",
            "--index",
            index,
            "--query-batch-size",
            str(batch),
            "--batch-size",
            "1024",
            "--no-faiss-gpu",
            "--device",
            "cpu",
            "--no-progress",
            "--overwrite",
            "--out",
            str(out),
        ] + (["--nprobe", str(nprobe)] if nprobe else [])
        run = timed(cmd, env, timeout)
        if run["rc"] == 0:
            found = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            metrics.append(found)
            run.update(
                {
                    key: round(found[key], 5)
                    for key in ("de/text_to_text/R@1", "de/text_to_text/R@10", "de/text_to_text_reverse/R@10")
                }
            )
            run["eval_seconds"] = json.loads((out / "eval.json").read_text(encoding="utf-8"))["seconds"]
        result["eval"][batch] = run
    result["same_metrics"] = len(metrics) == len(query_batch_sizes) and all(m == metrics[0] for m in metrics)
    if verify:
        result["verify"] = timed([sys.executable, "-m", "mclip", "verify", str(cache)], env, timeout)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--query-batch-size", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--index", default="IVF1024,PQ16")
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/mclip-scale-eval", help="caches and runs land in WORKDIR/rows-N (reused)")
    args = p.parse_args(argv)
    results = [
        measure_eval(
            n,
            Path(args.workdir) / f"rows-{n}",
            tuple(args.query_batch_size),
            args.index,
            args.nprobe,
            args.dim,
            args.threads,
        )
        for n in args.rows
    ]
    summary = []
    for r in results:
        for batch, run in r["eval"].items():
            summary.append(
                f"eval-retrieval rows={r['rows']:,} --query-batch-size {batch}: peak RSS {run['peak_rss_mb']} MiB "
                f"(anon {run['peak_anon_mb']}, mapped files {run['peak_file_mb']}), wall {run['wall_s']} s (rc {run['rc']})"
            )
        summary.append(
            f"verify rows={r['rows']:,} ({r['cache_mb']} MiB cache): peak RSS {r['verify']['peak_rss_mb']} MiB, "
            f"wall {r['verify']['wall_s']} s; same metrics for every batch size: {r['same_metrics']}"
        )
    common.emit(summary, {"results": results})


if __name__ == "__main__":
    main()
