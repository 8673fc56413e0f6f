"""Stage 2: train a multilingual student on (caption, cached teacher vector) pairs, top to bottom: the inputs, the model
and optimizer, the loop, the export. The pairs and the epoch plan are `mclip.train.pairs`', the run folder, checkpoints
and resume `mclip.train.checkpoint`'s."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mclip import __version__, distributed
from mclip.config import TrainConfig, to_dict
from mclip.errors import UserError
from mclip.models.student import StudentEncoder, build_student, load
from mclip.store import outputs, shards
from mclip.store.columns import Column
from mclip.store.outputs import META
from mclip.train import checkpoint, lazy_adam, losses
from mclip.train.batches import EpochPlan, EpochSteps, open_lengths, token_lengths
from mclip.train.distiller import Distiller, lr_at, param_groups
from mclip.train.pairs import PAIRS_DIR, Pairs, build_pairs, open_pairs
from mclip.train.report import Reporter, check_installed
from mclip.train.vocab import RowLR, extend_vocabulary


@dataclass
class TrainResult:
    out: Path  # the run folder
    final: Path  # the exported student (mclip.load, transformers, sentence-transformers)
    steps: int  # optimizer steps done, this run and the ones it resumed
    metrics: dict  # the last train record and the last validation, merged
    pairs_per_s: float  # global training throughput of this run (0 when it had nothing left to do)
    seconds: float  # wall time of this run
    join: dict  # what joined and what did not (also in join.json)
    warnings: list[str] = dataclasses.field(default_factory=list)  # settings not taken as given (config.json, summary)


def _warnings(config: TrainConfig, student: StudentEncoder, total_steps: int) -> list[str]:
    """What the run will do otherwise than its settings say, each printed as `mclip: warning:` and kept in config.json
    and summary.json."""
    found = []
    default = next(f.default for f in dataclasses.fields(config) if f.name == "max_length")
    # the default is documented as capped by the student's limit; a --max-length the user chose above it is warned of
    if student.max_length < config.max_length != default:
        found.append(
            f"--max-length {config.max_length} is above the {student.max_length} positions of student "
            f"{config.student}; captions are cut at {student.max_length} tokens (recorded as max_length)"
        )
    if config.warmup_steps > total_steps:
        peak = lr_at(total_steps - 1, config, total_steps)
        found.append(
            f"--warmup-steps {config.warmup_steps} is longer than the run's {total_steps} steps, so the learning rate "
            f"peaks at {peak:.3g}, not --lr {config.lr:g}; lower --warmup-steps (e.g. {max(1, total_steps // 10)})"
        )
    return found


def _student(config: TrainConfig, cache, resume_from: Path | None, train: Pairs) -> StudentEncoder:
    """The checkpoint's student on resume; else an exported mclip student to continue, or a fresh HF encoder and
    projection. A continued student takes --max-length and --extend-vocab as a fresh one does."""
    continued = resume_from is None and (Path(config.student) / META).exists()
    if resume_from is not None or continued:
        source = resume_from or Path(config.student)
        student = load(source, trust_remote_code=config.trust_remote_code)
        if student.pooler != config.pooler and resume_from is None:
            raise UserError(
                f"student {source} was exported with --pooler {student.pooler}; pass --pooler {student.pooler}"
            )
        if continued:
            student.max_length = int(min(config.max_length, student.position_limit or config.max_length))
    else:
        student = build_student(
            config.student,
            cache.dim,
            pooler=config.pooler,
            max_length=config.max_length,
            trust_remote_code=config.trust_remote_code,
            projection_init=config.projection_init,
        )
    if config.extend_vocab and resume_from is None:  # a checkpoint's student holds the tokens its run added
        # the new tokens come from the other languages only, and none may change how the English captions tokenise:
        # English keeps the teacher's own reading (a teacher-initialised student still equals the teacher at step 0)
        is_en = np.asarray(train.langs) == (train.languages.index("en") if "en" in train.languages else -1)
        other = train.subset(~is_en)
        cache_text = cache.column("text")
        english = cache_text.take(other.rows).to_pylist() if config.extend_vocab_init == "aligned" else None
        keep = cache_text.take(np.unique(np.asarray(train.rows))).to_pylist()
        added = extend_vocabulary(
            student,
            other.texts(),
            config.extend_vocab_words,
            english,
            keep,
            config.extend_vocab_min_piece_rate,
            config.extend_vocab_stems,
            config.extend_vocab_stem_piece_rate,
        )
        student.meta["added_tokens"] = int(student.meta.get("added_tokens", 0)) + len(added)
    if student.dim != cache.dim:
        raise UserError(
            f"student {resume_from or config.student} projects to {student.dim} dims but cache {config.cache} holds "
            f"{cache.dim}-dim targets (teacher {cache.manifest['teacher']['name']}); use the cache it was "
            "trained on, or a fresh --student"
        )
    pooler_head = getattr(student.backbone, "pooler", None)
    if isinstance(
        pooler_head, nn.Module
    ):  # the HF pooler head (BERT, XLM-R) is not on mclip's path: frozen, DDP needs no unused grads
        pooler_head.requires_grad_(False)
    if config.freeze_embeddings:
        student.backbone.get_input_embeddings().weight.requires_grad_(False)
    if config.sparse_embeddings:
        lazy_adam.sparse_embeddings(student)
    return student


def _layer_plan(config: TrainConfig, cache, student: StudentEncoder) -> tuple[int, ...]:
    """The student layer distilled from each cached teacher layer; default: the same relative depth."""
    if not config.layer_kd:
        return ()
    if not cache.layers:
        raise UserError(
            f"--layer-kd needs teacher layer states but cache {config.cache} has none; rebuild it with "
            "`mclip embed-teacher --cache-layers 4,8,12` (any teacher layers)"
        )
    depth = int(cache.manifest["teacher"]["num_layers"])
    chosen = config.student_layers or tuple(max(1, round(t * student.num_layers / depth)) for t in cache.layers)
    if len(chosen) != len(cache.layers):
        raise UserError(
            f"--student-layers names {len(chosen)} layers but the cache holds {len(cache.layers)} "
            f"(teacher layers {','.join(map(str, cache.layers))}); pass one student layer per teacher layer"
        )
    if max(chosen) > student.num_layers:
        raise UserError(
            f"--student-layers {','.join(map(str, chosen))} exceed the student's {student.num_layers} layers"
        )
    return tuple(chosen)


# ---- evaluation and reporting ----


@torch.no_grad()
def evaluate(model: Distiller, val: Pairs, targets: Column, config: TrainConfig, normalized: bool = True) -> dict:
    """Validation loss (the distillation loss without layer-kd, in chunks of --batch-size) and R@1 of student(xx) ->
    teacher(en) per language, by exact search over the validation ids' teacher vectors; as in stage 3, identical English
    captions are one target, so retrieving the twin of a caption's English counts as a hit, and a tie counts against
    the query (`_first_without_ties`)."""
    emb = torch.from_numpy(
        model.student.encode(val.texts(), batch_size=config.eval_batch_size, normalize=False)
    )  # (V, D)
    own = torch.from_numpy(targets.gather(val.rows))  # (V, D)
    val_groups = val.groups(np.arange(len(val)))
    groups = torch.from_numpy(val_groups)
    temperature = model.temperature().detach().cpu()
    total = 0.0
    for start in range(0, len(val), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        n = len(own[chunk])
        parts = losses.distillation(
            emb[chunk],
            own[chunk],
            torch.arange(n),
            losses.same_target(own[chunk], groups[chunk]),
            config.loss,
            config.alpha,
            config.cl_base,
            temperature,
            normalized,
        )
        total += float(losses.total(parts)) * n
    gallery_groups, first = np.unique(val_groups, return_index=True)  # one gallery entry per distinct English caption
    gallery = F.normalize(torch.from_numpy(targets.gather(val.rows[first])), dim=-1)  # (G, D)
    queries = F.normalize(emb, dim=-1)
    relevant = torch.from_numpy(np.searchsorted(gallery_groups, val_groups))  # (V,) each query's English caption
    hit = np.concatenate(
        [
            _first_without_ties(chunk @ gallery.T, relevant[s : s + len(chunk)]).numpy()
            for s in range(0, len(queries), 4096)
            for chunk in [queries[s : s + 4096]]
        ]
    )
    result = {"val_loss": total / len(val)}
    for k, lang in enumerate(val.languages):
        if (val.langs == k).any():
            result[f"val_r1_{lang}"] = float(hit[val.langs == k].mean())
    return result


def _first_without_ties(scores: torch.Tensor, relevant: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """scores (Q, G), relevant (Q,) the one relevant gallery item per query -> (Q,) bool: rank 1 by stage 3's rule,
    ties counted against the query (no other item scores within `atol` of the relevant one): the rank 1 that
    mclip.evaluate.metrics.ranks_from_labels gives (a stage imports no other; tests/train/test_run.py checks both)."""
    scores = scores.double()  # compared in float64, as stage 3 compares them
    own = scores.gather(1, relevant[:, None])  # (Q, 1)
    others = scores >= own - atol  # (Q, G), the relevant item itself included
    return others.sum(1) == 1


def _plan(report: dict, train: Pairs, total_steps: int, batch_size: int, step: int, out: Path) -> str:
    langs = ", ".join(f"{lang} {report[lang]['pairs']:,}" for lang in report["languages"])
    lost = sum(report[lang].get("ids_without_target", 0) for lang in report["languages"])
    return (
        f"train-student: {len(train):,} training pairs ({langs}), {report['validation_ids']:,} validation ids, "
        f"{lost:,} captions without a target (see {out / 'join.json'}); {total_steps:,} steps of {batch_size}"
        f"{'; resuming at step ' + str(step) if step else ''}"
    )


def summary(result: TrainResult) -> str:
    val = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
    shown = ", ".join(f"{k[4:]} {v:.4f}" for k, v in val.items())
    return (
        f"train-student: {result.steps:,} steps on {result.join['train_pairs']:,} pairs, loss "
        f"{result.metrics.get('loss', float('nan')):.4f}{'; ' + shown if shown else ''}; {result.pairs_per_s:,.0f} "
        f"pairs/s, {result.seconds:.1f}s; student at {result.final}"
    )


# ---- the run ----


def is_complete(config: TrainConfig) -> bool:
    """Whether --out holds a finished run (a rerun with --resume finds nothing to do; `mclip run` reports it
    skipped)."""
    return checkpoint.is_finished(Path(config.out))


def run(config: TrainConfig) -> TrainResult:
    """Train the student; --resume continues from the latest checkpoint; under torchrun each global batch is split over
    ranks."""
    started = time.perf_counter()
    with distributed.group(config.device) as (ctx, device), outputs.hold(config.out, "train-student", ctx):
        state = {"made_out": not Path(config.out).exists(), "scratch": None, "claimed": False, "reporter": None}
        try:
            return _run(config, ctx, device, started, state)
        except UserError:
            if (
                ctx.is_main and state["scratch"] is not None and not state["claimed"]
            ):  # a refused run leaves the folder as it was
                shutil.rmtree(state["scratch"], ignore_errors=True)
                if state["made_out"] and Path(config.out).is_dir() and not any(Path(config.out).iterdir()):
                    Path(config.out).rmdir()
            raise
        finally:
            if state["reporter"] is not None:
                state["reporter"].close()


def interrupted(config: TrainConfig) -> tuple[str, str | None]:
    """What an interrupted run left in --out, and the flag that continues it."""
    found = checkpoint.checkpoints(Path(config.out))
    if checkpoint.is_finished(Path(config.out)):
        return f"the finished run in {config.out} kept", "--resume"
    if not found:
        return f"no checkpoint written yet (one every {config.save_every} steps)", "--resume"
    return f"checkpoint {found[-1][1]} kept (step {found[-1][0]})", "--resume"


class _Window:
    """The steps since the last train record, which holds their mean loss parts and speed, not one batch's."""

    def __init__(self) -> None:
        self.start, self.steps, self.wait, self.parts = (
            time.perf_counter(),
            0,
            0.0,
            None,
        )  # wait: seconds blocked on the DataLoader

    def add(self, parts: torch.Tensor) -> None:
        self.steps += 1
        self.parts = parts if self.parts is None else self.parts + parts


