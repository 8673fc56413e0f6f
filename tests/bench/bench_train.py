"""Stage-2 benchmark: `mclip.train.run.run` reading cached teacher targets against the same loop running the teacher online.

    python tests/bench/bench_train.py                  # B/16 text teacher, xlm-roberta-base-sized student: ~13 min on a busy 2-core CPU
    python tests/bench/bench_train.py --quick          # under a minute on a 2-core CPU: 2-layer, half-width models, 1 thread
    python tests/bench/bench_train.py --device cuda    # bf16, batch 256: about 90 s on an H100, model builds included

Teacher: a CLIP ViT-B/16-sized text tower (CLIPTextConfig defaults, random init; weights do not change speed) with the real
CLIP tokenizer. Student: an xlm-roberta-base-sized encoder (XLMRobertaConfig defaults, random init) with 32k vocabulary rows
(the real 250k would add the same optimizer work to both ways) and a whole-word WordPiece tokenizer built here over the words
it reads, which gives about the token counts XLM-R's SentencePiece gives (~1.1 per English word, ~1 per Chinese character).
Captions: emoji names (the `emoji` package's CLDR translations) joined into English captions of about 12 words and their
Chinese counterparts, fixed seed. Each caption gives two training pairs (zh and en), both with the English caption's target.

Three runs of the same loop on the same pairs, batch and student init, all through `mclip.train.run.run` (after an
untimed warm run over the same batches, on GPU and with --quick, so no timed run pays for first-use costs):
  cached   the product as shipped: targets read from the cache, batches made by --num-workers DataLoader workers;
  online   num_workers=0 and `EpochSteps` swapped for a subclass whose batches carry targets `teacher.embed` makes right
           then from the rows' English captions, in the training process on the training device (as a loop without a cache
           must: a GPU teacher cannot live in forked workers); the teacher runs once per distinct caption of the batch;
  paired   num_workers=0, each planned batch trained twice in a row, with cached then online targets: the two ways
           interleaved step by step on the same batch shapes, so a shared machine's changing load falls on both alike
           (`speedup_paired`; on CPU also `speedup_paired_cpu_time` from this process's CPU seconds, which other jobs do
           not stretch: the figures to trust on a busy CPU).
Speed is read from metrics.jsonl (log_every=1: one record per step): the median step time after --warmup steps, so model
loading, worker start-up, first-call allocations and the final export are left out. data_wait_fraction is the share of those
steps' time the loop spent blocked on the DataLoader (the `data_wait` field train-student writes), weighted by step time.
The last printed line is the JSON result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[2]
if (
    str(ROOT) not in sys.path
):  # run as `python tests/bench/bench_train.py` from anywhere: this checkout's mclip and tests
    sys.path.insert(0, str(ROOT))

# (layers, width, heads) of each model, the teacher's output dim and the student's vocabulary rows.
SIZES = {
    "full": dict(
        teacher=(12, 512, 8), dim=512, student=(12, 768, 12), vocab=32_000
    ),  # B/16 text tower, xlm-roberta-base
    "quick": dict(teacher=(2, 256, 4), dim=512, student=(2, 384, 6), vocab=32_000),  # both 1/6 as deep, half as wide
    "tiny": dict(
        teacher=(1, 64, 4), dim=64, student=(1, 64, 4), vocab=8_000
    ),  # smoke test only: takes every path in seconds
}
# (batch, warm-up steps, timed steps) per run
SCHEDULE = {
    "gpu": (256, 10, 40),
    "cpu": (64, 1, 3),
    "quick-gpu": (256, 5, 20),
    "quick-cpu": (32, 2, 3),
    "tiny": (8, 2, 2),
}
# English glue and its Chinese counterpart; captions are [opener] name (glue name)*
OPENERS = [
    ("a photo of", "一张照片："),
    ("a picture of", "一幅图片："),
    ("a close-up of", "特写："),
    ("an image showing", "一张图片显示"),
    ("", ""),
]
GLUE = [
    ("with", "和"),
    ("and", "和"),
    ("next to", "旁边是"),
    ("near", "靠近"),
    ("behind", "后面是"),
    ("in front of", "前面是"),
    ("on top of", "上面是"),
    ("beside", "旁边有"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="under a minute on a 2-core CPU: 2-layer models, batch 32, 2 + 3 steps, 1 thread",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="training and teacher device")
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="auto: bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--steps", type=int, help="timed steps per run (default 40 GPU, 3 CPU)")
    p.add_argument(
        "--warmup", type=int, help="steps of each run before timing starts (default 10 GPU, 1 CPU, 2 with --quick)"
    )
    p.add_argument("--batch-size", type=int, help="pairs per step (default 256 GPU, 64 CPU)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved; medians pool their steps")
    p.add_argument(
        "--captions", type=int, help="parallel captions (default: enough for every run to stay in one epoch)"
    )
    p.add_argument("--threads", type=int, help="torch threads for every way (default: torch's; 1 with --quick on CPU)")
    p.add_argument(
        "--warm-run",
        action=argparse.BooleanOptionalAction,
        help="first an untimed cached run over the same batches, so "
        "the first timed run does not pay for first-use costs (default: on, but off for full sizes on CPU)",
    )
    p.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader workers of the cached run (train-student's default 2)"
    )
    p.add_argument("--teacher-layers", type=int, help="teacher depth (default 12, the B/16 text tower)")
    p.add_argument("--teacher-width", type=int, help="teacher width (default 512; heads are 64 wide)")
    p.add_argument("--student-layers", type=int, help="student depth (default 12, xlm-roberta-base)")
    p.add_argument("--student-width", type=int, help="student width (default 768; heads are 64 wide)")
    p.add_argument("--vocab-size", type=int, help="student vocabulary rows (default 32000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tiny", action="store_true", help=argparse.SUPPRESS
    )  # smoke test: 1-layer, 64-wide models, 2 + 2 steps
    args = p.parse_args(argv)
    import torch

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    kind = "gpu" if args.device == "cuda" else "cpu"
    sizes = dict(SIZES["tiny" if args.tiny else "quick" if args.quick else "full"])
    for key, layers, width in (
        ("teacher", args.teacher_layers, args.teacher_width),
        ("student", args.student_layers, args.student_width),
    ):
        if layers or width:
            width = width or sizes[key][1]
            sizes[key] = (layers or sizes[key][0], width, max(1, width // 64))
    sizes["vocab"] = args.vocab_size or sizes["vocab"]
    args.sizes = sizes
    batch, warmup, steps = SCHEDULE["tiny" if args.tiny else f"quick-{kind}" if args.quick else kind]
    args.batch_size = args.batch_size or batch
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = args.steps or steps
    # CUDA loads kernels lazily and cuBLAS picks them per shape: on an H100 the first run's steps took 2.5x as long as
    # cached steps later in the same process. On CPU such costs are milliseconds: lost in a full-size step, not in a quick one.
    args.warm_run = (kind == "gpu" or args.quick or args.tiny) if args.warm_run is None else args.warm_run
    if args.quick and kind == "cpu" and args.threads is None:
        # on a shared 2-core machine, OpenMP threads waiting for a descheduled sibling made steps 3x slower than one thread
        args.threads = 1
    # each caption gives two pairs (zh and en): enough that no run (the paired one is the longest) crosses an epoch
    args.captions = args.captions or (args.warmup + 2 * args.steps + 1) * args.batch_size // 2 + args.batch_size
    return args


# ---- data and models ----


def emoji_names(lang: str = "zh") -> list[tuple[str, str]]:
    """(English, `lang`) names of the fully qualified emoji without skin-tone variants: CLDR's human translations."""
    try:
        import emoji
    except ImportError:
        sys.exit("bench_train needs the `emoji` package for its parallel captions: pip install emoji")
    emoji.config.load_language(lang)
    clean = lambda s: s.strip(":").replace("_", " ")  # noqa: E731 (as tests/train/test_run.py)
    names = {
        (clean(d["en"]), clean(d[lang]))
        for d in emoji.EMOJI_DATA.values()
        if lang in d
        and d.get("status") == emoji.STATUS["fully_qualified"]
        and "skin tone" not in d["en"].replace("_", " ")
    }
    return sorted(names)


