"""Stage 1 at scale: peak RSS and captions embedded of `mclip embed-teacher` over N rows holding D distinct captions.

    python tests/bench/scale_stage1.py --rows 100000 1000000 --distinct 160      # the issue's figures (#13)
    python tests/bench/scale_stage1.py --rows 100000 --distinct 0                # 0: every caption distinct

Each run is `python -m mclip embed-teacher` in a fresh process under `/usr/bin/time -v` (peak RSS is its "Maximum
resident set size"), with a tiny random CLIP text teacher (hidden 32, 2 layers), an id column, on CPU, one thread. The
input is a parquet file loaded through `datasets` as stage 1 loads any input; the datasets cache goes to the work
folder, so every run converts it afresh. The parent also samples /proc/PID/status every 20 ms for the peak anonymous
and file-backed parts of the RSS (a memory-mapped input counts in the RSS once read). One JSON line per run;
`measure(...)` returns the same dict for tests/bench/bench_scale.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import common  # run as a script: tests/bench is the script's folder; also puts this checkout first on sys.path
except ImportError:  # imported as tests.bench.scale_stage1 (tests/bench/bench_scale.py)
    from tests.bench import common


def write_input(path: Path, rows: int, distinct: int, seed: int = 0) -> Path:
    """A parquet file of `rows` rows (id, caption): `distinct` captions spread at random over the rows (0: all
    distinct)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    if distinct:
        pool = pa.array(common.make_captions(distinct, seed), pa.string())
        captions = pool.take(pa.array(rng.integers(0, distinct, rows)))
    else:
        captions = pa.array([f"{c} {i}" for i, c in enumerate(common.make_captions(rows, seed))], pa.string())
    ids = pa.array(np.char.add("r", np.arange(rows).astype(str)), pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "caption": captions}), path, row_group_size=65536)
    return path


def _teacher(folder: Path) -> Path:
    from tests import tiny

    return tiny.write_tiny_clip(folder, with_vision=False)


def measure(rows: int, distinct: int, work: Path, shard_size: int = 10_000, extra: list[str] | None = None) -> dict:
    """One stage-1 run over `rows` rows with `distinct` distinct captions (0: all distinct), in `work` (left there)."""
    work = Path(work)
    data = write_input(work / f"in-{rows}-{distinct}" / "captions.parquet", rows, distinct)
    teacher = _teacher(work / "teacher") if not (work / "teacher" / "config.json").exists() else work / "teacher"
    out = work / f"out-{rows}-{distinct}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "mclip",
        "embed-teacher",
        "--data",
        str(data),
        "--out",
        str(out),
        "--teacher",
        str(teacher),
        "--id-column",
        "id",
        "--device",
        "cpu",
        "--num-threads",
        "1",
        "--no-progress",
        "--shard-size",
        str(shard_size),
        *(extra or []),
    ]
    env = common.environment(1, HF_DATASETS_CACHE=str(work / f"hf-{rows}-{distinct}"))
    run = common.sampled(cmd, env)
    if run["rc"] != 0:
        sys.exit(f"scale_stage1: embed-teacher failed on {rows} rows:\n{run['stderr_tail']}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    totals = manifest["totals"]
    return {
        "rows": rows,
        "distinct": distinct or rows,
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_anon_mb": run["peak_anon_mb"],
        "peak_rss_file_mb": run["peak_file_mb"],
        "captions_embedded": totals.get("embedded", rows - totals.get("duplicates", 0)),
        "totals": totals,
        "wall_s": run["wall_s"],
        "shards": len(manifest["shards"]),
    }


def main(argv=None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="input sizes, one run each")
    p.add_argument(
        "--distinct", type=int, default=160, help="distinct captions in each input (0: every caption distinct)"
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="stage-1 captions per shard (mclip's default 10000)")
    p.add_argument("--work", help="work folder (default: a temp folder, removed at the end)")
    p.add_argument("--no-dedup", action="store_true", help="pass --no-dedup to embed-teacher")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mclip-scale-"))
    try:
        results = [
            measure(rows, args.distinct, work, args.shard_size, ["--no-dedup"] if args.no_dedup else None)
            for rows in args.rows
        ]
        for result in results:
            print(json.dumps(result), flush=True)
        if len(results) > 1:
            print(
                json.dumps(
                    {
                        "rss_ratio": round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3),
                        "rows": [r["rows"] for r in results],
                    }
                )
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
