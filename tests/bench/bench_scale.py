"""Memory at scale: peak RSS of every stage as the rows grow, on synthetic caches written straight through the shard writer.

What is measured is memory, not the teacher, so stage 2's caches hold random unit vectors (512-d float16, as CLIP
B/16's) and 10M rows need no teacher run. Each command runs in its own process tree, sampled every 50 ms from /proc:
"peak RSS" is the largest VmHWM of any process of the tree (what `/usr/bin/time -v` reports), "private" the largest
RssAnon, the memory a process holds alone; the rest of RSS is file pages of the memory-mapped cache, which the page cache
holds once per node for all ranks and can drop. A torchrun rank is one process of the tree, so the figures are per rank.

    python tests/bench/bench_scale.py --out /tmp/scale            # 100k, 1M, 10M rows (about 25 GB of disk, ~30 min)
    python tests/bench/bench_scale.py --out /tmp/scale --sizes 100000,1000000 --quick --stages train,verify

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.bench.common import ROOT, emit, sampled, sig  # noqa: E402

SHARD_ROWS = 500_000


def measured(cmd: list[str], env: dict | None = None, timeout: float = 3600) -> dict:
    """common.sampled, stopping the benchmark on a failed command: peak RSS, private (RssAnon) and wall time."""
    run = sampled(cmd, env, timeout)
    if run["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({run['rc']}):\n{run['stderr_tail']}")
    return {"peak_rss_mb": run["peak_rss_mb"], "private_mb": run["peak_anon_mb"], "wall_s": run["wall_s"]}


# ---- inputs ----


def tiny_teacher_cache(work: Path) -> Path:
    """A real stage-1 cache of a few rows from a tiny CLIP teacher with a 512-d projection: the manifest the synthetic
    caches copy (teacher record, format fields), so train-student and eval-retrieval read them as they read real ones."""
    from tests import tiny

    folder = work / "teacher-cache"
    if (folder / "manifest.json").exists():
        return folder
    teacher = tiny.write_tiny_clip(work / "teacher", with_vision=False, projection_dim=512)
    data = tiny.write_captions(work / "few.jsonl", [{"id": f"r{i}", "caption": f"caption {i}"} for i in range(8)])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mclip",
            "embed-teacher",
            "--teacher",
            str(teacher),
            "--data",
            str(data),
            "--id-column",
            "id",
            "--out",
            str(folder),
            "--no-progress",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return folder


def synthetic_cache(folder: Path, rows: int, template: Path, distinct: int | None = None, seed: int = 0) -> Path:
    """`rows` rows (ids r0.., English "caption <i % distinct>", random unit vectors) in shards of SHARD_ROWS, with the
    manifest of `template`; columns as the installed mclip's schema has them (caption_group when it has one)."""
    import pyarrow as pa

    from mclip.store import outputs, shards

    if (folder / "manifest.json").exists() and json.loads((folder / "manifest.json").read_text())["totals"][
        "rows"
    ] == rows:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    manifest = json.loads((template / "manifest.json").read_text())
    dim, dtype = int(manifest["dim"]), manifest["dtype"]
    schema = shards.cache_schema(dim, dtype)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(
        (65_536, dim), dtype=np.float32
    )  # rows are drawn from a pool: the values do not matter here
    pool = shards.fixed_list(pool / np.linalg.norm(pool, axis=1, keepdims=True), dtype)
    entries = []
    for k, first in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - first)
        index = np.arange(first, first + n)
        text_of = index % distinct if distinct else index
        columns = {
            "id": pa.array(np.char.add("r", index.astype(str))),
            "text": pa.array(np.char.add("caption ", text_of.astype(str))),
            "embedding": pool.take(pa.array(rng.integers(0, len(pool), n))),
            "caption_group": pa.array(text_of.astype(np.int64)),
        }  # stage 1's: the input row of the caption's first appearance
        names = list(schema.names) + [name for name in columns if name not in schema.names]
        table = pa.table({name: columns[name] for name in names})
        path = shards.write_shard(
            folder,
            k,
            table,
            {
                "shard": k,
                "first_row": first,
                "end_row": first + n,
                "rows": n,
                "skipped": 0,
                "truncated": 0,
                "duplicates": 0,
            },
        )
        entries.append(
            {
                "file": path.name,
                "rows": n,
                "first_row": first,
                "end_row": first + n,
                "bytes": path.stat().st_size,
                "sha256": outputs.file_sha256(path),
            }
        )
    manifest.update(
        {
            "shards": entries,
            "totals": {"input_rows": rows, "rows": rows, "skipped": 0, "truncated": 0, "duplicates": 0},
            "data": {"source": "synthetic", "split": "train", "limit": None},
        }
    )
    shards.write_manifest(folder, manifest)
    return folder