def make_parallel(n: int, seed: int) -> list[dict]:
    """`n` rows (id, caption, caption_zh): 1 to 6 emoji names joined by glue words (about 12 English words on average),
    3% long ones of 8 to 20 names that reach CLIP's 77-token limit; the Chinese side joins the same names' translations."""
    rng = random.Random(seed)
    names = emoji_names("zh")
    rows = []
    for i in range(n):
        k = rng.randint(8, 20) if rng.random() < 0.03 else 1 + sum(rng.random() < 0.4 for _ in range(5))
        picked = rng.sample(names, k)
        opener = rng.choice(OPENERS)
        en, zh = [opener[0], picked[0][0]], [opener[1] + picked[0][1]]
        for name_en, name_zh in picked[1:]:
            glue = rng.choice(GLUE)
            en += [glue[0], name_en]
            zh += [glue[1], name_zh]
        rows.append({"id": f"b{i:07d}", "caption": " ".join(w for w in en if w), "caption_zh": "".join(zh)})
    return rows


def write_teacher(folder: Path, layers: int, width: int, heads: int, dim: int) -> Path:
    """A random CLIPTextModelWithProjection (CLIPTextConfig defaults but the given sizes) with the real CLIP tokenizer."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests import tiny

    merges = tiny.real_clip_merges()
    if merges is None:
        sys.exit(
            "bench_train needs the real CLIP tokenizer from open-clip-torch: pip install --no-deps open-clip-torch"
        )
    tok = tiny.write_clip_tokenizer(folder, merges)
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=dim,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).eval().save_pretrained(folder)
    return folder


def write_student(folder: Path, layers: int, width: int, heads: int, vocab: int, corpus: list[str]) -> Path:
    """A random XLMRobertaModel (XLMRobertaConfig defaults but the given sizes) with a whole-word WordPiece tokenizer over
    `corpus` (BERT's splitting: words and punctuation, each CJK character alone), special tokens at XLM-R's ids (<s> 0,
    <pad> 1, </s> 2, <unk> 3). It gives about the token counts XLM-R's SentencePiece gives on these captions."""
    import torch
    from transformers import AutoTokenizer, BertTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    names = dict(cls_token="<s>", pad_token="<pad>", sep_token="</s>", unk_token="<unk>", mask_token="<mask>")
    splitter = BertTokenizerFast(vocab={t: i for i, t in enumerate(specials)}, **names).backend_tokenizer
    words = sorted(
        {
            w
            for text in corpus
            for w, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text))
        }
    )
    chars = sorted({c for w in words for c in w})
    pieces = (
        specials + words + [c for c in chars if c not in words] + ["##" + c for c in chars]
    )  # characters: the fallback
    assert len(pieces) <= vocab, f"the tokenizer needs {len(pieces)} rows; raise --vocab-size"
    BertTokenizerFast(vocab={t: i for i, t in enumerate(pieces)}, model_max_length=512, **names).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token_id == 1 and tok("a")["input_ids"][0] == 0, (tok.pad_token_id, tok("a"))
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
    )
    torch.manual_seed(1)
    XLMRobertaModel(config).save_pretrained(folder)
    return folder


