"""Frozen, validated configs: one dataclass per stage, with JSON round-trips and closest-key errors."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, get_type_hints

from mclip.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _device(value: str) -> None:
    _check(value in DEVICES or value.startswith("cuda:"), f"device={value!r} is not valid; use auto, cpu, cuda, cuda:N or mps")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Stage 1: run the teacher once over the English captions and write Arrow shards."""

    data: str = ""  # dataset: hub name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s) or glob
    out: str = ""  # output folder for shards + manifest.json
    teacher: str = "openai/clip-vit-base-patch16"  # hub id or local folder (CLIP, or any HF encoder)
    split: str = "train"  # dataset split to read
    caption_column: str = "caption"  # English text column
    id_column: str | None = None  # unique id column; None = stable row index as id
    image_column: str | None = None  # images to embed with the CLIP vision tower (CLIP teachers only)
    image_id_column: str | None = None  # groups captions of one image; None = hash of the image
    cache_layers: tuple[int, ...] = ()  # teacher layers (1-based) whose pooled states are cached for layer_kd
    dtype: str = "float16"  # storage dtype of embeddings: float16 or float32
    normalize: bool = True  # L2-normalise embeddings
    max_length: int | None = None  # token limit; None = the teacher's own limit (77 for CLIP)
    batch_tokens: int | None = None  # padded tokens per forward batch; None = 8192 on CPU, 131072 on GPU
    max_batch_size: int = 1024  # cap on captions per forward batch
    shard_size: int = 10_000  # captions per shard: the unit of resume, of rank split and of length sorting
    dedup: bool = True  # embed identical captions once per shard; every id still gets its row
    strict: bool = False  # refuse empty/None captions instead of skipping and counting them
    limit: int | None = None  # use only the first N rows (smoke runs, benchmarks)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    overwrite: bool = False  # replace an existing output made with other arguments
    trust_remote_code: bool = False  # allow model code shipped with a checkpoint to run
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        _check(bool(self.data), "data is empty; pass --data with a dataset name, folder or file")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check(bool(self.teacher), "teacher is empty; pass --teacher with a model id or folder")
        _check(bool(self.caption_column), "caption_column is empty; pass --caption-column")
        _choice("dtype", self.dtype, ("float16", "float32"))
        _choice("precision", self.precision, PRECISIONS)
        _device(self.device)
        _check(all(isinstance(i, int) and i >= 1 for i in self.cache_layers),
               f"cache_layers={list(self.cache_layers)} must be layer numbers >= 1, e.g. --cache-layers 4,8,12")
        _check(len(set(self.cache_layers)) == len(self.cache_layers), f"cache_layers={list(self.cache_layers)} repeats a layer")
        _check(self.max_length is None or self.max_length >= 2, f"max_length={self.max_length} must be >= 2")
        _check(self.batch_tokens is None or self.batch_tokens >= 1, f"batch_tokens={self.batch_tokens} must be >= 1")
        _check(self.max_batch_size >= 1, f"max_batch_size={self.max_batch_size} must be >= 1")
        _check(self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _check(self.num_threads is None or self.num_threads >= 1, f"num_threads={self.num_threads} must be >= 1")


# ---- stage 2: TrainConfig (train-student) ----


# ---- stage 3: EvalConfig (eval-retrieval) and EncodeConfig (encode) ----


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Stage 3: retrieval per language (student vs the cached teacher, optionally images), with baselines."""

    model: str = ""  # exported student folder (a run's final/), a checkpoint folder, or a run folder (its final/ is used)
    cache: str = ""  # teacher cache folder written by embed-teacher (the gallery; images when it has them)
    data: str = ""  # parallel captions: wide (id, caption, caption_<lang>) or long (id, lang, text)
    out: str = ""  # output folder for metrics.json, report.md, r_at_1.png, eval.json
    languages: tuple[str, ...] = ()  # languages to score, e.g. ("de", "fr"); English is always added when available
    split: str = "test"  # dataset split to read
    id_column: str = "id"  # id column joining the captions to the cache
    caption_column: str = "caption"  # English column of the wide format
    text_column_template: str = "caption_{lang}"  # per-language column of the wide format
    lang_column: str = "lang"  # language column of the long format
    text_column: str = "text"  # text column of the long format
    ks: tuple[int, ...] = (1, 5, 10)  # recall cut-offs; MRR is cut at the largest
    index: str = "Flat"  # FAISS index_factory string (inner product); Flat is exact, e.g. IVF256,Flat or HNSW32 for big galleries
    nprobe: int | None = None  # IVF lists probed per query; None = max(16, nlist/16) capped at nlist
    faiss_gpu: bool = True  # search on GPU FAISS when it is installed and sees a GPU
    query_batch_size: int = 4096  # queries per FAISS search call (bounds memory)
    teacher_baseline: bool = False  # also score the teacher applied directly to each language's text
    teacher: str | None = None  # teacher for the baseline; None = the one named in the cache manifest
    images: bool | None = None  # text<->image metrics: None = when the cache has image embeddings, True = require them
    limit: int | None = None  # score only the first N captions of each language
    batch_size: int = 64  # texts per encoder forward pass
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    overwrite: bool = False  # replace the files of a previous eval in --out
    trust_remote_code: bool = False  # allow model code shipped with a checkpoint to run
    progress: bool = True  # show progress bars

    def __post_init__(self) -> None:
        _check(bool(self.model), "model is empty; pass --model with an exported student folder (a run's final/)")
        _check(bool(self.cache), "cache is empty; pass --cache with a teacher cache folder from `mclip embed-teacher`")
        _check(bool(self.data), "data is empty; pass --data with the parallel captions")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check(len(self.languages) > 0, "languages is empty; pass --languages, e.g. --languages de,fr")
        _check(all(isinstance(code, str) and code and "/" not in code for code in self.languages),
               f"languages={list(self.languages)} must be non-empty codes without '/', e.g. de,fr")
        _check(len(set(self.languages)) == len(self.languages), f"languages={list(self.languages)} repeats a language")
        _check(bool(self.id_column), "id_column is empty; pass --id-column")
        _check("{lang}" in self.text_column_template,
               f"text_column_template={self.text_column_template!r} must contain {{lang}}, e.g. caption_{{lang}}")
        _check(len(self.ks) > 0 and all(isinstance(k, int) and k >= 1 for k in self.ks),
               f"ks={list(self.ks)} must be cut-offs >= 1, e.g. --ks 1,5,10")
        _check(list(self.ks) == sorted(set(self.ks)), f"ks={list(self.ks)} must be increasing without repeats, e.g. 1,5,10")
        _check(bool(self.index), "index is empty; pass --index Flat (exact) or a FAISS factory string such as IVF256,Flat")
        _check(self.nprobe is None or self.nprobe >= 1, f"nprobe={self.nprobe} must be >= 1")
        _check(self.query_batch_size >= 1, f"query_batch_size={self.query_batch_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _device(self.device)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Encode texts (a text file or a dataset column) with an exported student into Arrow files (and .npy)."""

    model: str = ""  # exported student folder (a run's final/), a checkpoint folder, or a run folder
    out: str = ""  # output folder for shard-*.arrow (id, text, embedding), encode.json and embeddings.npy
    input: str | None = None  # UTF-8 text file, one text per line (empty lines skipped; id = 0-based line number)
    data: str | None = None  # or a dataset: hub name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s)
    split: str = "train"  # dataset split (with data)
    column: str = "text"  # text column (with data)
    id_column: str | None = None  # id column (with data); None = row number
    npy: bool = False  # also write embeddings.npy (rows in the order of the Arrow rows)
    dtype: str = "float32"  # storage dtype: float32 or float16
    normalize: bool = True  # L2-normalise the embeddings
    batch_size: int = 64  # texts per forward pass
    shard_size: int = 100_000  # rows per Arrow file
    limit: int | None = None  # encode only the first N texts
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    overwrite: bool = False  # replace the files of a previous encode in --out
    trust_remote_code: bool = False  # allow model code shipped with a checkpoint to run
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        _check(bool(self.model), "model is empty; pass --model with an exported student folder (a run's final/)")
        _check(bool(self.out), "out is empty; pass --out with an output folder")
        _check((self.input is None) != (self.data is None), "give exactly one of --input (a text file) or --data (a dataset)")
        _check(self.input is None or bool(self.input), "input is empty; pass --input with a text file")
        _check(bool(self.column), "column is empty; pass --column")
        _choice("dtype", self.dtype, ("float16", "float32"))
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.shard_size >= 1, f"shard_size={self.shard_size} must be >= 1")
        _check(self.limit is None or self.limit >= 1, f"limit={self.limit} must be >= 1")
        _device(self.device)


# ---- pipelines: PipelineConfig (mclip run) ----


def to_dict(config: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build `cls` from a dict, refusing unknown keys with the closest valid one named."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")
        if isinstance(value, list) and "tuple" in str(hints[key]):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong-typed value reaching a comparison in __post_init__
        raise ConfigError(f"invalid value in {where}: {exc}") from None


def save_json(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")


def load_json(cls: type, path: str | Path) -> Any:
    return from_dict(cls, json.loads(Path(path).read_text(encoding="utf-8")), where=str(path))
