"""Frozen, validated configs: one dataclass per stage, with JSON round-trips and closest-key errors."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from mclip.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Stage 1's padded tokens per forward batch when --batch-tokens is not given (why 2048:
# mclip.embed.batches.default_batch_tokens)
CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 131072


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _device(value: str) -> None:
    _check(
        value in DEVICES or value.startswith("cuda:"),
        f"device={value!r} is not valid; use auto, cpu, cuda, cuda:N or mps",
    )


def option(default: Any, help: str, *, runtime: bool = False, required: bool = False, argument: bool = False) -> Any:
    """A config field that is also its CLI option (`--name`, typed and defaulted by the field), as transformers'
    HfArgumentParser reads `field(metadata={"help": ...})`.

    help: the option's --help text, and the field's documentation (meaning, unit).
    runtime: the field says where the inputs live or how fast a run goes, not what it writes, so a resumed run (or a
      rerun on a finished output) may change it; every other field must repeat the value the output was made with.
    required: the CLI option has no default (the config still refuses the empty default in __post_init__).
    argument: on the command line it is a positional argument (`mclip export MODEL`), not an --option.
    """
    return dataclasses.field(
        default=default, metadata={"help": help, "runtime": runtime, "required": required, "argument": argument}
    )


def runtime_fields(config: Any) -> set[str]:
    """The fields of a config (class or instance) that a resumed or rerun output may change (`option(runtime=True)`)."""
    return {f.name for f in dataclasses.fields(config) if f.metadata.get("runtime")}


def request(config: Any) -> dict:
    """The JSON-ready values of the fields that decide what an output holds: what a resumed run must repeat."""
    values = to_dict(config)
    return {name: value for name, value in values.items() if name not in runtime_fields(config)}


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Stage 1: run the teacher once over the English captions and write Arrow shards."""

    data: str = option(
        "",
        "Captions: hub dataset name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s) or glob.",
        required=True,
    )
    out: str = option("", "Output folder for the Arrow shards and manifest.json.", runtime=True, required=True)
    teacher: str = option(
        "openai/clip-vit-base-patch16", "Teacher: CLIP checkpoint or any HF encoder (hub id or folder)."
    )
    split: str = option("train", "Dataset split.")
    caption_column: str = option("caption", "Column with the English captions.")
    id_column: str | None = option(None, "Column with unique ids (default: the row number).")
    image_column: str | None = option(
        None, "Column with images to embed with the CLIP vision tower (CLIP teachers only)."
    )
    image_id_column: str | None = option(None, "Column naming each caption's image (default: image content hash).")
    cache_layers: tuple[int, ...] = option(
        (), "Teacher layers (1-based) whose pooled states to cache for layer_kd, e.g. 4,8,12."
    )
    dtype: str = option("float16", "Storage dtype of the embeddings: float16 or float32.")
    normalize: bool = option(True, "L2-normalise the embeddings.")
    max_length: int | None = option(None, "Token limit (default: the teacher's, 77 for CLIP).")
    batch_tokens: int | None = option(
        None, f"Padded tokens per batch (default {CPU_BATCH_TOKENS} on CPU, {GPU_BATCH_TOKENS} on GPU).", runtime=True
    )
    max_batch_size: int = option(1024, "Most captions per batch.", runtime=True)
    shard_size: int = option(10_000, "Captions per shard: the unit of resume, of rank split and of length sorting.")
    dedup: bool = option(
        True, "Embed identical captions once per cache (every id still gets its row); off: embed every row."
    )
    strict: bool = option(False, "Refuse empty captions instead of skipping and counting them.")
    limit: int | None = option(None, "Use only the first N rows (smoke runs, benchmarks).")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps.", runtime=True)
    precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", runtime=True)
    num_threads: int | None = option(None, "CPU threads for torch (default: torch's).", runtime=True)
    overwrite: bool = option(False, "Replace an existing cache made with other arguments.", runtime=True)
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint to run.")
    progress: bool = option(True, "Show progress.", runtime=True)

    def __post_init__(self) -> None:
        _check(bool(self.data), "data is empty; pass --data with a dataset name, folder or file")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check(bool(self.teacher), "teacher is empty; pass --teacher with a model id or folder")
        _check(bool(self.caption_column), "caption_column is empty; pass --caption-column")
        _choice("dtype", self.dtype, ("float16", "float32"))
        _choice("precision", self.precision, PRECISIONS)
        _device(self.device)
        _check(
            all(isinstance(i, int) and i >= 1 for i in self.cache_layers),
            f"cache_layers={list(self.cache_layers)} must be layer numbers >= 1, e.g. --cache-layers 4,8,12",
        )
        _check(
            len(set(self.cache_layers)) == len(self.cache_layers),
            f"cache_layers={list(self.cache_layers)} repeats a layer",
        )
        _check(self.max_length is None or self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        _check(self.batch_tokens is None or self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")
        _check(self.max_batch_size >= 1, f"max_batch_size={self.max_batch_size} must be >= 1")
        _check(self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _check(self.num_threads is None or self.num_threads >= 1, f"num_threads={self.num_threads} must be >= 1")


# ---- stage 2: TrainConfig (train-student) ----
LOSSES = ("mse", "cosine", "cl")
MIN_TEMPERATURE = 0.01  # floor of a learnt InfoNCE temperature (CLIP's cap of 100 on the logit scale)
SCHEDULES = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb")  # live curves besides metrics.jsonl (mclip/train/report.py)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Stage 2: train a multilingual student to reproduce the cached teacher embeddings from translated captions."""

    data: str = option(
        "",
        "Parallel captions: wide (id, caption_<lang>...) or long (id, lang, text); file(s), folder or hub name.",
        runtime=True,
        required=True,
    )
    cache: str = option("", "Teacher cache folder written by `mclip embed-teacher`.", runtime=True, required=True)
    out: str = option(
        "", "Run folder: config.json, metrics.jsonl, curves.png, checkpoints/, final/.", runtime=True, required=True
    )
    student: str = option(
        "xlm-roberta-base", "Student: HF encoder id or folder, or an exported mclip student to continue training."
    )
    languages: tuple[str, ...] = option(("zh",), "Languages to train, comma-separated, e.g. zh,de,fr.")
    include_english: bool = option(True, "Also train student(en) -> teacher(en) on the cache's English text.")
    split: str = option("train", "Dataset split of --data.")
    id_column: str = option("id", "Column joining captions to the cache's ids.")
    text_column_template: str = option("caption_{lang}", "Wide format: the column of each language.")
    val_data: str | None = option(
        None, "Validation captions (same formats); their ids are never trained on.", runtime=True
    )
    val_split: str = option("train", "Dataset split of --val-data.")
    val_fraction: float = option(0.0, "Else hold out this fraction of ids (by hash of id and seed); 0 = no validation.")
    val_max_ids: int = option(
        5000, "Validation ids used by the periodic evaluation (the smallest hashes; the rest stay held out)."
    )
    pooler: str = option("mean", "Student pooling: mean or cls.")
    max_length: int = option(128, "Student token limit (capped by the model's).")
    freeze_embeddings: bool = option(False, "Freeze the word-embedding matrix.")
    sparse_embeddings: bool = option(
        False,
        "Lazy AdamW on the word embeddings: a step updates only its tokens' rows (faster on CPU for a 250k-token "
        "vocabulary; unlike AdamW, rows absent from a step keep their value). One process only.",
    )
    embedding_lr_scale: float = option(
        1.0, "The word-embedding matrix learns at this multiple of --lr (new tokens: try 5)."
    )
    extend_vocab: bool = option(False, "Add training characters the student's tokenizer maps to [UNK] as new tokens.")
    extend_vocab_words: int = option(
        0, "With --extend-vocab, also add words seen this often that it splits into pieces (0 = off)."
    )
    extend_vocab_init: str = option(
        "mean", "New token rows start at: mean (the old rows' mean), aligned (their English captions' tokens)."
    )
    extend_vocab_min_piece_rate: float = option(
        0.0, "Add only words split into this many pieces per character (0.75: not Latin script)."
    )
    extend_vocab_stems: int = option(
        0, "Also add stems (3+ char prefixes) shared by this many added words, matched inside words (0 = off)."
    )
    extend_vocab_stem_piece_rate: float = option(
        0.75, "Stems only from words split into this many pieces per character (not Latin)."
    )
    embedding_lr_scale_old: float | None = option(
        None, "Rows of the student's own tokens learn at this x --lr (default: --embedding-lr-scale)."
    )
    projection_init: str = option("auto", "auto (identity when student width == teacher dim), identity, random.")
    loss: str = option("cl", "mse, cosine, or cl = (1 - alpha) * base + alpha * InfoNCE.")
    alpha: float = option(0.1, "Weight of InfoNCE in the cl loss, in [0, 1].")
    cl_base: str = option("mse", "The cl loss's pointwise part: mse or cosine.")
    temperature: float = option(0.05, "InfoNCE temperature (initial value when learnt).")
    fixed_temperature: bool = option(False, "Keep the temperature fixed instead of learning it (log-parametrised).")
    layer_kd: bool = option(False, "Also distil the cache's teacher layer states (needs --cache-layers in stage 1).")
    student_layers: tuple[int, ...] = option(
        (),
        "Student layers (1-based) for layer-kd, one per cached teacher layer, e.g. 4,8,12 "
        "(default: spaced like the teacher's).",
    )
    layer_kd_weight: float = option(1.0, "Weight of the layer-kd loss.")
    # Not runtime: epochs and max_steps set the length of the lr schedule, so a resumed run changing them would learn
    # otherwise.
    epochs: int = option(1, "Passes over the training pairs.")
    max_steps: int | None = option(None, "Cap on optimizer steps (default: epochs decide).")
    batch_size: int = option(64, "Global batch in pairs (split over ranks and accumulation).")
    grad_accum: int = option(1, "Micro-batches per optimizer step on each rank.")
    lr: float = option(1e-4, "Peak learning rate.")
    weight_decay: float = option(1e-4, "AdamW decoupled weight decay (matrices only; not biases, norms, temperature).")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.")
    warmup_steps: int = option(1000, "Linear warmup steps from 0 to lr, in optimizer steps.")
    schedule: str = option("linear", "Decay after warmup: linear, cosine or constant.")
    min_lr_ratio: float = option(0.0, "The decay ends at lr * this.")
    clip_grad: float = option(1.0, "Max global gradient norm (0 = no clipping).")
    seed: int = option(42, "Seed of init, dropout, data order and validation split.")
    wise_ft: float = option(
        1.0,
        "WiSE-FT: final/ = this x the trained weights + (1 - this) x the step-0 ones (try 0.5 "
        "from a teacher; 1 = off).",
    )
    group_batches: int = option(64, "Batches per length-sorted mega-batch (1 = no length grouping).")
    num_workers: int = option(2, "DataLoader workers tokenising batches.", runtime=True)
    log_every: int = option(10, "Steps between metrics.jsonl records.", runtime=True)
    eval_every: int = option(1000, "Steps between validations (0 = only at the end).", runtime=True)
    eval_batch_size: int = option(256, "Texts per forward pass in validation.", runtime=True)
    save_every: int = option(1000, "Steps between checkpoints (one is always written at the end).", runtime=True)
    keep_last: int = option(2, "Checkpoints kept.", runtime=True)
    device: str = option("auto", "auto, cpu, cuda, cuda:N.", runtime=True)
    precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.", runtime=True)
    num_threads: int | None = option(None, "CPU threads for torch (default: torch's).", runtime=True)
    resume: bool = option(False, "Continue from the latest checkpoint in --out.", runtime=True)
    overwrite: bool = option(False, "Replace the run files in a non-empty --out.", runtime=True)
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint to run.", runtime=True)
    progress: bool = option(True, "Show progress.", runtime=True)
    report_to: tuple[str, ...] = option(
        ("none",),
        "Live curves of the metrics.jsonl records: none, tensorboard (in OUT/tensorboard), wandb, or both.",
        runtime=True,
    )

    def __post_init__(self) -> None:
        _check(bool(self.data), "data is empty; pass --data with the parallel captions")
        _check(bool(self.cache), "cache is empty; pass --cache with a folder written by `mclip embed-teacher`")
        _check(bool(self.out), "out is empty; pass --out with a run folder")
        _check(bool(self.student), "student is empty; pass --student with a model id or folder")
        _check(
            len(self.languages) > 0 and all(isinstance(x, str) and x.strip() for x in self.languages),
            f"languages={list(self.languages)} must name at least one language, e.g. --languages zh,de",
        )
        _check(
            not any(c.isspace() or c == "," for x in self.languages for c in x),
            f"languages={list(self.languages)} must be codes without spaces or commas; list them as zh,de",
        )
        _check(len(set(self.languages)) == len(self.languages), f"languages={list(self.languages)} repeats a language")
        _check(
            "{lang}" in self.text_column_template,
            f"text_column_template={self.text_column_template!r} must contain {{lang}}, e.g. caption_{{lang}}",
        )
        _check(0.0 <= self.val_fraction < 1.0, f"val_fraction={self.val_fraction} must be in [0, 1)")
        _check(not (self.val_data and self.val_fraction > 0), "pass either --val-data or --val-fraction, not both")
        _check(self.val_max_ids >= 1, f"val_max_ids={self.val_max_ids} must be >= 1")
        _choice("pooler", self.pooler, ("mean", "cls"))
        _choice("projection_init", self.projection_init, ("auto", "identity", "random"))
        _choice("extend_vocab_init", self.extend_vocab_init, ("mean", "aligned"))
        _check(
            self.embedding_lr_scale > 0,
            f"embedding_lr_scale={self.embedding_lr_scale} must be > 0 (1 = the same lr as the rest)",
        )
        for name in (
            "extend_vocab_words",
            "extend_vocab_stems",
            "extend_vocab_min_piece_rate",
            "extend_vocab_stem_piece_rate",
            "embedding_lr_scale_old",
        ):
            _check((getattr(self, name) or 0) >= 0, f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        _check(self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        _check(
            not (self.freeze_embeddings and self.sparse_embeddings),
            "pass either --freeze-embeddings or --sparse-embeddings, not both",
        )
        _choice("loss", self.loss, LOSSES)
        _check(0.0 <= self.alpha <= 1.0, f"alpha={self.alpha} must be in [0, 1]")
        _choice("cl_base", self.cl_base, ("mse", "cosine"))
        _check(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        _check(
            self.fixed_temperature or self.loss != "cl" or self.temperature >= MIN_TEMPERATURE,
            f"temperature={self.temperature} is below the floor {MIN_TEMPERATURE} of a learnt temperature; "
            f"raise it, or pass --fixed-temperature to keep it fixed",
        )
        _check(
            all(isinstance(i, int) and i >= 1 for i in self.student_layers),
            f"student_layers={list(self.student_layers)} must be layer numbers >= 1, e.g. --student-layers 4,8,12",
        )
        _check(
            not self.student_layers or self.layer_kd,
            "student_layers is only used with --layer-kd; add --layer-kd or drop it",
        )
        _check(self.layer_kd_weight >= 0, f"layer_kd_weight={self.layer_kd_weight} must be >= 0")
        _check(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}",
        )
        _check(self.lr > 0, f"lr={self.lr} must be > 0")
        _check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas={list(self.betas)} must be two numbers in [0, 1), e.g. 0.9,0.999",
        )
        _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _choice("schedule", self.schedule, SCHEDULES)
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.clip_grad >= 0, f"clip_grad={self.clip_grad} must be >= 0 (0 = no clipping)")
        _check(self.group_batches >= 1, f"group_batches={self.group_batches} must be >= 1")
        _check(self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0")
        _check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        _check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
        _check(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        _check(self.save_every >= 0, f"save_every={self.save_every} must be >= 0")
        _check(
            0.0 <= self.wise_ft <= 1.0,
            f"wise_ft={self.wise_ft} must be in [0, 1] (1 = the trained weights as they are)",
        )
        _check(self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1")
        _choice("precision", self.precision, PRECISIONS)
        _device(self.device)
        _check(self.num_threads is None or self.num_threads >= 1, f"num_threads={self.num_threads} must be >= 1")
        _check(not (self.resume and self.overwrite), "pass either --resume or --overwrite, not both")
        _check(
            isinstance(self.report_to, tuple)
            and len(self.report_to) > 0
            and all(x in REPORT_TO for x in self.report_to)
            and len(set(self.report_to)) == len(self.report_to)
            and ("none" not in self.report_to or len(self.report_to) == 1),
            f"report_to={self.report_to!r} is not valid; use none, tensorboard, wandb or tensorboard,wandb "
            '(in a pipeline file a list, e.g. report_to = ["tensorboard"])',
        )


# ---- stage 3: EvalConfig (eval-retrieval) and EncodeConfig (encode) ----
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Stage 3: retrieval per language (R@K, MRR) of a student against the cached teacher (and images), with baselines;
    writes a report."""

    model: str = option(
        "", "Student: a run's final/ folder, a checkpoint folder, or a run folder (its final/).", required=True
    )
    cache: str = option(
        "", "Teacher cache from `mclip embed-teacher` (English targets; images when it has them).", required=True
    )
    data: str = option(
        "", "Parallel captions: wide (id, caption, caption_<lang>) or long (id, lang, text).", required=True
    )
    out: str = option("", "Output folder for metrics.json, report.md, r_at_1.png, eval.json.", required=True)
    languages: tuple[str, ...] = option(
        (), "Languages to score, comma-separated, e.g. de,fr,ja (English is added when present).", required=True
    )
    split: str = option("test", "Dataset split.")
    id_column: str = option("id", "Column with the ids joining captions to the cache.")
    caption_column: str = option("caption", "English column (wide format).")
    text_column_template: str = option("caption_{lang}", "Per-language column (wide format).")
    lang_column: str = option("lang", "Language column (long format).")
    text_column: str = option("text", "Text column (long format).")
    ks: tuple[int, ...] = option((1, 5, 10), "Recall cut-offs; MRR is cut at the largest.")
    index: str = option(
        "Flat", "FAISS index_factory string (inner product): Flat (exact), IVF256,Flat, HNSW32, IVF256,PQ16 ..."
    )
    nprobe: int | None = option(None, "IVF lists probed per query (default max(16, nlist/16), capped at nlist).")
    faiss_gpu: bool = option(True, "Use GPU FAISS when installed and a GPU is visible.")
    query_batch_size: int = option(4096, "Queries per FAISS search call (bounds memory).")
    teacher_baseline: bool = option(False, "Also score the teacher applied directly to each language's text.")
    teacher: str | None = option(None, "Teacher for the baseline (default: the one named in the cache).")
    images: bool | None = option(
        None, "Text<->image metrics (default: when the cache has images; --images requires them)."
    )
    limit: int | None = option(None, "Score only the first N captions per language.")
    batch_size: int = option(64, "Texts per forward pass.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps.")
    overwrite: bool = option(False, "Replace the files of a previous eval in --out.", runtime=True)
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint to run.")
    progress: bool = option(True, "Show progress.", runtime=True)

    def __post_init__(self) -> None:
        _check(bool(self.model), "model is empty; pass --model with an exported student folder (a run's final/)")
        _check(bool(self.cache), "cache is empty; pass --cache with a teacher cache folder from `mclip embed-teacher`")
        _check(bool(self.data), "data is empty; pass --data with the parallel captions")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check(len(self.languages) > 0, "languages is empty; pass --languages, e.g. --languages de,fr")
        _check(
            all(
                isinstance(code, str) and code and not any(c in "/," or c.isspace() for c in code)
                for code in self.languages
            ),
            f"languages={list(self.languages)} must be non-empty codes without '/', ',' or spaces, e.g. de,fr",
        )
        _check(len(set(self.languages)) == len(self.languages), f"languages={list(self.languages)} repeats a language")
        _check(bool(self.id_column), "id_column is empty; pass --id-column")
        _check(
            "{lang}" in self.text_column_template,
            f"text_column_template={self.text_column_template!r} must contain {{lang}}, e.g. caption_{{lang}}",
        )
        _check(
            len(self.ks) > 0 and all(isinstance(k, int) and k >= 1 for k in self.ks),
            f"ks={list(self.ks)} must be cut-offs >= 1, e.g. --ks 1,5,10",
        )
        _check(
            list(self.ks) == sorted(set(self.ks)), f"ks={list(self.ks)} must be increasing without repeats, e.g. 1,5,10"
        )
        _check(
            bool(self.index), "index is empty; pass --index Flat (exact) or a FAISS factory string such as IVF256,Flat"
        )
        _check(self.nprobe is None or self.nprobe >= 1, f"nprobe={self.nprobe} must be >= 1")
        _check(self.query_batch_size >= 1, f"query_batch_size={self.query_batch_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _device(self.device)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Encode texts (a text file or a dataset column) with an exported student into Arrow files (and .npy)."""

    model: str = option("", "Student: a run's final/ folder, a checkpoint folder, or a run folder.", required=True)
    out: str = option(
        "", "Output folder for shard-*.arrow (id, text, embedding), encode.json, embeddings.npy.", required=True
    )
    input: str | None = option(
        None, "UTF-8 text file, one text per line (empty lines skipped; id = 0-based line number)."
    )
    data: str | None = option(None, "Or a dataset: hub name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s).")
    split: str = option("train", "Dataset split (with --data).")
    column: str = option("text", "Text column (with --data).")
    id_column: str | None = option(None, "Id column (with --data; default: the row number).")
    npy: bool = option(False, "Also write embeddings.npy, rows in the order of the Arrow rows.")
    dtype: str = option("float32", "Storage dtype: float32 or float16.")
    normalize: bool = option(True, "L2-normalise the embeddings.")
    batch_size: int = option(64, "Texts per forward pass.")
    shard_size: int = option(100_000, "Rows per Arrow file.")
    limit: int | None = option(None, "Encode only the first N texts.")
    device: str = option("auto", "auto, cpu, cuda, cuda:N, mps.")
    overwrite: bool = option(False, "Replace the files of a previous encode in --out.")
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint to run.")
    progress: bool = option(True, "Show progress.")

    def __post_init__(self) -> None:
        _check(bool(self.model), "model is empty; pass --model with an exported student folder (a run's final/)")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check(
            (self.input is None) != (self.data is None),
            "give exactly one of --input (a text file) or --data (a dataset)",
        )
        _check(self.input is None or bool(self.input), "input is empty; pass --input with a text file")
        _check(bool(self.column), "column is empty; pass --column")
        _choice("dtype", self.dtype, ("float16", "float32"))
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _device(self.device)


# ---- export: ExportConfig (mclip export) ----
EXPORT_FORMATS = ("onnx", "open_clip")
QUANTIZE = ("int8",)
# torch's ONNX exporter writes opset 18 at the least (it silently raised a lower request to 18), and newer opsets than
# 23 came out broken or unrunnable by onnxruntime 1.31 (no adapter for Gelu, an Attention node it cannot load)
OPSETS = (18, 23)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Export a student: an ONNX folder whose graph gives the finished embedding, run by onnxruntime without torch; or
    an open_clip model folder joining the student's text tower to its teacher's vision tower."""

    model: str = option(
        "", "Student: a run's final/ folder, a checkpoint folder, or a run folder.", required=True, argument=True
    )
    out: str = option(
        "",
        "Output folder (onnx: onnx/model.onnx, tokenizer, mclip.json, sentence-transformers modules; "
        "open_clip: open_clip_config.json, open_clip_model.safetensors, tokenizer).",
        required=True,
    )
    format: str = option(
        "onnx",
        "Export format: onnx, or open_clip (a whole CLIP: open_clip.create_model_and_transforms('local-dir:OUT')).",
    )
    teacher: str | None = option(
        None,
        "open_clip: the teacher CLIP (hub id or folder, text + vision) whose image tower joins the student "
        "(default: the teacher named in the student's mclip.json).",
    )
    quantize: str | None = option(None, "Quantise the weights: int8 (onnxruntime dynamic quantisation); default fp32.")
    opset: int = option(18, f"ONNX opset, {OPSETS[0]} to {OPSETS[1]}.")
    overwrite: bool = option(False, "Replace a previous export in --out.")
    trust_remote_code: bool = option(False, "Allow model code from the checkpoint to run.")
    progress: bool = option(True, "Print what was written and the verification figures.")

    def __post_init__(self) -> None:
        _check(bool(self.model), "model is empty; pass a student folder (a run's final/) as MODEL")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _choice("format", self.format, EXPORT_FORMATS)
        _check(
            self.quantize is None or self.format == "onnx",
            f"quantize={self.quantize!r} applies to --format onnx only; drop --quantize for --format {self.format}",
        )
        _check(
            self.teacher is None or self.format == "open_clip",
            "teacher applies to --format open_clip only (the image tower it adds); drop --teacher for --format onnx",
        )
        _check(self.teacher is None or bool(self.teacher), "teacher is empty; pass --teacher with a CLIP id or folder")
        _check(
            self.quantize is None or self.quantize in QUANTIZE,
            f"quantize={self.quantize!r} is not valid; use int8 or leave it out (fp32)",
        )
        _check(
            isinstance(self.opset, int) and OPSETS[0] <= self.opset <= OPSETS[1],
            f"opset={self.opset} is not supported; use --opset {OPSETS[0]} to {OPSETS[1]} (torch's "
            "exporter and onnxruntime)",
        )


# ---- pipelines: PipelineConfig (mclip run) ----
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A whole run, embed-teacher -> train-student -> eval-retrieval, as one TOML file names it (see
    mclip/pipeline.py)."""

    name: str = ""  # what the pipeline is, shown in the final report
    out: str = ""  # run folder: cache/, train/ and eval/ land inside it
    embed: EmbedConfig | None = None  # stage 1, the file's [embed] table (its out is out/cache)
    train: TrainConfig | None = None  # stage 2, [train] (cache and out are out/cache and out/train)
    eval: EvalConfig | None = None  # stage 3, [eval] (model, cache and out are out/train/final, out/cache, out/eval)

    def __post_init__(self) -> None:
        _check(bool(self.out), "out is empty; set out in the pipeline file or pass --out")
        for name in ("embed", "train", "eval"):
            _check(
                getattr(self, name) is not None,
                f"the pipeline has no [{name}] table; every pipeline file needs [embed], [train] and [eval]",
            )


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build `cls` from a dict of typed values (a TOML table, a saved config.json), refusing unknown keys with the
    closest valid one named and a value of another type than its field's (`typed`) with the type it takes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")
        kwargs[key] = typed(cls, key, value, where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong-typed value reaching a comparison in __post_init__
        raise ConfigError(f"invalid value in {where}: {exc}") from None


# ---- values by their field's type: typed (TOML, JSON) or text (--set) ----
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
TAKES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
EXAMPLES = {bool: "true", int: "10", float: "1e-4", str: '"..."'}


def _field_type(cls: type, key: str) -> tuple[Any, bool]:
    """The field's type without `| None`, and whether None is allowed."""
    hint = get_type_hints(cls)[key]
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        return next(arg for arg in get_args(hint) if arg is not type(None)), True
    return hint, False


def _takes(hint: Any, optional: bool) -> str:
    if get_origin(hint) is tuple:
        what = f"a list of {TAKES[get_args(hint)[0]].removeprefix('a ').removeprefix('an ')}s"
    else:
        what = TAKES.get(hint, getattr(hint, "__name__", str(hint)))
    return what + (" (or none)" if optional and hint is not str else "")


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def typed(cls: type, key: str, value: Any, where: str) -> Any:
    """A typed value (TOML, JSON) for field `key` of `cls`: it must have the field's type (an integer serves a float
    field, a list a tuple field); a string is not parsed, since these formats have booleans, numbers and lists of
    their own, so `include_english = "false"` is refused rather than read as true. Refused in one line naming the key
    and the type it takes."""
    hint, optional = _field_type(cls, key)
    if value is None and optional:
        return None

    def fits(kind: Any, item: Any) -> bool:
        if kind is float:
            return isinstance(item, (int, float)) and not isinstance(item, bool)
        return isinstance(item, kind) and not (kind is int and isinstance(item, bool))

    if get_origin(hint) is tuple:
        kind = get_args(hint)[0]
        if isinstance(value, (list, tuple)) and all(fits(kind, item) for item in value):
            return tuple(float(item) if kind is float else item for item in value)
    elif fits(hint, value):
        return float(value) if hint is float else value
    sample = EXAMPLES.get(get_args(hint)[0] if get_origin(hint) is tuple else hint, "")
    sample = f"[{sample}, {sample}]" if get_origin(hint) is tuple else sample
    raise ConfigError(
        f"{key} = {json.dumps(value, ensure_ascii=False)} in {where} is {_kind(value)}; {key} takes "
        f"{_takes(hint, optional)}, written e.g. {key} = {sample}"
    )


def parse_text(cls: type, key: str, text: str, where: str) -> Any:
    """A value given as text (`mclip run --set section.key=value`) parsed by the type of field `key` of `cls`: a bool
    from true/false, yes/no, on/off, 1/0 (any case), an int, a float, a tuple from a comma- or space-separated list (or
    a TOML list, [4, 8]); `none` clears an optional field. Anything else is refused in one line naming the key and the
    type it takes."""
    hint, optional = _field_type(cls, key)
    text = text.strip()
    if optional and text.lower() in ("none", "null"):
        return None

    def one(kind: Any, item: str) -> Any:
        if kind is bool and item.lower() in TRUE + FALSE:
            return item.lower() in TRUE
        if kind in (int, float):
            try:
                return kind(item)
            except ValueError:
                pass
        if kind is str:
            return unquote(item)
        also = " (also yes/no, on/off, 1/0)" if kind is bool else ""
        raise ConfigError(f"{where}: {key} takes {_takes(hint, optional)}{also}, not {item!r}")

    if get_origin(hint) is tuple:
        items = _toml_list(text) if text.startswith("[") else re.split(r"[,\s]+", text)
        return tuple(one(get_args(hint)[0], str(item).strip()) for item in items if str(item).strip())
    return one(hint, text)


def unquote(text: str) -> str:
    """`"x"` or `'x'` -> x: a --set string may be written as TOML writes it."""
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" else text


def _toml_list(text: str) -> list:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return list(tomllib.loads(f"v = {text}")["v"])
    except (tomllib.TOMLDecodeError, TypeError):
        raise ConfigError(f"{text!r} is not a list; write e.g. de,zh or [4, 8, 12]") from None


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")


def load_json(cls: type, path: str | Path) -> Any:
    return from_dict(cls, json.loads(Path(path).read_text(encoding="utf-8")), where=str(path))