def captions_file(path: Path, rows: int, lang: str = "zh") -> Path:
    """The translated side: id + caption_<lang> for every cache row, as parquet (read by `datasets`, memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), (f"caption_{lang}", pa.string())])) as writer:
        for first in range(0, rows, 1_000_000):
            index = np.arange(first, min(rows, first + 1_000_000))
            writer.write_table(
                pa.table(
                    {
                        "id": pa.array(np.char.add("r", index.astype(str))),
                        f"caption_{lang}": pa.array(np.char.add("图片 ", (index % 997).astype(str))),
                    }
                )
            )
    return path


def tiny_student(work: Path) -> Path:
    from tests import tiny

    folder = work / "student"
    if not (folder / "config.json").exists():
        tiny.write_tiny_bert(folder, corpus=["图片 caption 0 1 2 3 4 5 6 7 8 9"])
    return folder


# ---- the stages ----


def train_student(cache: Path, data: Path, student: Path, out: Path, ranks: int, group_batches: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "-m",
        "mclip",
        "train-student",
        "--cache",
        str(cache),
        "--data",
        str(data),
        "--student",
        str(student),
        "--languages",
        "zh",
        "--out",
        str(out),
        "--batch-size",
        "64",
        "--max-steps",
        "3",
        "--warmup-steps",
        "1",
        "--num-workers",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        "--val-fraction",
        "0.001",
        "--val-max-ids",
        "1000",
        "--group-batches",
        str(group_batches),
        "--no-progress",
        "--num-threads",
        "1",
    ]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            str(29500 + os.getpid() % 1000),
            *args[1:],
        ]
    else:
        cmd = [sys.executable, *args]
    return measured(cmd, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def verify(cache: Path) -> dict:
    return measured([sys.executable, "-m", "mclip", "verify", str(cache)], {"PYTHONPATH": str(ROOT)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (caches of 10M rows take ~11 GB)")
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument(
        "--group-batches",
        type=int,
        default=1,
        help="train-student's length grouping (64 is the default; 1 skips the token-length pass, which at 10M "
        "rows tokenises 20M captions on this machine's cores for ~30 min and is itself flat: a file)",
    )
    parser.add_argument("--quick", action="store_true", help="one rank only")
    parser.add_argument(
        "--stages",
        default="embed,train,eval,verify",
        help="which to measure: embed (stage 1 with a tiny teacher, at the sizes up to 1M; 160 distinct "
        "captions, as LAION repeats them), train, eval (stage 3 at the sizes up to 1M, IVF1024,PQ16, "
        "--query-batch-size 1024 and 8192), verify",
    )
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    template = tiny_teacher_cache(work)
    student = tiny_student(work)
    stages = set(args.stages.split(","))
    rows, summary = [], []
    for n in sizes:
        if "embed" in stages and n <= 1_000_000:
            from tests.bench.scale_stage1 import measure

            m = measure(n, 160, work / "stage1")
            rows.append(
                {
                    "stage": "embed-teacher",
                    "rows": n,
                    "ranks": 1,
                    "peak_rss_mb": m["peak_rss_mb"],
                    "private_mb": m["peak_rss_anon_mb"],
                    "wall_s": m["wall_s"],
                    "captions_embedded": m["captions_embedded"],
                }
            )
        if "eval" in stages and n <= 1_000_000:
            from tests.bench.scale_eval import measure_eval

            m = measure_eval(n, work / f"eval-{n}", verify=False)
            for batch, run in m["eval"].items():
                rows.append(
                    {
                        "stage": f"eval q{batch}",
                        "rows": n,
                        "ranks": 1,
                        "peak_rss_mb": run["peak_rss_mb"],
                        "private_mb": run["peak_anon_mb"],
                        "wall_s": run["wall_s"],
                    }
                )
            summary.append(
                f"eval-retrieval at {n:,}: the same metrics for every --query-batch-size: {m['same_metrics']}"
            )
        if not {"train", "verify"} & stages:
            continue
        cache = synthetic_cache(work / f"cache-{n}", n, template)
        data = captions_file(work / f"captions-{n}.parquet", n)
        disk = sum(f.stat().st_size for f in cache.iterdir())
        for ranks in ((1,) if args.quick else (1, 2)) if "train" in stages else ():
            m = train_student(cache, data, student, work / f"run-{n}-{ranks}", ranks, args.group_batches)
            rows.append({"stage": "train-student", "rows": n, "ranks": ranks, **m})
        if "verify" in stages:
            rows.append({"stage": "verify", "rows": n, "ranks": 1, **verify(cache)})
        summary.append(f"{n:,} rows: cache {disk / 1e9:.2f} GB")
        if not args.keep and n == sizes[-1] and n >= 10_000_000:
            shutil.rmtree(cache, ignore_errors=True)
    base = {(r["stage"], r["ranks"]): r for r in rows if r["rows"] == sizes[0]}
    print(
        f"{'stage':<15} {'rows':>11} {'ranks':>5} {'peak RSS MB':>12} {'private MB':>11} {'x first':>8} {'wall s':>7}"
    )
    for r in rows:
        ratio = r["peak_rss_mb"] / base[r["stage"], r["ranks"]]["peak_rss_mb"]
        r["peak_rss_vs_first"] = sig(ratio)
        print(
            f"{r['stage']:<15} {r['rows']:>11,} {r['ranks']:>5} {r['peak_rss_mb']:>12,.0f} {r['private_mb']:>11,.0f} {ratio:>8.2f} {r['wall_s']:>7.1f}"
            + (f"  ({r['captions_embedded']:,} captions embedded)" if "captions_embedded" in r else "")
        )
    emit(summary, {"bench": "scale", "group_batches": args.group_batches, "rows": rows})


if __name__ == "__main__":
    main()
