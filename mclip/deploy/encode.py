"""`mclip encode`: texts (a UTF-8 text file or a dataset column) -> a student's embeddings in Arrow files (and .npy).

The model is loaded and run exactly as `mclip.load(path).encode(texts)` does, so a user's own code gets the same vectors.
An `mclip export` ONNX folder runs with onnxruntime, and then nothing here imports torch (machines without it).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mclip.config import EncodeConfig, to_dict
from mclip.deploy import export
from mclip.deploy.export import model_folder
from mclip.errors import UserError, writing
from mclip.store import outputs, shards
from mclip.store.captions import blank, load_dataset, require_columns

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


def _owned(name: str) -> bool:
    return name in (SUMMARY, NPY) or bool(shards.SHARD_RE.match(name))


def interrupted(config: EncodeConfig) -> tuple[str, str | None]:
    """What an interrupted run left in --out (encode has no resume), and the flag that starts it again."""
    written = [p for p in Path(config.out).iterdir() if _owned(p.name)] if Path(config.out).is_dir() else []
    if written:
        return f"{len(written)} file(s) in {config.out} incomplete (encode has no resume)", "--overwrite"
    return "nothing written yet", None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(0-based line number, text) per line; a line that is not UTF-8 is a UserError naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path} line {number + 1} is not UTF-8 ({exc.reason} at byte {exc.start}); "
                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from None
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


COLUMN_CHUNK = 1 << 16  # dataset rows turned into Python strings at once


def _read_column(config: EncodeConfig) -> tuple[Iterator[tuple[str, str]], int, int]:
    """(id, text) pairs from a dataset column (None/empty values skipped), their count and the skipped count. The column
    stays memory-mapped Arrow: the count is an Arrow kernel, and the pairs are made a chunk of rows at a time."""
    import pyarrow.compute as pc

    ds = load_dataset(config.data, config.split)
    require_columns(ds, {"--column": config.column, "--id-column": config.id_column}, config.data)
    n = len(ds) if config.limit is None else min(config.limit, len(ds))
    table = ds.with_format("arrow")[:n]  # a zero-copy slice of the memory-mapped data
    texts = table[config.column]
    if not (texts.type == "string" or texts.type == "large_string"):
        raise UserError(f"column {config.column!r} holds {texts.type} values, not text; point --column at the text")
    skipped = int(pc.sum(blank(texts)).as_py() or 0)

    def pairs() -> Iterator[tuple[str, str]]:
        for start in range(0, n, COLUMN_CHUNK):
            part = table.slice(start, COLUMN_CHUNK)
            chunk = part[config.column].to_pylist()
            ids = (
                pc.cast(part[config.id_column], "string").to_pylist()
                if config.id_column
                else [str(i) for i in range(start, start + len(chunk))]
            )
            yield from ((i, t) for i, t in zip(ids, chunk) if t is not None and t.strip())

    return pairs(), n - skipped, skipped


def _open_npy(path: Path, dtype: str, shape: tuple[int, int]):
    """embeddings.npy opened for appending rows in order: plain writes, so written rows leave memory with the page cache
    (a memory map would keep every dirty page it wrote in this process's resident set)."""
    handle = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return handle


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
    with outputs.hold(config.out, "encode"):
        return _run(config)


def _run(config: EncodeConfig) -> EncodeResult:
    import pyarrow as pa
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(config.out)
    onnx = export.is_export(config.model)
    if onnx and not config.normalize:
        raise UserError(
            f"--model {config.model} is an ONNX export, whose graph L2-normalises inside; drop --no-normalize, "
            "or encode with the torch student it came from"
        )
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
    outputs.check(out, config.overwrite, owned=_owned, command="encode")
    if onnx:
        model = export.load_onnx(folder, device=config.device)
    else:
        from mclip import distributed
        from mclip.models.student import load

        model = load(
            folder, device=distributed.resolve_device(config.device), trust_remote_code=config.trust_remote_code
        )
    outputs.claim(
        out, shards.shard_files(out), RERUN
    )  # a previous encode's files go only now, with the model loaded and the input read

    schema = pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(shards.ARROW_DTYPES[config.dtype], model.dim), nullable=False),
        ]
    )
    with writing(out / NPY, RERUN):
        npy = _open_npy(out / NPY, config.dtype, (total, model.dim)) if config.npy else None
    bar = tqdm(
        total=total, unit="text", desc="encode", disable=not config.progress, file=sys.stderr, dynamic_ncols=True
    )
    files, row = [], 0
    for index, (ids, texts) in enumerate(_chunks(pairs, config.shard_size)):
        parts = []
        for at in range(
            0, len(texts), 32 * config.batch_size
        ):  # length-sorted inside each slice; the bar moves per slice
            parts.append(
                model.encode(
                    texts[at : at + 32 * config.batch_size], batch_size=config.batch_size, normalize=config.normalize
                )
            )
            bar.update(len(parts[-1]))
        emb = np.concatenate(parts)  # (n, D)
        table = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "text": pa.array(texts, pa.string()),
                "embedding": shards.fixed_list(emb, config.dtype),
            },
            schema=schema,
        )
        with writing(out / shards.shard_name(index), RERUN):
            files.append(shards.write_shard(out, index, table, {"rows": len(texts), "first_row": row}))
            if npy is not None:
                outputs.write_array(npy, emb.astype(config.dtype, copy=False))
        row += len(texts)
    bar.close()
    assert row == total, f"encoded {row} texts, counted {total}"
    if npy is not None:
        with writing(out / NPY, RERUN):
            npy.close()
    summary = {
        "model": str(folder),
        "rows": row,
        "skipped": skipped,
        "dim": model.dim,
        "dtype": config.dtype,
        "normalized": config.normalize,
        "files": [f.name for f in files],
        "npy": NPY if config.npy else None,
        "student": {k: model.meta.get(k) for k in ("dim", "pooler", "teacher") if k in model.meta},
        "config": to_dict(config),
    }
    with writing(out / SUMMARY, RERUN):
        outputs.write_json(out / SUMMARY, summary)
    if not config.npy:
        (out / NPY).unlink(missing_ok=True)  # a stale one from an overwritten run would no longer match
    seconds = time.perf_counter() - start
    if config.progress:
        print(
            f"encode: {row:,} texts -> {len(files)} Arrow file(s){' + ' + NPY if config.npy else ''} in {out} "
            f"(dim {model.dim}, {config.dtype}); skipped {skipped:,} empty ({seconds:.1f}s)",
            file=sys.stderr,
        )
    return EncodeResult(out, row, skipped, model.dim, files, out / NPY if config.npy else None, seconds)
