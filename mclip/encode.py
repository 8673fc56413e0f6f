"""`mclip encode`: texts (a UTF-8 text file or a dataset column) -> a student's embeddings in Arrow files (and .npy).

The model is loaded and run exactly as `mclip.load(path).encode(texts)` does, so a user's own code gets the same vectors.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mclip import lock, shards
from mclip.config import EncodeConfig, to_dict
from mclip.errors import UserError, writing

SUMMARY = "encode.json"
NPY = "embeddings.npy"
RERUN = "rerun the same command with --overwrite"  # after a failed write: encode has no resume


@dataclass
class EncodeResult:
    out: Path
    rows: int  # texts encoded
    skipped: int  # empty lines / empty or None values left out
    dim: int
    files: list[Path]  # Arrow files, in row order
    npy: Path | None
    seconds: float


def model_folder(path: str | Path) -> Path:
    """The student folder behind --model: an exported student or checkpoint (has mclip.json), or a run folder's final/."""
    from mclip.student import META

    path = Path(path)
    if not path.exists():
        raise UserError(f"model {path} does not exist; pass a run's final/ folder, a checkpoint folder or a run folder")
    if (path / META).is_file():
        return path
    if (path / "final" / META).is_file():
        return path / "final"
    steps = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / META).is_file())
    if steps:
        raise UserError(f"run {path} has no final/ student yet; pass a checkpoint such as --model {steps[-1]}")
    raise UserError(f"{path} is not an mclip student (no {META}, no final/{META}); pass a run's final/ folder or a checkpoint folder")


