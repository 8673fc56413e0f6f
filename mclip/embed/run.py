"""Stage 1: run the teacher once over the English captions; write resumable, rank-sharded Arrow shards and manifest.json.

A planning pass (`mclip.embed.dedup`) first groups the rows by caption over the whole input, in memory that does not grow
with it, and checks the ids the same way. Then reader thread -> teacher -> writer thread: with --dedup (the default)
over units of distinct captions, each embedded once per cache, and then over the row shards, which gather their
vectors from those units; without it, over the row shards, each embedding its own rows.
"""

from __future__ import annotations

import functools
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mclip import __version__, distributed
from mclip.config import EmbedConfig, request, to_dict
from mclip.embed import dedup, inputs
from mclip.embed.batches import _tokenize_threads, default_batch_tokens, padded_batches
from mclip.errors import UserError, writing
from mclip.models.teacher import load_teacher
from mclip.store import outputs, shards
from mclip.store.captions import blank, load_dataset, require_columns

RERUN = "rerun the same command to resume"  # what to do after a failed write: finished shards are kept


@dataclass
class EmbedResult:
    out: Path
    rows: int  # rows in the finished cache
    shards: int  # shards in the finished cache
    computed_shards: int  # shards this run computed (the rest were already there)
    captions: int  # captions this rank embedded in this run (with dedup: distinct captions of the whole cache)
    tokens: int  # real (unpadded) tokens this rank ran through the teacher
    seconds: float
    totals: dict
    manifest: dict | None  # the final manifest (rank 0), None on other ranks

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Work:
    """A row shard, or (with --dedup) a unit of distinct captions, read, tokenised and cut into padded batches in the
    reader thread, ready for the teacher."""

    index: int
    first_row: int
    end_row: int
    batches: list  # [(indices into the texts to embed, input_ids (B, T), mask (B, T))], length-sorted
    unique: int  # texts to embed
    tokens: int  # real (unpadded) tokens over them
    flags: np.ndarray  # (unique,) truncated, per text to embed
    ids: object = None  # kept rows (Arrow string array); None for a unit
    texts: object = None  # kept rows (Arrow string array)
    groups: np.ndarray | None = None  # kept row -> caption_group
    inverse: np.ndarray | None = None  # kept row -> text embedded here (without --dedup)
    values: dict | None = None  # kept row -> vectors and `truncated`, gathered from the units (with --dedup)
    skipped: int = 0
    duplicates: int = 0  # kept rows whose caption an earlier row's embedding serves (with --dedup)
    images: list | None = None  # unique images (PIL) when embedding images
    image_ids: list[str] | None = None  # per kept row
    image_inverse: np.ndarray | None = None  # kept row -> unique image

    @property
    def truncated(self) -> int:
        if self.values is not None:
            return int(self.values["truncated"].sum())
        return int(self.flags[self.inverse].sum()) if self.ids is not None else int(self.flags.sum())


def is_complete(config: EmbedConfig) -> bool:
    """Whether --out holds a finished cache of this very request (a rerun returns at once; `mclip run` reports it skipped)."""
    manifest = shards.read_manifest(Path(config.out)) if Path(config.out).is_dir() else None
    return bool(manifest and manifest.get("complete")) and not outputs.changed(manifest.get("request", {}), config)


def interrupted(config: EmbedConfig) -> tuple[str, str | None]:
    """What an interrupted run left in --out, and the flag that continues it (None: the same command resumes)."""
    done = len(shards.shard_files(Path(config.out)))
    return f"{done} finished shard(s) kept in {config.out}", None


def _check_output(config: EmbedConfig) -> str:
    """What the output folder holds for this request, read-only: 'fresh' (nothing of ours), 'replace' (--overwrite of
    another cache), 'resume' (a killed run of this request), 'repair' (a finished one with a missing or cut shard) or
    'complete'; refuse a mismatch. Nothing is removed before the inputs have been checked (`_claim_output`)."""
    out = Path(config.out)
    if not [name for name in outputs.contents(out) if name != dedup.PLAN]:  # a plan alone: killed while planning
        return "fresh"
    manifest = shards.read_manifest(out)
    if manifest is None:
        outputs.check(out, config.overwrite, " and holds no mclip cache; choose an empty folder or pass --overwrite")
        return "replace"
    diff = outputs.changed(manifest.get("request", {}), config)
    if diff:
        if not config.overwrite:
            raise UserError(
                f"{out} holds a cache made with other arguments ({', '.join(diff)}); repeat them to resume, or pass --overwrite to replace it"
            )
        return "replace"
    if not manifest.get("complete"):
        return "resume"
    damage = shards.TeacherCache(out, manifest).damage()
    if damage is not None:
        print(f"mclip: warning: shard {damage[0]} {damage[1]}; recomputing it", file=sys.stderr)
        return "repair"
    return "complete"


