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
