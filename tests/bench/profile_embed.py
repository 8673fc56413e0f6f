"""Where stage 1's time goes: the end-to-end rate beside the model alone and the host side alone, and a profiler table.

    python tests/bench/profile_embed.py --device cuda --precision bf16 --captions 200000 --out gpu-out   # ~1 min on a GPU
    python tests/bench/profile_embed.py --quick --out /tmp/prof                                           # CPU, seconds

Stage 1 overlaps the host side (a reader thread that reads, tokenises and pads shard k+1; a writer thread that builds
and writes shard k-1) with the teacher's forward of shard k. End to end it cannot beat the slower of the two, so this
script times each alone on the same captions and teacher (B/16-sized text tower, random init, the real CLIP
tokenizer, as bench_embed.py):
  model      the teacher's forward over stage 1's own padded batches, already tokenised (device-synchronised);
  host       `mclip.embed.run.run` with the forward replaced by zeros: reading, tokenising, padding, writing
             (its shard loop's rate, as stage 1 reports it: loading the model and the data are not counted);
  tokenize   `teacher.tokenize` alone, with the threads stage 1 uses on this device;
  end_to_end `mclip.embed.run.run`, loading and writing included, and its shard loop's rate (`loop`), which
             `overlap_efficiency` sets against the slower of model and host (1.0: the faster one is fully hidden);
and writes the profiler's table of one end-to-end run (ops by self device time on GPU, by self CPU time otherwise) to
OUT/profile_embed.txt; on GPU also the share of that run's wall time the device spent in kernels (`device_busy`).
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

    from mclip import distributed
    from mclip.config import EmbedConfig
    from mclip.embed import run as embed_teacher
    from mclip.models.teacher import load_teacher

    device = distributed.resolve_device(args.device)
    n = args.captions or (300 if args.quick else 200_000 if device.type == "cuda" else 2000)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="mclip-profile-embed-")
    root = Path(tmp.name)
    teacher_dir = common.write_b16_teacher(
        root / "teacher", layers=2 if args.quick else None, width=128 if args.quick else None, seed=args.seed
    )
    texts = common.make_captions(n, args.seed)
    data = common.write_captions(root / "captions", texts)
    warm = common.write_captions(root / "warm", texts[:64])

    def config(src: Path, out: Path) -> EmbedConfig:
        return EmbedConfig(
            data=str(src),
            out=str(out),
            teacher=str(teacher_dir),
            overwrite=True,
            progress=False,
            device=args.device,
            precision=args.precision,
        )

    embed_teacher.run(config(warm, root / "warm-out"))  # first-use costs: imports, allocator, kernel choice

    teacher = load_teacher(
        str(teacher_dir),
        device=str(device),
        precision=distributed.resolve_precision(args.precision, device),
        max_length=77,
    )
    threads = embed_teacher._tokenize_threads(device)
    teacher.tokenize(texts[:10])  # builds the tokenizer stage 1 calls (once per run, ~0.5 s for CLIP's vocabulary)
    start = time.perf_counter()
    tokens, _ = teacher.tokenize(texts, threads=threads)
    tokenize_s = time.perf_counter() - start

    model_s = min(model_seconds(teacher, tokens, device) for _ in range(2))  # the first pays for kernel choice
    host = without_model(lambda: embed_teacher.run(config(data, root / "cache-host")))

    start = time.perf_counter()
    result = embed_teacher.run(config(data, root / "cache"))
    end_to_end_s = time.perf_counter() - start

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        embed_teacher.run(config(data, root / "cache-profiled"))
    profiled_s = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=args.rows)
    (out_dir / "profile_embed.txt").write_text(table + "\n", encoding="utf-8")
    device_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)

    # stage 1's own rate (`captions_per_s` of its result) counts the shard loop, not loading the model and the data
    rates = {
        "end_to_end": n / end_to_end_s,
        "loop": result.captions_per_s,
        "model": n / model_s,
        "host": host.captions_per_s,
        "tokenize": n / tokenize_s,
    }
    res = {
        "captions_per_s": common.sig(rates["end_to_end"]),
        "loop_captions_per_s": common.sig(rates["loop"]),
        "model_captions_per_s": common.sig(rates["model"]),
        "host_captions_per_s": common.sig(rates["host"]),
        "tokenize_captions_per_s": common.sig(rates["tokenize"]),
        "tokenize_threads": threads,
        "slowest_part": min(("model", "host"), key=rates.get),  # what end_to_end cannot beat
        "overlap_efficiency": common.sig(rates["loop"] / min(rates["model"], rates["host"])),  # 1.0: fully hidden
        "device_busy": common.sig(device_us / 1e6 / profiled_s) if device.type == "cuda" else None,
        "captions": n,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "profile": str(out_dir / "profile_embed.txt"),
        "quick": args.quick,
    }
    busy = f", device busy {res['device_busy']:.0%} of a profiled run" if res["device_busy"] is not None else ""
    common.emit(
        [
            f"stage 1 on {n:,} captions, {device}: end to end {rates['end_to_end']:,.0f} captions/s (its shard loop "
            f"{rates['loop']:,.0f}); the model alone "
            f"{rates['model']:,.0f}, the host side alone {rates['host']:,.0f} (tokenising alone, {threads} threads, "
            f"{rates['tokenize']:,.0f}); slowest: {res['slowest_part']}, overlap {res['overlap_efficiency']:.2f}{busy}; "
            f"profiler table in {out_dir / 'profile_embed.txt'}",
            table,
        ],
        res,
    )
    return res


def model_seconds(teacher, tokens: list[list[int]], device) -> float:
    """The teacher's forward over stage 1's batches of these token lists (inputs ready in host memory, pinned on CUDA;
    outputs copied back once, as stage 1 does): the rate no host side can lift stage 1 above."""
    import torch

    from mclip.config import EmbedConfig
    from mclip.embed import run as embed_teacher

    batches, _ = embed_teacher.padded_batches(
        tokens,
        teacher,
        embed_teacher.default_batch_tokens(device),
        EmbedConfig.max_batch_size,
        pin=device.type == "cuda",
    )
    _sync(device)
    start = time.perf_counter()
    outs = [torch.nn.functional.normalize(teacher.embed(input_ids, mask)[0], dim=-1) for _, input_ids, mask in batches]
    for out in outs:
        out.cpu()
    _sync(device)
    return time.perf_counter() - start


def without_model(run):
    """The result of one stage-1 run whose forward returns zeros on the device: everything but the model."""
    import torch

    from mclip.models.teacher import TeacherEncoder

    real = TeacherEncoder.embed

    def no_model(self, input_ids, mask, layers=()):
        input_ids = input_ids.to(self.device, non_blocking=True)  # the copy to the device stays: it is the host's
        return torch.zeros((input_ids.shape[0], self.dim), device=self.device), {}

    TeacherEncoder.embed = no_model
    try:
        return run()
    finally:
        TeacherEncoder.embed = real


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main(sys.argv[1:])