def params(folder: Path, exclude: str) -> tuple[int, int]:
    """(all parameters, parameters outside the token embedding) of a saved model, from its safetensors header."""
    from safetensors import safe_open

    total = rest = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            n = 1
            for s in f.get_slice(name).get_shape():
                n *= s
            total += n
            rest += 0 if exclude in name else n
    return total, rest


# ---- the runs ----


def online_steps(teacher, english: list[str], paired: bool = False, cpu_clock: dict | None = None):
    """An EpochSteps whose batches carry targets the teacher makes now from the rows' English captions (the cache's text)
    instead of the cached ones. `paired`: steps 2j and 2j + 1 both train on planned batch j, with cached then online
    targets, so both ways see the same batch shapes. With num_workers=0 batch k is made as step k starts, so
    `cpu_clock[k]` (this process's CPU seconds then) brackets each step."""
    import torch
    import torch.nn.functional as F

    from mclip.train.run import EpochSteps

    class OnlineSteps(EpochSteps):
        def __getitem__(self, k: int) -> dict:
            if cpu_clock is not None:
                cpu_clock[k] = time.process_time()
            batch = super().__getitem__(k // 2 if paired else k)
            if paired and k % 2 == 0:
                return batch
            unique, inverse = torch.unique(
                batch["rows"], return_inverse=True
            )  # an id's zh and en pairs share one target
            ids, _ = teacher.tokenize([english[r] for r in unique.tolist()])
            emb, _ = teacher.embed(*teacher.collate(ids))  # (U, D) on the training device
            batch["targets"] = F.normalize(emb, dim=-1).cpu()[
                inverse
            ]  # (B, D) normalised as cached; on CPU, so the loader may pin it
            return batch

    return OnlineSteps


def train_once(name: str, args, paths: dict, warmup: int, steps: int, num_workers: int, steps_class=None) -> list[dict]:
    """One `train_student.run` of `warmup` + `steps` steps -> per step after warm-up: k (its index in the epoch), seconds,
    seconds waited for the batch."""
    from mclip.config import TrainConfig
    from mclip.train import run as train_student

    out = paths["tmp"] / f"run-{name}"
    config = TrainConfig(
        data=str(paths["data"]),
        cache=str(paths["cache"]),
        out=str(out),
        student=str(paths["student"]),
        languages=("zh",),
        batch_size=args.batch_size,
        max_steps=warmup + steps,
        log_every=1,
        eval_every=0,
        save_every=0,
        num_workers=num_workers,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        num_threads=args.threads,
        progress=False,
        overwrite=True,
    )
    with mock.patch.object(train_student, "EpochSteps", steps_class or train_student.EpochSteps):
        train_student.run(config)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    shutil.rmtree(out)  # an xlm-roberta-base run leaves ~2 GB (the last checkpoint with optimizer state, final/)
    assert [r["step"] for r in records] == list(range(1, config.max_steps + 1)), "expected one train record per step"
    timed = [(r["step"] - 1, args.batch_size / r["pairs_per_s"], r["data_wait"]) for r in records[warmup:]]
    print(
        f"bench_train: {name} run done, ms per timed step {[round(1000 * t[1]) for t in timed]}",
        file=sys.stderr,
        flush=True,
    )
    return [{"k": k, "seconds": sec, "wait": wait * sec} for k, sec, wait in timed]


def pooled(steps: list[dict], batch_size: int) -> dict:
    """Median pairs/s over timed steps; data wait as a share of their total time."""
    step = statistics.median(s["seconds"] for s in steps)
    return {
        "pairs_per_s": batch_size / step,
        "step_ms": 1000 * step,
        "steps": len(steps),
        "data_wait_fraction": sum(s["wait"] for s in steps) / sum(s["seconds"] for s in steps),
    }


def token_counts(paths: dict, rows: list[dict]) -> tuple[float, float]:
    """Mean tokens per caption: the teacher on English, the student on its training pairs (Chinese and English alike)."""
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(paths["teacher"])
    student = AutoTokenizer.from_pretrained(paths["student"])
    en = [r["caption"] for r in rows]
    t = statistics.fmean(min(77, len(x)) for x in teacher(en)["input_ids"])
    s = statistics.fmean(min(128, len(x)) for x in student(en + [r["caption_zh"] for r in rows])["input_ids"])
    return t, s


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from mclip.config import EmbedConfig
    from mclip.distributed import resolve_precision
    from mclip.embed.run import run as embed
    from mclip.models.teacher import load_teacher
    from mclip.store import shards
    from tests import tiny

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bars
    precision = resolve_precision(args.precision, torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        rows = make_parallel(args.captions, args.seed)
        paths = {"tmp": tmp, "data": tiny.write_captions(tmp / "parallel.jsonl", rows), "cache": tmp / "cache"}
        glue = [text for pair in OPENERS + GLUE for text in pair if text]
        paths["teacher"] = write_teacher(tmp / "teacher", *sizes["teacher"], sizes["dim"])
        paths["student"] = write_student(
            tmp / "student",
            *sizes["student"],
            sizes["vocab"],
            [text for pair in emoji_names("zh") for text in pair] + glue,
        )
        embedded = embed(
            EmbedConfig(
                data=str(paths["data"]),
                out=str(paths["cache"]),
                teacher=str(paths["teacher"]),
                id_column="id",
                device=args.device,
                precision=precision,
                num_threads=args.threads,
                progress=False,
            )
        )
        cache = shards.open_cache(paths["cache"])
        english = cache.table(["text"]).column("text").to_pylist()  # row r's English caption: what the teacher embedded
        teacher = load_teacher(str(paths["teacher"]), device=args.device, precision=precision)
        # the online loop must train on the same targets: one batch of teacher output against the cache
        sample = list(range(min(args.batch_size, len(english))))
        emb, _ = teacher.embed(*teacher.collate(teacher.tokenize([english[r] for r in sample])[0]))
        online_vs_cache = float(
            np.abs(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy() - cache.embeddings()[sample]).max()
        )
        setup_s = time.perf_counter() - began

        if (
            args.warm_run
        ):  # every run plans the same batches (same seed), so this one meets every shape the timed ones will
            train_once("warm", args, paths, args.warmup, args.steps, args.num_workers)
        steps: dict[str, list[dict]] = {"cached": [], "online": [], "paired": []}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load does not fall on one way only
            steps["cached"] += train_once("cached", args, paths, args.warmup, args.steps, args.num_workers)
            steps["online"] += train_once(
                "online", args, paths, args.warmup, args.steps, 0, online_steps(teacher, english)
            )
            # an even warm-up, so timing starts on a cached step; one step more than timed, as the last one also writes
            # the final checkpoint before the next batch is asked for
            clock: dict[int, float] = {}
            paired = train_once(
                "paired",
                args,
                paths,
                args.warmup + args.warmup % 2,
                2 * args.steps + 1,
                0,
                online_steps(teacher, english, True, clock),
            )[:-1]
            steps["paired"] += [s | {"cpu_seconds": clock[s["k"] + 1] - clock[s["k"]]} for s in paired]
        t_tokens, s_tokens = token_counts(paths, rows)
        teacher_params, student_params = (
            params(paths["teacher"], "token_embedding"),
            params(paths["student"], "word_embeddings"),
        )

    cached, online = pooled(steps["cached"], args.batch_size), pooled(steps["online"], args.batch_size)
    paired_cached = pooled([s for s in steps["paired"] if s["k"] % 2 == 0], args.batch_size)
    paired_online = pooled([s for s in steps["paired"] if s["k"] % 2 == 1], args.batch_size)
    # CPU seconds of this process per step: what the other jobs of a shared machine do not stretch (GPU work is not in it)
    cpu_seconds = {
        odd: statistics.median(s["cpu_seconds"] for s in steps["paired"] if s["k"] % 2 == odd) for odd in (0, 1)
    }
    # What the cache can save if every FLOP cost the same: the teacher's forward (2 per parameter and token) against the
    # student's forward and backward (6), embeddings left out; the speed-up is then 1 + this ratio.
    flop_ratio = (2 * teacher_params[1] * t_tokens) / (6 * student_params[1] * s_tokens)
    result = {
        "bench": "train",
        "pairs_per_s_cached": cached["pairs_per_s"],
        "pairs_per_s_online": online["pairs_per_s"],
        "speedup_vs_online": cached["pairs_per_s"] / online["pairs_per_s"],
        "data_wait_fraction": cached["data_wait_fraction"],
        "data_wait_fraction_online": online["data_wait_fraction"],
        "speedup_paired": paired_cached["pairs_per_s"] / paired_online["pairs_per_s"],
        "pairs_per_s_paired_cached": paired_cached["pairs_per_s"],
        "pairs_per_s_paired_online": paired_online["pairs_per_s"],
        "speedup_paired_cpu_time": cpu_seconds[1] / cpu_seconds[0] if args.device == "cpu" else None,
        "cpu_seconds_per_step": {"paired_cached": cpu_seconds[0], "paired_online": cpu_seconds[1]},
        "data_wait_fraction_workers0": paired_cached["data_wait_fraction"],
        "speedup_by_flop_count": 1 + flop_ratio,
        "max_abs_diff_online_vs_cache": online_vs_cache,
        "step_ms": {
            "cached": cached["step_ms"],
            "online": online["step_ms"],
            "paired_cached": paired_cached["step_ms"],
            "paired_online": paired_online["step_ms"],
        },
        "steps_measured": {
            "cached": cached["steps"],
            "online": online["steps"],
            "paired_cached": paired_cached["steps"],
            "paired_online": paired_online["steps"],
        },
        "num_workers": args.num_workers,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "warm_run": args.warm_run,
        "captions": args.captions,
        "mean_words_en": statistics.fmean(len(r["caption"].split()) for r in rows),
        "teacher_tokens_mean": t_tokens,
        "student_tokens_mean": s_tokens,
        "teacher": {
            "layers": sizes["teacher"][0],
            "width": sizes["teacher"][1],
            "heads": sizes["teacher"][2],
            "dim": sizes["dim"],
            "params": teacher_params[0],
            "params_non_embedding": teacher_params[1],
        },
        "student": {
            "layers": sizes["student"][0],
            "width": sizes["student"][1],
            "heads": sizes["student"][2],
            "vocab": sizes["vocab"],
            "params": student_params[0],
            "params_non_embedding": student_params[1],
        },
        "cache_captions_per_s": embedded.captions_per_s,
        "setup_s": setup_s,
        "total_s": time.perf_counter() - began,
        "load_avg_1m": os.getloadavg()[0],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "tiny": args.tiny,
    }
    print(summary(result))
    print(json.dumps(result))
    return result


def cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summary(r: dict) -> str:
    t, s, ms = r["teacher"], r["student"], r["step_ms"]
    return "\n".join(
        [
            f"bench_train on {r['device']} ({r['device_name']}, {r['threads']} threads, {r['precision']}, load {r['load_avg_1m']:.1f}), {r['date']}",
            f"  teacher {t['layers']}x{t['width']} CLIP text ({t['params'] / 1e6:.1f}M params, {r['teacher_tokens_mean']:.1f} tokens/caption); "
            f"student {s['layers']}x{s['width']} XLM-R ({s['params'] / 1e6:.1f}M params, vocab {s['vocab']:,}, {r['student_tokens_mean']:.1f} tokens/pair)",
            f"  batch {r['batch_size']}; {'an untimed warm run, then ' if r['warm_run'] else ''}{r['repeats']} x ({r['warmup_steps']} warm-up "
            f"+ {r['timed_steps']} timed steps) per way, medians; "
            f"{r['captions']:,} captions of {r['mean_words_en']:.1f} English words on average",
            f"  cached, {r['num_workers']} workers: {r['pairs_per_s_cached']:9,.1f} pairs/s ({ms['cached']:7.0f} ms/step), "
            f"waiting for data {100 * r['data_wait_fraction']:.1f}% of the time",
            f"  online teacher:    {r['pairs_per_s_online']:9,.1f} pairs/s ({ms['online']:7.0f} ms/step), "
            f"waiting for batch + teacher {100 * r['data_wait_fraction_online']:.1f}%",
            f"  paired, 0 workers: cached {r['pairs_per_s_paired_cached']:,.1f} / online {r['pairs_per_s_paired_online']:,.1f} pairs/s "
            f"({ms['paired_cached']:.0f} / {ms['paired_online']:.0f} ms/step), waiting for data {100 * r['data_wait_fraction_workers0']:.1f}% "
            "on the cached steps",
            f"  speed-up of the cache {r['speedup_vs_online']:.2f}x (separate runs), {r['speedup_paired']:.2f}x (interleaved steps)"
            + (
                f", {r['speedup_paired_cpu_time']:.2f}x (interleaved, CPU seconds)"
                if r["speedup_paired_cpu_time"]
                else ""
            )
            + "; "
            f"by FLOP count {r['speedup_by_flop_count']:.2f}x; online vs cached targets max |diff| {r['max_abs_diff_online_vs_cache']:.1e}",
        ]
    )


if __name__ == "__main__":
    main()
