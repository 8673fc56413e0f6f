"""Where stage 1's time goes: the end-to-end rate beside its parts, and a torch.profiler table of one run.

    python tests/bench/profile_embed.py --device cuda --precision bf16 --captions 200000 --out gpu-out   # ~1 min on a GPU
    python tests/bench/profile_embed.py --quick --out /tmp/prof                                           # CPU, seconds

Stage 1 overlaps three things: a reader thread that tokenises shard k+1, the forward of shard k on the device, a writer
thread that builds and writes the Arrow shard k-1. When the end-to-end rate falls short of the compute-only rate, one
of the other two is the bottleneck; this script times each alone on the same captions and teacher (B/16-sized text
tower, random init, the real CLIP tokenizer, as bench_embed.py):
  tokenize   `teacher.tokenize` with the threads stage 1 uses on this device;
  compute    stage 1's own compute-only rate (forward + copy back, from its result);
  end_to_end `mclip.embed_teacher.run`, loading and writing included;
and writes the profiler's table (ops by self device time on GPU, by self CPU time otherwise) to OUT/profile_embed.txt.
The last printed line is the JSON result.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # tests/bench is the script's folder; also puts this checkout first on sys.path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds on a CPU: a 2-layer, 128-wide tower and 300 captions")
    p.add_argument("--captions", type=int, help="captions (default 200000 on GPU, 2000 on CPU, 300 with --quick)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.add_argument("--out", default="profile-out", help="folder for profile_embed.txt")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from mclip import distributed, embed_teacher
    from mclip.config import EmbedConfig
    from mclip.teacher import load_teacher

    device = distributed.resolve_device(args.device)
    n = args.captions or (300 if args.quick else 200_000 if device.type == "cuda" else 2000)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="mclip-profile-embed-")
    root = Path(tmp.name)
    teacher_dir = common.write_b16_teacher(root / "teacher", layers=2 if args.quick else None, width=128 if args.quick else None,
                                           seed=args.seed)
    texts = common.make_captions(n, args.seed)
    data = common.write_captions(root / "captions", texts)
    warm = common.write_captions(root / "warm", texts[:64])

    def config(src: Path, out: Path) -> EmbedConfig:
        return EmbedConfig(data=str(src), out=str(out), teacher=str(teacher_dir), overwrite=True, progress=False,
                           device=args.device, precision=args.precision)

    embed_teacher.run(config(warm, root / "warm-out"))  # first-use costs: imports, allocator, kernel choice

    teacher = load_teacher(str(teacher_dir), max_length=77)
    threads = embed_teacher._tokenize_threads(device)
    start = time.perf_counter()
    teacher.tokenize(texts, threads=threads)
    tokenize_s = time.perf_counter() - start

    start = time.perf_counter()
    result = embed_teacher.run(config(data, root / "cache"))
    end_to_end_s = time.perf_counter() - start

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        embed_teacher.run(config(data, root / "cache-profiled"))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    (out_dir / "profile_embed.txt").write_text(table + "\n", encoding="utf-8")

    rates = {"end_to_end": n / end_to_end_s, "compute": result.captions_per_s, "tokenize": n / tokenize_s}
    res = {
        "captions_per_s": common.sig(rates["end_to_end"]),
        "compute_captions_per_s": common.sig(rates["compute"]),
        "tokenize_captions_per_s": common.sig(rates["tokenize"]),
        "tokenize_threads": threads,
        "slowest_part": min(("tokenize", "compute"), key=rates.get),  # what end_to_end cannot beat
        "overlap_efficiency": common.sig(rates["end_to_end"] / min(rates["tokenize"], rates["compute"])),  # 1.0: fully hidden
        "captions": n,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "profile": str(out_dir / "profile_embed.txt"),
        "quick": args.quick,
    }
    common.emit([f"stage 1 on {n:,} captions, {device}: end to end {rates['end_to_end']:,.0f} captions/s, compute only "
                 f"{rates['compute']:,.0f}, tokenising alone ({threads} threads) {rates['tokenize']:,.0f}; profiler table in "
                 f"{out_dir / 'profile_embed.txt'}", table], res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