def prepare_output(out: Path, owned, overwrite: bool, command: str) -> None:
    """Refuse a non-empty folder unless --overwrite, and even then when it holds files that `owned(name)` does not claim.

    Checks only: the caller creates the folder when it has something to write, so a run that fails leaves nothing behind.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    present = sorted(p.name for p in out.iterdir() if not lock.is_lock(p.name)) if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty; choose an empty folder, or pass --overwrite to replace a previous {command}'s files")
    foreign = [name for name in present if not owned(name)]
    if foreign:
        raise UserError(f"--out {out} holds files {command} did not write ({', '.join(foreign[:5])}); "
                        "choose another folder (--overwrite only replaces a previous run's own files)")


def _owned(name: str) -> bool:
    return name in (SUMMARY, NPY) or bool(shards.SHARD_RE.match(name))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(0-based line number, text) per line; a line that is not UTF-8 is a UserError naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path} line {number + 1} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                                "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            yield number, text.removeprefix("\ufeff") if number == 0 else text  # a byte-order mark is not text


def _read_lines(path: Path, limit: int | None) -> Iterator[tuple[str, str]]:
    """(id, text) per non-empty line, id = its 0-based line number, up to `limit` texts."""
    kept = 0
    for number, text in _lines(path):
        if limit is not None and kept >= limit:
            return
        if text.strip():
            kept += 1
            yield str(number), text


def _scan(path: Path, limit: int | None) -> tuple[int, int]:
    """Texts and skipped empty lines, counted up front so a bad byte stops the run before anything is written."""
    rows = skipped = 0
    for _, text in _lines(path):
        if limit is not None and rows >= limit:
            break
        if text.strip():
            rows += 1
        else:
            skipped += 1
    return rows, skipped


def _read_column(config: EncodeConfig) -> tuple[Iterator[tuple[str, str]], int, int]:
    """(id, text) pairs from a dataset column (None/empty values skipped), their count and the skipped count."""
    import pyarrow.compute as pc

    from mclip.data import load_dataset, require_columns

    ds = load_dataset(config.data, config.split)
    require_columns(ds, {"--column": config.column, "--id-column": config.id_column}, config.data)
    table = ds.with_format("arrow")
    n = len(ds) if config.limit is None else min(config.limit, len(ds))
    texts = table[:n][config.column]
    if not (texts.type == "string" or texts.type == "large_string"):
        raise UserError(f"column {config.column!r} holds {texts.type} values, not text; point --column at the text")
    ids = pc.cast(table[:n][config.id_column], "string").to_pylist() if config.id_column else [str(i) for i in range(n)]
    pairs = [(i, t) for i, t in zip(ids, texts.to_pylist()) if t is not None and t.strip()]
    return iter(pairs), len(pairs), n - len(pairs)


def _chunks(pairs: Iterator[tuple[str, str]], size: int) -> Iterator[tuple[list[str], list[str]]]:
    ids, texts = [], []
    for i, t in pairs:
        ids.append(i)
        texts.append(t)
        if len(texts) == size:
            yield ids, texts
            ids, texts = [], []
    if texts:
        yield ids, texts


def run(config: EncodeConfig) -> EncodeResult:
    """Encode every text with the student; write shard-NNNNN.arrow (id, text, embedding), encode.json and embeddings.npy."""
    with lock.hold(config.out, "encode"):
        return _run(config)


def _run(config: EncodeConfig) -> EncodeResult:
    import pyarrow as pa
    from tqdm.auto import tqdm

    from mclip import distributed
    from mclip.student import load

    start = time.perf_counter()
    out = Path(config.out)
    folder = model_folder(config.model)
    if config.input is not None:
        source = Path(config.input)
        if not source.is_file():
            raise UserError(f"--input {source} is not a file; pass a UTF-8 text file with one text per line")
        total, skipped = _scan(source, config.limit)
        pairs = _read_lines(source, config.limit)
    else:
        pairs, total, skipped = _read_column(config)
    if total == 0:
        raise UserError(f"no texts to encode in {config.input or config.data} (all empty); check the file or --column")
    prepare_output(out, _owned, config.overwrite, "encode")
    model = load(folder, device=distributed.resolve_device(config.device), trust_remote_code=config.trust_remote_code)
    with writing(out, RERUN):  # a previous encode's files go only now, with the model loaded and the input read
        out.mkdir(parents=True, exist_ok=True)
        for old in shards.shard_files(out):  # only reached with --overwrite and only this command's own files present
            old.unlink()

    schema = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False),
                        pa.field("embedding", pa.list_(shards.ARROW_DTYPES[config.dtype], model.dim), nullable=False)])
    with writing(out / NPY, RERUN):
        npy = np.lib.format.open_memmap(out / NPY, mode="w+", dtype=np.dtype(config.dtype), shape=(total, model.dim)) if config.npy else None
    bar = tqdm(total=total, unit="text", desc="encode", disable=not config.progress, file=sys.stderr, dynamic_ncols=True)
    files, row = [], 0
    for index, (ids, texts) in enumerate(_chunks(pairs, config.shard_size)):
        parts = []
        for at in range(0, len(texts), 32 * config.batch_size):  # length-sorted inside each slice; the bar moves per slice
            parts.append(model.encode(texts[at : at + 32 * config.batch_size], batch_size=config.batch_size, normalize=config.normalize))
            bar.update(len(parts[-1]))
        emb = np.concatenate(parts)  # (n, D)
        table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                          "embedding": shards.fixed_list(emb, config.dtype)}, schema=schema)
        with writing(out / shards.shard_name(index), RERUN):
            files.append(shards.write_shard(out, index, table, {"rows": len(texts), "first_row": row}))
            if npy is not None:
                npy[row : row + len(texts)] = emb
        row += len(texts)
    bar.close()
    assert row == total, f"encoded {row} texts, counted {total}"
    if npy is not None:
        with writing(out / NPY, RERUN):
            npy.flush()
        del npy
    summary = {"model": str(folder), "rows": row, "skipped": skipped, "dim": model.dim, "dtype": config.dtype,
               "normalized": config.normalize, "files": [f.name for f in files], "npy": NPY if config.npy else None,
               "student": {k: model.meta.get(k) for k in ("dim", "pooler", "teacher") if k in model.meta}, "config": to_dict(config)}
    with writing(out / SUMMARY, RERUN):
        shards.write_json(out / SUMMARY, summary)
    if not config.npy:
        (out / NPY).unlink(missing_ok=True)  # a stale one from an overwritten run would no longer match
    seconds = time.perf_counter() - start
    if config.progress:
        print(f"encode: {row:,} texts -> {len(files)} Arrow file(s){' + ' + NPY if config.npy else ''} in {out} "
              f"(dim {model.dim}, {config.dtype}); skipped {skipped:,} empty ({seconds:.1f}s)", file=sys.stderr)
    return EncodeResult(out, row, skipped, model.dim, files, out / NPY if config.npy else None, seconds)
