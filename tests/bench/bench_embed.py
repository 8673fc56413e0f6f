"""Stage-1 benchmark: `mclip.embed.run.run` end to end against the naive padded loop, distance to matmul peak, flat memory.

    python tests/bench/bench_embed.py            # 2,000 captions (20,000 for memory), 3 repeats, CPU: about 10 minutes
    python tests/bench/bench_embed.py --quick    # about a minute: 200 captions (64 naive), one repeat, memory 100 vs 500
    python tests/bench/bench_embed.py --device cuda --precision bf16 --captions 200000 ...   # see tests/bench/gpu.sh

Teacher: a CLIP ViT-B/16-sized text tower (random init; weights do not change speed) with the real CLIP tokenizer.
Both ways run in this process at the same thread count, interleaved repeat by repeat; figures are medians. mclip is
timed around the whole `run()` call (loading the teacher, tokenising, writing shards and manifest); the naive loop only
around its loop (model loaded beforehand), so the speed-up is a lower bound. The last printed line is the JSON result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # tests/bench is the script's folder; also puts this checkout first on sys.path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="finish within a minute on a 2-core CPU (smaller sizes, one repeat)"
    )
    p.add_argument("--captions", type=int, help="captions for the speed comparison (default 2000; 200 with --quick)")
    p.add_argument(
        "--naive-captions",
        type=int,
        help="captions for the naive loop (default: --captions; 64 with --quick); rates are per caption",
    )
    p.add_argument("--rss-small", type=int, help="captions of the small memory run (default 2000; 100 with --quick)")
    p.add_argument("--rss-large", type=int, help="captions of the large memory run (default 20000; 500 with --quick)")
    p.add_argument("--repeats", type=int, help="timed repeats of each way (default 3; 1 with --quick)")
    p.add_argument(
        "--layers", type=int, help="teacher layers (default 12, the B/16 text tower); fewer only for smoke tests"
    )
    p.add_argument(
        "--width", type=int, help="teacher width (default 512, the B/16 text tower); smaller only for smoke tests"
    )
    p.add_argument("--threads", type=int, help="torch threads for both ways (default: torch's default)")
    p.add_argument(
        "--batch-tokens", type=int, help="stage-1 token budget per batch (default: mclip's default for the device)"
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="stage-1 captions per shard (mclip's default 10000)")
    p.add_argument(
        "--rss-shard-size",
        type=int,
        help="captions per shard in the memory runs (default --shard-size; 100 "
        "with --quick, so that the large memory run still streams shards)",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=1024, help="stage-1 cap on captions per batch (mclip's default 1024)"
    )
    p.add_argument("--naive-batch", type=int, default=64, help="naive loop batch size (padded to 77 tokens)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", help="stage-1 precision: auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.add_argument("--skip-naive", action="store_true", help="time mclip only (naive figures become null)")
    p.add_argument("--skip-rss", action="store_true", help="skip the two memory runs (RSS figures become null)")
    p.add_argument(
        "--peak-size",
        type=int,
        help="side of the square matmul that measures the peak (default 4096 on CPU, 8192 on GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rss-child", action="store_true", help=argparse.SUPPRESS
    )  # internal: one stage-1 run, print peak RSS
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (
        ("captions", 2000, 200),
        ("rss_small", 2000, 100),
        ("rss_large", 20000, 500),
        ("repeats", 3, 1),
        ("rss_shard_size", args.shard_size, 100),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.naive_captions = args.naive_captions or (min(64, args.captions) if quick else args.captions)
    args.peak_repeats = 2 if quick else 3
    return args


def embed_config(args, data: Path, out: Path):
    from mclip.config import EmbedConfig

    return EmbedConfig(
        data=str(data),
        out=str(out),
        teacher=str(args.teacher),
        overwrite=True,
        progress=False,
        device=args.device,
        precision=args.precision,
        num_threads=args.threads,
        batch_tokens=args.batch_tokens,
        shard_size=args.shard_size,
        max_batch_size=args.max_batch_size,
    )


def rss_child(args) -> None:
    """One stage-1 run in a fresh process: its peak RSS is what a user would see for this many captions."""
    import torch

    from mclip.embed import run as embed_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    result = embed_teacher.run(embed_config(args, Path(args.data), Path(args.out)))
    print(json.dumps({"peak_rss_mb": common.peak_rss_mb(), "rows": result.rows}))


def measure_rss(args, runs: dict[str, tuple[Path, Path]]) -> dict[str, float]:
    """Peak RSS of one stage-1 run per (data, out), each in its own process; they run side by side (a process's peak
    RSS does not depend on its neighbours, and the timings are already taken)."""
    procs = {}
    for name, (data, out) in runs.items():
        cmd = [
            sys.executable,
            __file__,
            "--rss-child",
            "--teacher",
            str(args.teacher),
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            args.device,
            "--precision",
            args.precision,
            "--shard-size",
            str(args.rss_shard_size),
            "--max-batch-size",
            str(args.max_batch_size),
        ]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--batch-tokens", str(args.batch_tokens)] if args.batch_tokens else []
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"bench: the memory run {name} failed:\n{stderr[-3000:]}")
        peaks[name] = float(json.loads(stdout.strip().splitlines()[-1])["peak_rss_mb"])
    return peaks


class Naive:
    """What a typical script does: CLIPModel.get_text_features on fixed batches padded to 77 tokens, fp32, unsorted."""

    def __init__(self, folder: Path, device, batch: int):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.device, self.batch = device, batch

    def __call__(self, texts: list[str]):
        import numpy as np
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch):
                inputs = self.tokenizer(
                    texts[start : start + self.batch],
                    padding="max_length",
                    max_length=77,
                    truncation=True,
                    return_tensors="pt",
                ).to(self.device)
                features = self.model.get_text_features(**inputs)
                features = (
                    features if isinstance(features, torch.Tensor) else features.pooler_output
                )  # transformers 5: an output
                out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(out)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.rss_child:
        return rss_child(args)

    import numpy as np
    import torch

    from mclip import distributed
    from mclip.embed import run as embed_teacher
    from mclip.models.teacher import load_teacher
    from mclip.store import shards

    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device)
    precision = distributed.resolve_precision(args.precision, device)
    peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tmp = tempfile.TemporaryDirectory(prefix="mclip-bench-embed-")
    root = Path(tmp.name)
    t0 = time.perf_counter()
    args.teacher = common.write_b16_teacher(root / "teacher", layers=args.layers, width=args.width, seed=args.seed)
    biggest = max(args.captions, args.naive_captions, args.rss_large)
    texts = common.make_captions(biggest, args.seed)
    data = common.write_captions(root / "captions", texts[: args.captions])
    rss_data = {n: common.write_captions(root / f"captions-{n}", texts[:n]) for n in (args.rss_small, args.rss_large)}
    warm = common.write_captions(root / "warmup", texts[:16])
    naive_texts = texts[: args.naive_captions]
    print(f"setup {time.perf_counter() - t0:.1f}s: teacher and {biggest:,} captions in {root}", file=sys.stderr)

    # Token lengths for the FLOP count: stage 1 reports its exact real-token total; the small attention term (sum of
    # squared lengths) comes from a sample, as tokenising a million captions here would take longer than embedding them.
    teacher = load_teacher(str(args.teacher), max_length=77)
    tower = teacher.model.config
    lengths = np.array(
        [len(t) for t in teacher.tokenize(texts[: min(args.captions, 20_000)], threads=os.cpu_count() or 1)[0]]
    )
    del teacher
    naive = None if args.skip_naive else Naive(args.teacher, device, args.naive_batch)

    # Warm-up: first calls pay for lazy imports, allocator growth and kernel selection.
    embed_teacher.run(embed_config(args, warm, root / "warm-out"))
    if naive is not None:
        naive(texts[:8])

    ours, naive_rates, peaks, result = [], [], [], None
    for r in range(args.repeats):
        peaks.append(
            common.matmul_peak_flops(args.peak_size, repeats=args.peak_repeats, device=device, dtype=peak_dtype)
        )
        shutil.rmtree(root / "cache", ignore_errors=True)  # a finished cache would make run() return at once
        start = time.perf_counter()
        result = embed_teacher.run(embed_config(args, data, root / "cache"))
        ours.append(time.perf_counter() - start)
        if naive is not None:
            start = time.perf_counter()
            naive_emb = naive(naive_texts)
            sync(device)
            naive_rates.append(len(naive_texts) / (time.perf_counter() - start))
        print(
            f"repeat {r + 1}/{args.repeats}: mclip {args.captions / ours[-1]:,.1f} captions/s "
            f"(its shard loop {result.captions_per_s:,.1f}), naive {naive_rates[-1] if naive_rates else float('nan'):,.1f} captions/s, "
            f"matmul peak {peaks[-1] / 1e9:,.1f} GFLOP/s",
            file=sys.stderr,
        )
    peaks.append(common.matmul_peak_flops(args.peak_size, repeats=args.peak_repeats, device=device, dtype=peak_dtype))

    diff = None
    if naive is not None:
        cached = shards.open_cache(root / "cache").embeddings()
        common_n = min(len(cached), len(naive_emb))
        diff = float(np.abs(cached[:common_n].astype(np.float32) - naive_emb[:common_n]).max())

    rss_small = rss_large = None
    if not args.skip_rss:
        peaks_mb = measure_rss(
            args,
            {
                "small": (rss_data[args.rss_small], root / "rss-small"),
                "large": (rss_data[args.rss_large], root / "rss-large"),
            },
        )
        rss_small, rss_large = peaks_mb["small"], peaks_mb["large"]

    flops = common.text_tower_flops(
        result.tokens,
        float(np.mean(lengths**2)) * result.captions,
        result.captions,
        tower.hidden_size,
        tower.num_hidden_layers,
        tower.intermediate_size,
        tower.projection_dim,
    )
    seconds = common.median(ours)
    captions_per_s = args.captions / seconds
    naive_per_s = common.median(naive_rates) if naive_rates else None
    peak = max(peaks)  # contention only ever slows a matmul: the best measurement is the machine's peak
    res = {
        "captions_per_s": common.sig(captions_per_s),
        "naive_captions_per_s": common.sig(naive_per_s) if naive_per_s else None,
        "speedup_vs_naive": common.sig(captions_per_s / naive_per_s) if naive_per_s else None,
        "fraction_of_peak": common.sig(flops / seconds / peak),
        "peak_rss_mb_small": common.sig(rss_small) if rss_small else None,
        "peak_rss_mb_large": common.sig(rss_large) if rss_large else None,
        "rss_ratio": common.sig(rss_large / rss_small) if rss_small else None,
        "loop_captions_per_s": common.sig(result.captions_per_s),  # stage 1's own rate: not loading model and data
        "achieved_gflops": common.sig(flops / seconds / 1e9),
        "peak_gflops": common.sig(peak / 1e9),
        "peak_dtype": str(peak_dtype).replace("torch.", ""),
        "captions": args.captions,
        "naive_captions": args.naive_captions,
        "rss_captions": [args.rss_small, args.rss_large],
        "rss_shard_size": args.rss_shard_size,
        "mean_tokens": common.sig(result.tokens / result.captions),
        "unique_captions": result.captions,
        "max_abs_diff_vs_naive": common.sig(diff) if diff is not None else None,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": precision,
        "batch_tokens": args.batch_tokens or embed_teacher.default_batch_tokens(device),
        "max_batch_size": args.max_batch_size,
        "quick": args.quick,
        "load_avg_1min": common.sig(os.getloadavg()[0], 3),  # other work on the machine when the run ended
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    lines = [
        f"stage 1 on {args.captions:,} captions (mean {res['mean_tokens']:.1f} tokens), {precision}, "
        f"{res['threads']} threads, {res['device']}:",
        f"  mclip embed-teacher  {captions_per_s:10,.1f} captions/s end to end (median of {args.repeats}; "
        f"{result.captions_per_s:,.1f} in its shard loop, which leaves out loading the model and data)",
    ]
    if naive_per_s:
        lines.append(
            f"  naive padded loop    {naive_per_s:10,.1f} captions/s   -> speed-up {res['speedup_vs_naive']:.2f}x (target >= 3)"
        )
    lines.append(
        f"  achieved {res['achieved_gflops']:,.1f} GFLOP/s on real tokens = {res['fraction_of_peak']:.2f} of the "
        f"{res['peak_dtype']} matmul peak {res['peak_gflops']:,.1f} GFLOP/s (target >= 0.5 on CPU)"
    )
    if rss_small:
        lines.append(
            f"  peak RSS {rss_small:,.0f} MiB on {args.rss_small:,} captions, {rss_large:,.0f} MiB on {args.rss_large:,} "
            f"-> ratio {res['rss_ratio']:.3f} (target <= 1.1)"
        )
    if diff is not None:
        lines.append(f"  embeddings agree with the naive loop within {diff:.1e} (float16 cache)")
    common.emit(lines, res)
    tmp.cleanup()


if __name__ == "__main__":
    main()
