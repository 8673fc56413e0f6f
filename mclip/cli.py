"""The `mclip` command line: typer options -> a stage config -> the stage's run(). No logic lives here."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil an English CLIP text tower into a multilingual student, from cached teacher embeddings.")
_state = {"debug": False}


def _ints(text: Optional[str]) -> tuple[int, ...]:
    from mclip.errors import UserError

    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of integers, e.g. 4,8,12") from None


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error.")):
    _state["debug"] = debug


@app.command("embed-teacher")
def embed_teacher(
    data: str = typer.Option(..., help="Captions: hub dataset name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s) or glob."),
    out: str = typer.Option(..., help="Output folder for the Arrow shards and manifest.json."),
    teacher: str = typer.Option("openai/clip-vit-base-patch16", help="Teacher: CLIP checkpoint or any HF encoder (hub id or folder)."),
    split: str = typer.Option("train", help="Dataset split."),
    caption_column: str = typer.Option("caption", help="Column with the English captions."),
    id_column: Optional[str] = typer.Option(None, help="Column with unique ids (default: the row number)."),
    image_column: Optional[str] = typer.Option(None, help="Column with images to embed with the CLIP vision tower."),
    image_id_column: Optional[str] = typer.Option(None, help="Column naming each caption's image (default: image content hash)."),
    cache_layers: Optional[str] = typer.Option(None, help="Teacher layers whose pooled states to cache for layer_kd, e.g. 4,8,12."),
    dtype: str = typer.Option("float16", help="Storage dtype: float16 or float32."),
    normalize: bool = typer.Option(True, help="L2-normalise the embeddings."),
    max_length: Optional[int] = typer.Option(None, help="Token limit (default: the teacher's, 77 for CLIP)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Padded tokens per batch (default 2048 on CPU, 131072 on GPU)."),
    max_batch_size: int = typer.Option(1024, help="Most captions per batch."),
    shard_size: int = typer.Option(10_000, help="Captions per shard (unit of resume and rank split)."),
    dedup: bool = typer.Option(True, help="Embed identical captions once per shard."),
    strict: bool = typer.Option(False, help="Refuse empty captions instead of skipping them."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N rows."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
    overwrite: bool = typer.Option(False, help="Replace an existing cache made with other arguments."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint to run."),
    progress: bool = typer.Option(True, help="Show progress."),
):
    """Stage 1: run the teacher once over the English captions and write Arrow shards."""
    from mclip.config import EmbedConfig
    from mclip.embed_teacher import run

    run(EmbedConfig(data=data, out=out, teacher=teacher, split=split, caption_column=caption_column, id_column=id_column,
                    image_column=image_column, image_id_column=image_id_column, cache_layers=_ints(cache_layers), dtype=dtype,
                    normalize=normalize, max_length=max_length, batch_tokens=batch_tokens, max_batch_size=max_batch_size,
                    shard_size=shard_size, dedup=dedup, strict=strict, limit=limit, device=device, precision=precision,
                    num_threads=num_threads, overwrite=overwrite, trust_remote_code=trust_remote_code, progress=progress))


# ---- stage 2: train-student ----


def _language_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _float_list(text: str) -> tuple[float, ...]:
    from mclip.errors import UserError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.9,0.999") from None


@app.command("train-student")
def train_student(
    data: str = typer.Option(..., help="Parallel captions: wide (id, caption_<lang>...) or long (id, lang, text); file(s), folder or hub name."),
    cache: str = typer.Option(..., help="Teacher cache folder written by `mclip embed-teacher`."),
    out: str = typer.Option(..., help="Run folder: config.json, metrics.jsonl, curves.png, checkpoints/, final/."),
    student: str = typer.Option("xlm-roberta-base", help="Student: HF encoder id or folder, or an exported mclip student."),
    languages: str = typer.Option("zh", help="Languages to train, comma-separated, e.g. zh,de,fr."),
    include_english: bool = typer.Option(True, help="Also train student(en) -> teacher(en) on the cache's English text."),
    split: str = typer.Option("train", help="Dataset split of --data."),
    id_column: str = typer.Option("id", help="Column joining captions to the cache's ids."),
    text_column_template: str = typer.Option("caption_{lang}", help="Wide format: the column of each language."),
    val_data: Optional[str] = typer.Option(None, help="Validation captions (same formats); their ids are never trained on."),
    val_split: str = typer.Option("train", help="Dataset split of --val-data."),
    val_fraction: float = typer.Option(0.0, help="Else hold out this fraction of ids (by hash of id and seed)."),
    val_max_ids: int = typer.Option(5000, help="Validation ids used by the periodic evaluation."),
    pooler: str = typer.Option("mean", help="Student pooling: mean or cls."),
    max_length: int = typer.Option(128, help="Student token limit (capped by the model's)."),
    freeze_embeddings: bool = typer.Option(False, help="Freeze the word-embedding matrix."),
    embedding_lr_scale: float = typer.Option(1.0, help="The word-embedding matrix learns at this multiple of --lr (new tokens: try 5)."),
    extend_vocab: bool = typer.Option(False, help="Add training characters the student's tokenizer maps to [UNK] as new tokens."),
    extend_vocab_words: int = typer.Option(0, help="With --extend-vocab, also add words seen this often that it splits into pieces."),
    extend_vocab_init: str = typer.Option("mean", help="New token rows start at: mean (the old rows' mean), aligned (their English captions' tokens)."),
    projection_init: str = typer.Option("auto", help="auto (identity when student width == teacher dim), identity, random."),
    loss: str = typer.Option("cl", help="mse, cosine, or cl = (1 - alpha) * base + alpha * InfoNCE."),
    alpha: float = typer.Option(0.1, help="Weight of InfoNCE in the cl loss, in [0, 1]."),
    cl_base: str = typer.Option("mse", help="The cl loss's pointwise part: mse or cosine."),
    temperature: float = typer.Option(0.05, help="InfoNCE temperature (initial value when learnt)."),
    fixed_temperature: bool = typer.Option(False, help="Keep the temperature fixed instead of learning it."),
    layer_kd: bool = typer.Option(False, help="Also distil the cache's teacher layer states (needs --cache-layers in stage 1)."),
    student_layers: Optional[str] = typer.Option(None, help="Student layers for layer-kd, one per cached teacher layer, e.g. 4,8,12."),
    layer_kd_weight: float = typer.Option(1.0, help="Weight of the layer-kd loss."),
    epochs: int = typer.Option(1, help="Passes over the training pairs."),
    max_steps: Optional[int] = typer.Option(None, help="Cap on optimizer steps."),
    batch_size: int = typer.Option(64, help="Global batch in pairs (split over ranks and accumulation)."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step on each rank."),
    lr: float = typer.Option(1e-4, help="Peak learning rate."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay (matrices only)."),
    betas: str = typer.Option("0.9,0.999", help="AdamW betas."),
    warmup_steps: int = typer.Option(1000, help="Linear warmup steps."),
    schedule: str = typer.Option("linear", help="Decay after warmup: linear, cosine or constant."),
    min_lr_ratio: float = typer.Option(0.0, help="The decay ends at lr * this."),
    clip_grad: float = typer.Option(1.0, help="Max gradient norm (0 = no clipping)."),
    seed: int = typer.Option(42, help="Seed of init, dropout, data order and validation split."),
    group_batches: int = typer.Option(64, help="Batches per length-sorted mega-batch (1 = no length grouping)."),
    num_workers: int = typer.Option(2, help="DataLoader workers tokenising batches."),
    log_every: int = typer.Option(10, help="Steps between metrics.jsonl records."),
    eval_every: int = typer.Option(1000, help="Steps between validations (0 = only at the end)."),
    eval_batch_size: int = typer.Option(256, help="Texts per forward pass in validation."),
    save_every: int = typer.Option(1000, help="Steps between checkpoints (one is always written at the end)."),
    keep_last: int = typer.Option(2, help="Checkpoints kept."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    num_threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out."),
    overwrite: bool = typer.Option(False, help="Replace the run files in a non-empty --out."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint to run."),
    progress: bool = typer.Option(True, help="Show progress."),
):
    """Stage 2: train a multilingual student to reproduce the cached teacher embeddings from translated captions."""
    from mclip.config import TrainConfig
    from mclip.train_student import run

    run(TrainConfig(data=data, cache=cache, out=out, student=student, languages=_language_list(languages), include_english=include_english,
                    split=split, id_column=id_column, text_column_template=text_column_template, val_data=val_data, val_split=val_split,
                    val_fraction=val_fraction, val_max_ids=val_max_ids, pooler=pooler, max_length=max_length,
                    freeze_embeddings=freeze_embeddings, embedding_lr_scale=embedding_lr_scale,
                    extend_vocab=extend_vocab, extend_vocab_words=extend_vocab_words,
                    extend_vocab_init=extend_vocab_init, projection_init=projection_init, loss=loss, alpha=alpha, cl_base=cl_base, temperature=temperature,
                    fixed_temperature=fixed_temperature, layer_kd=layer_kd, student_layers=_ints(student_layers),
                    layer_kd_weight=layer_kd_weight, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                    lr=lr, weight_decay=weight_decay, betas=_float_list(betas), warmup_steps=warmup_steps, schedule=schedule,
                    min_lr_ratio=min_lr_ratio, clip_grad=clip_grad, seed=seed, group_batches=group_batches, num_workers=num_workers,
                    log_every=log_every, eval_every=eval_every, eval_batch_size=eval_batch_size, save_every=save_every,
                    keep_last=keep_last, device=device, precision=precision, num_threads=num_threads, resume=resume,
                    overwrite=overwrite, trust_remote_code=trust_remote_code, progress=progress))


# ---- stage 3: eval-retrieval, encode ----


def _comma_list(text: Optional[str]) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


@app.command("eval-retrieval")
def eval_retrieval(
    model: str = typer.Option(..., help="Student: a run's final/ folder, a checkpoint folder, or a run folder."),
    cache: str = typer.Option(..., help="Teacher cache from `mclip embed-teacher` (English targets; images when it has them)."),
    data: str = typer.Option(..., help="Parallel captions: wide (id, caption, caption_<lang>) or long (id, lang, text)."),
    out: str = typer.Option(..., help="Output folder for metrics.json, report.md, r_at_1.png, eval.json."),
    languages: str = typer.Option(..., help="Languages to score, comma-separated, e.g. de,fr,ja (English is added when present)."),
    split: str = typer.Option("test", help="Dataset split."),
    id_column: str = typer.Option("id", help="Column with the ids joining captions to the cache."),
    caption_column: str = typer.Option("caption", help="English column (wide format)."),
    text_column_template: str = typer.Option("caption_{lang}", help="Per-language column (wide format)."),
    lang_column: str = typer.Option("lang", help="Language column (long format)."),
    text_column: str = typer.Option("text", help="Text column (long format)."),
    ks: str = typer.Option("1,5,10", help="Recall cut-offs; MRR is cut at the largest."),
    index: str = typer.Option("Flat", help="FAISS index_factory string: Flat (exact), IVF256,Flat, HNSW32, IVF256,PQ16 ..."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists probed per query (default max(16, nlist/16))."),
    faiss_gpu: bool = typer.Option(True, help="Use GPU FAISS when installed and a GPU is visible."),
    query_batch_size: int = typer.Option(4096, help="Queries per FAISS search call."),
    teacher_baseline: bool = typer.Option(False, help="Also score the teacher applied directly to each language's text."),
    teacher: Optional[str] = typer.Option(None, help="Teacher for the baseline (default: the one named in the cache)."),
    images: Optional[bool] = typer.Option(None, "--images/--no-images", help="Text<->image metrics (default: when the cache has images)."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N captions per language."),
    batch_size: int = typer.Option(64, help="Texts per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace the files of a previous eval in --out."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint to run."),
    progress: bool = typer.Option(True, help="Show progress."),
):
    """Stage 3: retrieval per language (R@K, MRR) against the cached teacher, with baselines; writes a report."""
    from mclip.config import EvalConfig
    from mclip.eval_retrieval import run

    run(EvalConfig(model=model, cache=cache, data=data, out=out, languages=_comma_list(languages), split=split, id_column=id_column,
                   caption_column=caption_column, text_column_template=text_column_template, lang_column=lang_column,
                   text_column=text_column, ks=_ints(ks), index=index, nprobe=nprobe, faiss_gpu=faiss_gpu,
                   query_batch_size=query_batch_size, teacher_baseline=teacher_baseline, teacher=teacher, images=images,
                   limit=limit, batch_size=batch_size, device=device, overwrite=overwrite,
                   trust_remote_code=trust_remote_code, progress=progress))


@app.command("encode")
def encode(
    model: str = typer.Option(..., help="Student: a run's final/ folder, a checkpoint folder, or a run folder."),
    out: str = typer.Option(..., help="Output folder for shard-*.arrow (id, text, embedding), encode.json, embeddings.npy."),
    input_file: Optional[str] = typer.Option(None, "--input", help="UTF-8 text file, one text per line (empty lines skipped)."),
    data: Optional[str] = typer.Option(None, help="Or a dataset: hub name, save_to_disk folder, or parquet/jsonl/csv/arrow file(s)."),
    split: str = typer.Option("train", help="Dataset split (with --data)."),
    column: str = typer.Option("text", help="Text column (with --data)."),
    id_column: Optional[str] = typer.Option(None, help="Id column (with --data; default: the row number)."),
    npy: bool = typer.Option(False, help="Also write embeddings.npy, rows in the order of the Arrow rows."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32 or float16."),
    normalize: bool = typer.Option(True, help="L2-normalise the embeddings."),
    batch_size: int = typer.Option(64, help="Texts per forward pass."),
    shard_size: int = typer.Option(100_000, help="Rows per Arrow file."),
    limit: Optional[int] = typer.Option(None, help="Encode only the first N texts."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    overwrite: bool = typer.Option(False, help="Replace the files of a previous encode in --out."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint to run."),
    progress: bool = typer.Option(True, help="Show progress."),
):
    """Encode texts (a text file or a dataset column) with a student into Arrow files (and .npy)."""
    from mclip.config import EncodeConfig
    from mclip.encode import run

    run(EncodeConfig(model=model, out=out, input=input_file, data=data, split=split, column=column, id_column=id_column, npy=npy,
                     dtype=dtype, normalize=normalize, batch_size=batch_size, shard_size=shard_size, limit=limit, device=device,
                     overwrite=overwrite, trust_remote_code=trust_remote_code, progress=progress))


# ---- pipelines: run; hardening: verify ----


@app.command("run")
def run_pipeline(
    pipeline: str = typer.Argument(..., help="Pipeline TOML file, e.g. pipelines/demo.toml."),
    out: Optional[str] = typer.Option(None, help="Run folder (default: the file's out)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a setting: section.key=value, e.g. train.lr=2e-4 (repeatable)."),
):
    """Run embed-teacher -> train-student -> eval-retrieval as a pipeline file names them; rerun to resume."""
    from mclip.pipeline import load_pipeline, run

    run(load_pipeline(pipeline, out=out, overrides=set_ or []))


@app.command("verify")
def verify(path: str = typer.Argument(..., help="A teacher cache, a train-student run folder, or a final/ (or checkpoint) folder.")):
    """Check a cache, a run (every checkpoint and final/) or a student folder against its checksums; changes nothing.

    Prints one line per problem and a summary; exit code 0 when intact, 1 when problems were found, 2 on a user error."""
    from mclip.verify import report, run

    code = report(run(path))
    if code:
        raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: a user error is one line on stderr and exit code 2 (the traceback only with --debug)."""
    from mclip.errors import UserError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"mclip: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mclip: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