def _run(config: TrainConfig, ctx, device: torch.device, started: float, state: dict) -> TrainResult:
    # ---- the inputs, all checked before anything is written
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out = Path(config.out)
    cache = shards.open_cache(config.cache)
    check_installed(config.report_to)
    resume_from, damaged = distributed.main_only(ctx, lambda: checkpoint.check_out(config, cache))
    if config.sparse_embeddings and ctx.enabled:
        raise UserError(
            f"--sparse-embeddings runs in one process, not {ctx.world_size} ranks (DDP syncs dense gradients); drop it"
        )
    if config.batch_size % (ctx.world_size * config.grad_accum):
        raise UserError(
            f"--batch-size {config.batch_size} must split evenly over {ctx.world_size} rank(s) x "
            f"--grad-accum {config.grad_accum}"
        )
    precision = distributed.resolve_precision(config.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(config.seed)  # the same init on every rank (DDP broadcasts rank 0's weights anyway)
    folder = (
        out / PAIRS_DIR
    )  # the pairs on disk, built by rank 0 and memory-mapped by every rank; gone when the run finishes
    state["scratch"] = folder
    distributed.main_only(ctx, lambda: build_pairs(config, cache, folder))
    train, val, report = open_pairs(config, cache, folder)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(train)} training pairs; lower it")
    total_steps = min(steps_per_epoch * config.epochs, config.max_steps or math.inf)

    # ---- the model, the optimizer, and where a resumed run left them
    student = _student(config, cache, resume_from, train)
    config = dataclasses.replace(config, student_layers=_layer_plan(config, cache, student))
    warnings = _warnings(config, student, total_steps)
    teacher = cache.manifest["teacher"]
    student.meta.update(
        {
            "teacher": {k: teacher[k] for k in ("name", "fingerprint", "dim", "kind", "pooling")}
            | {"normalized": cache.manifest["normalized"]},
            "languages": report["languages"],
            "train": to_dict(config),
            "base_model": student.meta.get("base_model") or config.student,  # what training began from (model card)
        }
    )
    student.meta.pop("metrics", None)  # a continued student's are its last run's; final/ gets this run's
    model = Distiller(
        student,
        config.temperature,
        config.loss == "cl" and not config.fixed_temperature,
        config.student_layers,
        int(cache.manifest["layer_dim"] or 0),
    ).to(device)
    targets = cache.targets("embedding")  # (N, D) through the memory map, gathered B rows a step
    layer_targets = [
        cache.targets(shards.layer_column(t)) for t in (cache.layers if config.layer_kd else ())
    ]  # K x (N, H)
    # fused: one kernel over all parameters; on CPU it is ~6x faster than the per-tensor loop for a 22M-parameter
    # student
    optimizer = (lazy_adam.LazyAdamW if config.sparse_embeddings else torch.optim.AdamW)(
        param_groups(model, config.weight_decay, config.embedding_lr_scale),
        lr=config.lr,
        betas=config.betas,
        fused=device.type in ("cpu", "cuda"),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    old_rows = RowLR.of(
        student, config.embedding_lr_scale_old, config.embedding_lr_scale
    )  # the rows before extend-vocab's
    if config.group_batches > 1:
        token_lengths(student.tokenizer, train, student.max_length, folder / "lengths", ctx.rank, ctx.world_size)
    lengths = open_lengths(folder / "lengths", len(train)) if config.group_batches > 1 else None
    normalized = bool(cache.manifest["normalized"])  # unit targets: the pointwise losses compare the normalised student
    digest = train.digest() + (val.digest() if val is not None else "")  # which pairs train and which validate
    if resume_from is not None:
        step = checkpoint.restore(resume_from, model, optimizer, scaler, len(train), digest, ctx.rank)
    else:
        step = 0
        torch.manual_seed(config.seed + ctx.rank)  # dropout differs between ranks, as it would over a bigger batch
        np.random.seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)
    if ctx.is_main:
        checkpoint.claim(
            config,
            damaged,
            resume_from,
            {
                "mclip_version": __version__,
                "train": to_dict(config),
                "teacher": teacher,
                "cache": {"dim": cache.dim, "rows": len(cache), "layers": cache.layers},
                "world_size": ctx.world_size,
                "precision": precision,
                "total_steps": total_steps,
                "max_length": student.max_length,  # the token limit in effect (--max-length capped by the student's)
                "warnings": warnings,
            },
            report,
            step,
        )
        state["claimed"] = True
        state["reporter"] = Reporter(out, config.report_to, step, to_dict(config))
        for line in warnings:
            print(f"mclip: warning: {line}", file=sys.stderr)
        if config.wise_ft < 1:
            checkpoint.start_weights(out, student, step, config.wise_ft)
        if config.progress:
            print(_plan(report, train, total_steps, config.batch_size, step, out), file=sys.stderr)
    ddp = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if ctx.enabled
        else model
    )
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- the loop
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        desc="train-student",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not (config.progress and ctx.is_main),
    )
    last, last_val, latest_checkpoint = {}, {}, resume_from
    trained_pairs, train_seconds, window = 0, 0.0, _Window()
    epoch, epoch_step = divmod(step, steps_per_epoch)
    model.train()
    while step < total_steps:
        plan = EpochPlan(lengths, train.langs, config.batch_size, config.seed, epoch, config.group_batches)
        steps = EpochSteps(
            plan,
            train,
            targets,
            layer_targets,
            student.tokenizer,
            student.max_length,
            ctx.rank,
            ctx.world_size,
            config.grad_accum,
        )
        loader = torch.utils.data.DataLoader(
            steps,
            batch_size=None,
            sampler=range(epoch_step, len(plan)),
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),
        )
        fetch_start = time.perf_counter()  # the first fetch also pays for starting the workers
        for batch in loader:
            window.wait += time.perf_counter() - fetch_start
            if step >= total_steps:
                break
            lr = lr_at(step, config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batch_targets = batch["targets"].to(
                device
            )  # (B, D) the global batch's teacher vectors: own targets and negatives
            same = batch["same"].to(device)  # (B, B) True where two rows carry one target (same id or same caption)
            parts_sum: dict[str, torch.Tensor] = {}
            for i, micro in enumerate(batch["micro"]):
                pos = micro["pos"].to(device)  # (m,) this micro-batch's positions in the global batch
                sync = ddp.no_sync() if ctx.enabled and i < config.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        emb, states, temperature = ddp(
                            micro["input_ids"].to(device, non_blocking=True),
                            micro["attention_mask"].to(device, non_blocking=True),
                        )
                    parts = losses.distillation(
                        emb,
                        batch_targets,
                        pos,
                        same[pos],
                        config.loss,
                        config.alpha,
                        config.cl_base,
                        temperature,
                        normalized,
                    )
                    if states:
                        parts |= losses.layer_kd(
                            states, [t.to(device)[pos] for t in batch["layers"]], config.layer_kd_weight
                        )
                    scaler.scale(losses.total(parts) / config.grad_accum).backward()
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + value.detach() / config.grad_accum
            reduced = distributed.mean_over_ranks(
                torch.stack(list(parts_sum.values()))
            )  # every rank sees the same numbers
            loss = float(reduced.sum())
            if not math.isfinite(loss):
                bar.close()
                where = (
                    f"the last good checkpoint is {latest_checkpoint}"
                    if latest_checkpoint
                    else "no checkpoint was written yet"
                )
                raise UserError(
                    f"loss is {loss} at step {step + 1} (epoch {epoch + 1}); stopped before applying it and {where}; "
                    f"lower --lr (now {config.lr:g}) or check the cache for non-finite "
                    "targets, then rerun with --resume"
                )
            scaler.unscale_(optimizer)
            grad_norm = float(lazy_adam.clip_grad_norm_(trainable, config.clip_grad)) if config.clip_grad > 0 else None
            with old_rows:  # the student's own token rows take embedding_lr_scale_old's share of the step
                scaler.step(optimizer)
            scaler.update()
            model.clamp_temperature_()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_step += 1
            window.add(reduced)
            bar.update(1)

            record_now = step % config.log_every == 0 or step == total_steps
            if record_now:
                elapsed = time.perf_counter() - window.start
                trained_pairs += window.steps * config.batch_size
                train_seconds += elapsed
                mean_parts = window.parts / window.steps
                last = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch + epoch_step / steps_per_epoch,
                    "lr": lr,
                    "loss": float(mean_parts.sum()),
                    **{name: float(v) for name, v in zip(parts_sum, mean_parts)},
                    "temperature": float(model.temperature().detach()),
                    "grad_norm": grad_norm,
                    "pairs_per_s": window.steps * config.batch_size / max(elapsed, 1e-9),
                    "data_wait": min(1.0, window.wait / max(elapsed, 1e-9)),
                }  # share of the window spent waiting for batches
                bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{last['pairs_per_s']:,.0f}", refresh=False)
                if ctx.is_main:
                    checkpoint.log(out, last)
                    state["reporter"].log(last)
            if val is not None and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                if ctx.is_main:
                    last_val = {"kind": "val", "step": step, **evaluate(model, val, targets, config, normalized)}
                    checkpoint.log(out, last_val)
                    state["reporter"].log(last_val)
                    model.train()
                distributed.barrier()
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                trainer = checkpoint.trainer_state(
                    model,
                    optimizer,
                    scaler,
                    step=step,
                    epoch=epoch,
                    epoch_step=epoch_step,
                    steps_per_epoch=steps_per_epoch,
                    train_pairs=len(train),
                    pairs_digest=digest,
                    teacher_fingerprint=teacher["fingerprint"],
                )
                if ctx.is_main:
                    latest_checkpoint = checkpoint.save(out, step, model, trainer, config.keep_last)
                distributed.barrier()
            if record_now:  # the next window starts after this step's validation and checkpoint
                window = _Window()
            fetch_start = time.perf_counter()
        else:
            epoch, epoch_step = epoch + 1, 0
    bar.close()

    # ---- the export
    if not last:  # nothing left to train (a finished run resumed): report what it recorded
        for record in checkpoint.records(out):
            (last if record["kind"] == "train" else last_val).update(record)
    export = ctx.is_main and (
        trained_pairs or not (out / "final" / META).exists()
    )  # a finished run resumed leaves final/ as it was
    if (
        export and config.wise_ft < 1
    ):  # WiSE-FT: final/ mixes the trained weights with the step-0 ones; validated as exported
        checkpoint.mix_start(out, student, config.wise_ft)
        if val is not None:
            last_val = {
                "kind": "val",
                "step": step,
                "wise_ft": config.wise_ft,
                **evaluate(model, val, targets, config, normalized),
            }
            checkpoint.log(out, last_val)
            state["reporter"].log(last_val)
    metrics = {k: v for k, v in {**last, **last_val}.items() if k != "kind"}
    result = TrainResult(
        out,
        out / "final",
        step,
        metrics,
        trained_pairs / train_seconds if train_seconds else 0.0,
        time.perf_counter() - started,
        report,
        warnings,
    )
    if export:
        student.meta["metrics"] = result.metrics  # final/'s mclip.json and model card carry the last figures
        checkpoint.finish(
            out,
            model,
            {
                "final": str(result.final),
                "steps": step,
                "total_steps": total_steps,
                "metrics": result.metrics,
                "pairs_per_s": result.pairs_per_s,
                "seconds": result.seconds,
                "train_pairs": len(train),
                "world_size": ctx.world_size,
                "max_length": student.max_length,
                "warnings": warnings,
            },
        )
        if config.progress:
            print(summary(result), file=sys.stderr)
    distributed.barrier()
    if ctx.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # rebuilt by a resumed run: the cache and the captions are the truth
    return result