def _claim_output(config: EmbedConfig, status: str, info) -> None:
    """Make the folder this run's: clear a replaced cache, start a manifest (or reopen a killed run's), record the teacher."""
    out = Path(config.out)
    manifest = shards.read_manifest(out) if status in ("resume", "repair") else None
    if manifest is None:
        manifest = {
            "format": shards.FORMAT,
            "format_version": shards.FORMAT_VERSION,
            "mclip_version": __version__,
            "complete": False,
            "request": request(config),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    elif manifest.get("teacher") and manifest["teacher"]["fingerprint"] != info.fingerprint:
        raise UserError(
            f"{out} was started with other weights for teacher {config.teacher!r}; pass --overwrite to start over with these"
        )
    replaced = [*shards.shard_files(out), out / shards.MANIFEST] if status == "replace" else []
    outputs.claim(
        out, [*replaced, *out.glob(".shard-*.tmp")], RERUN
    )  # temp shards of a killed run were never visible as shards
    if status == "repair":  # finished, then a shard went missing or was cut: recompute it and finish again
        manifest = {k: v for k, v in manifest.items() if k not in ("shards", "totals")} | {"complete": False}
    manifest["teacher"] = info.__dict__
    with writing(out / shards.MANIFEST, RERUN):
        shards.write_manifest(out, manifest)


def _load_rows(config: EmbedConfig):
    ds = load_dataset(config.data, config.split)
    require_columns(
        ds,
        {
            "--caption-column": config.caption_column,
            "--id-column": config.id_column,
            "--image-column": config.image_column,
            "--image-id-column": config.image_id_column,
        },
        config.data,
    )
    n = len(ds) if config.limit is None else min(config.limit, len(ds))
    if n == 0:
        raise UserError(f"{config.data} (split {config.split!r}) has zero rows; check --data and --split")
    rows = inputs.Rows(ds)
    rows.release()  # loading maps every page of the dataset's Arrow files (its record-batch headers fault them in)
    return rows, n


def _tokenized(texts: list[str], teacher, config: EmbedConfig, batch_tokens: int, pin: bool, threads: int) -> dict:
    tokens, truncated = teacher.tokenize(texts, threads=threads) if texts else ([], np.zeros(0, bool))
    batches, n_tokens = padded_batches(tokens, teacher, batch_tokens, config.max_batch_size, pin)
    return {"batches": batches, "unique": len(texts), "tokens": n_tokens, "flags": np.asarray(truncated, dtype=bool)}


def _read_unit(
    u: int,
    plan: dedup.Plan,
    config: EmbedConfig,
    teacher,
    batch_tokens: int,
    pin: bool = False,
    tokenize_threads: int = 1,
) -> _Work:
    """Unit u of the distinct captions (--dedup), tokenised and cut into padded batches, in the reader thread."""
    return _Work(
        u, 0, 0, **_tokenized(plan.unit_texts(u).to_pylist(), teacher, config, batch_tokens, pin, tokenize_threads)
    )


def _vector_columns(config: EmbedConfig) -> list[str]:
    return ["embedding", *(shards.layer_column(layer) for layer in sorted(config.cache_layers))]


def _read_shard(
    k: int,
    rows: inputs.Rows,
    config: EmbedConfig,
    n: int,
    teacher,
    batch_tokens: int,
    plan: dedup.Plan,
    pin: bool = False,
    tokenize_threads: int = 1,
) -> _Work:
    """Rows k*shard_size.. of the input -> kept captions with their caption groups; with --dedup their vectors gathered
    from the units, without it their texts tokenised and cut into padded batches.

    Runs in the reader thread. Filtering and the id and text columns stay in Arrow, so the only per-caption Python is the
    tokenizer's: with a GPU teacher every thread shares one interpreter lock with the thread that feeds it.
    """
    import pyarrow.compute as pc

    a, b = k * config.shard_size, min(n, (k + 1) * config.shard_size)
    part = rows[a:b]
    column = inputs.caption_strings(part[config.caption_column].combine_chunks(), config.caption_column, a)
    keep_mask = pc.invert(blank(column))
    keep = np.flatnonzero(keep_mask.to_numpy(zero_copy_only=False))
    kept = column.filter(keep_mask)
    groups = plan.groups(a, b)
    assert np.array_equal(np.flatnonzero(groups >= 0), keep), f"shard {k}: the plan's kept rows differ"
    groups = groups[keep]
    if config.dedup:
        widths = {
            "embedding": teacher.dim,
            **{shards.layer_column(i): teacher.hidden_size for i in config.cache_layers},
            "truncated": None,
        }
        values = plan.gather(plan.slots(a, b)[keep], widths, config.dtype)
        work = _Work(k, a, b, [], 0, 0, np.zeros(0, bool), values=values, duplicates=int((groups != a + keep).sum()))
    else:
        work = _Work(
            k,
            a,
            b,
            **_tokenized(kept.to_pylist(), teacher, config, batch_tokens, pin, tokenize_threads),
            inverse=np.arange(len(kept)),
        )
    work.ids, work.texts, work.groups = inputs.row_ids(part, config.id_column, a, b).filter(keep_mask), kept, groups
    work.skipped = len(column) - len(keep)
    if config.image_column is not None:
        raw = part[config.image_column].to_pylist()
        given = part[config.image_id_column].to_pylist() if config.image_id_column else None
        images, image_ids, index = [], [], {}
        for i in keep.tolist():
            image, digest = inputs.image_key(raw[i])
            key = str(given[i]) if given is not None else digest
            if key not in index:
                index[key] = len(images)
                images.append(image)
            image_ids.append(key)
        work.images, work.image_ids = images, image_ids
        work.image_inverse = np.array([index[key] for key in image_ids], dtype=np.int64)
    rows.release()
    return work


def _embed(work: _Work, teacher, config: EmbedConfig):
    """The shard's batches -> (U, D) embeddings and {layer: (U, H)} states of its unique texts (and images)."""
    import torch

    emb = np.empty((work.unique, teacher.dim), dtype=np.float32)
    states = {layer: np.empty((work.unique, teacher.hidden_size), dtype=np.float32) for layer in config.cache_layers}
    on_device = []  # copied back once per shard: a copy per batch would make a GPU wait for Python between batches
    for idx, input_ids, mask in work.batches:
        out, layer_out = teacher.embed(input_ids, mask, layers=config.cache_layers)
        if config.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        on_device.append((idx, out, layer_out))
    for idx, out, layer_out in on_device:
        emb[idx] = out.cpu().numpy()
        for layer, value in layer_out.items():
            states[layer][idx] = value.cpu().numpy()
    image_emb = None
    if work.images is not None:
        image_emb = np.empty((len(work.images), teacher.dim), dtype=np.float32)
        for start in range(0, len(work.images), 64):
            out = teacher.embed_images(work.images[start : start + 64])
            if config.normalize:
                out = torch.nn.functional.normalize(out, dim=-1)
            image_emb[start : start + 64] = out.cpu().numpy()
    return emb, states, image_emb


def _to_table(work: _Work, emb, states, image_emb, config: EmbedConfig, schema):
    """A row shard's table, or a unit's (its vectors and truncation flags, in unit order)."""
    import pyarrow as pa

    vectors = {"embedding": emb, **{shards.layer_column(layer): states[layer] for layer in states}}
    if work.ids is None:
        return pa.table(
            {**{k: shards.fixed_list(v, config.dtype) for k, v in vectors.items()}, "truncated": work.flags}
        )
    if work.values is None:
        vectors = {k: v[work.inverse] for k, v in vectors.items()}
    else:
        vectors = {k: work.values[k] for k in _vector_columns(config)}
    columns = {
        "id": work.ids,
        "text": work.texts,
        "caption_group": pa.array(work.groups, pa.int64()),
        **{k: shards.fixed_list(v, config.dtype) for k, v in vectors.items()},
    }
    if image_emb is not None:
        columns["image_id"] = pa.array(work.image_ids, pa.string())
        columns["image_embedding"] = shards.fixed_list(image_emb[work.image_inverse], config.dtype)
    return pa.table(columns, schema=schema)


def _write(folder: Path, work: _Work, emb, states, image_emb, config: EmbedConfig, schema) -> Path:
    """Build and write one shard (or unit) in the writer thread: the float16 conversion and Arrow arrays overlap the next
    forward."""
    if work.ids is None:
        stats = {"unit": work.index, "rows": work.unique}
    else:
        stats = {
            "shard": work.index,
            "first_row": work.first_row,
            "end_row": work.end_row,
            "rows": len(work.ids),
            "skipped": work.skipped,
            "truncated": work.truncated,
            "duplicates": work.duplicates,
            "format_version": shards.FORMAT_VERSION,
        }
    path = folder / shards.shard_name(work.index)
    with writing(
        path, RERUN
    ):  # a failed write leaves no shard (the temp file goes), so the rerun recomputes just this one
        return shards.write_shard(folder, work.index, _to_table(work, emb, states, image_emb, config, schema), stats)


def _finished(out: Path, k: int, config: EmbedConfig) -> bool:
    stats = shards.read_shard_stats(out / shards.shard_name(k))
    return (
        stats is not None
        and stats.get("first_row") == k * config.shard_size
        and stats.get("format_version") == shards.FORMAT_VERSION
    )


def run(config: EmbedConfig) -> EmbedResult:
    """Embed every caption once with the teacher; resume a killed run; split shards over torchrun ranks."""
    start = time.perf_counter()
    with distributed.group(config.device) as (ctx, device), outputs.hold(config.out, "embed-teacher", ctx):
        return _run(config, ctx, device, start)


def _run(config: EmbedConfig, ctx, device, start: float) -> EmbedResult:
    out = Path(config.out)
    status = distributed.main_only(ctx, lambda: _check_output(config))
    if status == "complete":
        if ctx.is_main:  # a run killed between its last manifest and removing its plan
            shutil.rmtree(out / dedup.PLAN, ignore_errors=True)
        manifest = shards.read_manifest(out)
        return EmbedResult(
            out,
            manifest["totals"]["rows"],
            len(manifest["shards"]),
            0,
            0,
            0,
            time.perf_counter() - start,
            manifest["totals"],
            manifest if ctx.is_main else None,
        )

    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    rows, n = _load_rows(config)
    precision = distributed.resolve_precision(config.precision, device)
    teacher = load_teacher(
        config.teacher,
        device=str(device),
        precision=precision,
        need_images=config.image_column is not None,
        max_length=config.max_length,
        trust_remote_code=config.trust_remote_code,
    )
    bad_layers = [layer for layer in config.cache_layers if layer > teacher.num_layers]
    if bad_layers:
        raise UserError(
            f"--cache-layers {bad_layers} exceed the teacher's {teacher.num_layers} layers; pick layers 1..{teacher.num_layers}"
        )
    info = teacher.info()
    plan = distributed.main_only(ctx, lambda: dedup.build(rows, n, config, out, info.fingerprint))  # checks the ids too
    distributed.main_only(
        ctx, lambda: _claim_output(config, status, info)
    )  # only now, with every input checked, is anything written
    batch_tokens = config.batch_tokens or default_batch_tokens(device)
    schema = shards.cache_schema(
        teacher.dim,
        config.dtype,
        {layer: teacher.hidden_size for layer in config.cache_layers},
        teacher.dim if config.image_column else None,
    )
    n_shards = -(-n // config.shard_size)
    span = [
        (k * config.shard_size, min(n, (k + 1) * config.shard_size)) for k in range(n_shards)
    ]  # input rows of each shard
    todo = [k for k in range(ctx.rank, n_shards, ctx.world_size) if not _finished(out, k, config)]
    pin, threads = device.type == "cuda", _tokenize_threads(device)
    captions = tokens = 0
    compute_start = time.perf_counter()
    if config.dedup:  # every distinct caption once, by the rank of its unit; then the row shards gather them

        def units_todo():
            plan.parts.mkdir(exist_ok=True)
            unfinished = [span[k] for k in range(n_shards) if not _finished(out, k, config)]
            return [u for u in plan.needed_units(unfinished) if not plan.unit_done(u)]

        units = [u for u in distributed.main_only(ctx, units_todo) if u % ctx.world_size == ctx.rank]
        read = functools.partial(
            _read_unit,
            plan=plan,
            config=config,
            teacher=teacher,
            batch_tokens=batch_tokens,
            pin=pin,
            tokenize_threads=threads,
        )
        captions, tokens = _stream(units, read, plan.parts, teacher, config, schema, ctx, "distinct")
        distributed.barrier()
    read = functools.partial(
        _read_shard,
        rows=rows,
        config=config,
        n=n,
        teacher=teacher,
        batch_tokens=batch_tokens,
        plan=plan,
        pin=pin,
        tokenize_threads=threads,
    )
    more = _stream(todo, read, out, teacher, config, schema, ctx, "rows", sum(span[k][1] - span[k][0] for k in todo))
    captions, tokens = captions + more[0], tokens + more[1]
    compute_seconds = time.perf_counter() - compute_start
    distributed.barrier()
    manifest = _finalize(config, out, n, n_shards, info, plan, precision) if ctx.is_main else None
    distributed.barrier()
    totals = manifest["totals"] if manifest else {}
    result = EmbedResult(
        out, totals.get("rows", 0), n_shards, len(todo), captions, tokens, compute_seconds, totals, manifest
    )
    if ctx.is_main and config.progress:
        print(summary(result, time.perf_counter() - start), file=sys.stderr)
    return result


def _stream(
    todo: list[int], read, folder: Path, teacher, config: EmbedConfig, schema, ctx, what: str, total: int | None = None
):
    """Read job i+1 in the reader thread and write job i-1 in the writer thread while the teacher embeds job i; return
    the captions embedded and their tokens."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        unit="cap",
        desc=f"embed-teacher {what}" + (f"[{ctx.rank}]" if ctx.enabled else ""),
        disable=not config.progress or not ctx.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    captions = tokens = 0
    with (
        ThreadPoolExecutor(1, thread_name_prefix="mclip-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="mclip-write") as writer,
    ):
        pending_read: Future | None = reader.submit(read, todo[0]) if todo else None
        pending_write: Future | None = None
        for pos in range(len(todo)):
            work = pending_read.result()
            pending_read = reader.submit(read, todo[pos + 1]) if pos + 1 < len(todo) else None
            emb, states, image_emb = _embed(work, teacher, config)
            if pending_write is not None:
                pending_write.result()
            pending_write = writer.submit(_write, folder, work, emb, states, image_emb, config, schema)
            captions += work.unique
            tokens += work.tokens
            bar.update(work.unique if work.ids is None else work.end_row - work.first_row)
        if pending_write is not None:
            pending_write.result()
    bar.close()
    return captions, tokens


def _finalize(config: EmbedConfig, out: Path, n: int, n_shards: int, info, plan: dedup.Plan, precision: str) -> dict:
    entries, totals = [], {"input_rows": n, "rows": 0, "skipped": 0, "truncated": 0, "duplicates": 0}
    for k in range(n_shards):
        path = out / shards.shard_name(k)
        stats = shards.read_shard_stats(path)
        if stats is None:
            raise UserError(
                f"shard {path} is missing or unreadable after the run; rerun the same command to recompute it"
            )
        entries.append(
            {
                "file": path.name,
                "rows": stats["rows"],
                "first_row": stats["first_row"],
                "end_row": stats["end_row"],
                "bytes": path.stat().st_size,
                "sha256": outputs.file_sha256(path),
            }
        )
        for key in ("rows", "skipped", "truncated", "duplicates"):
            totals[key] += stats[key]
    # what dedup saved: the teacher ran on `embedded` captions for `rows` rows; `distinct_captions` holds either way
    totals.update(distinct_captions=plan.distinct, embedded=totals["rows"] - totals["duplicates"])
    manifest = shards.read_manifest(out)
    manifest.update(
        {
            "complete": True,
            "format_version": shards.FORMAT_VERSION,
            "mclip_version": __version__,
            "teacher": info.__dict__,
            "kind": info.kind,
            "pooling": info.pooling,
            "dim": info.dim,
            "dtype": config.dtype,
            "normalized": config.normalize,
            "max_length": info.max_length,
            "precision": precision,
            "caption_column": config.caption_column,
            "id_column": config.id_column,
            "image_column": config.image_column,
            "image_dim": info.dim if config.image_column else None,
            "layers": list(config.cache_layers),
            "layer_dim": info.hidden_size if config.cache_layers else None,
            "layer_pooling": ("eos_token" if info.kind == "clip" else "mean") if config.cache_layers else None,
            "data": {"source": config.data, "split": config.split, "limit": config.limit},
            "config": to_dict(config),
            "shards": entries,
            "totals": totals,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    )
    with writing(out / shards.MANIFEST, RERUN):
        shards.write_manifest(out, manifest)
    shutil.rmtree(
        plan.folder, ignore_errors=True
    )  # after the manifest: a kill in between leaves a plan the next run removes
    return manifest


def summary(result: EmbedResult, wall: float) -> str:
    t = result.totals
    m = result.manifest or {}
    return (
        f"embed-teacher: {t.get('rows', 0):,} captions in {result.shards} shard(s) at {result.out} "
        f"({m.get('teacher', {}).get('name', '?')}, {m.get('pooling', '?')}, dim {m.get('dim', '?')}, {m.get('dtype', '?')}); "
        f"this run embedded {result.captions:,} unique captions for {result.computed_shards} shard(s) "
        f"at {result.captions_per_s:,.0f} captions/s ({wall:.1f}s wall); "
        f"skipped {t.get('skipped', 0):,} empty, truncated {t.get('truncated', 0):,} over {m.get('max_length', '?')} tokens, "
        f"{t.get('duplicates', 0):,} repeated captions served by an earlier row's embedding."
    )
