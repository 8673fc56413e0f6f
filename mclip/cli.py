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
    batch_tokens: Optional[int] = typer.Option(None, help="Padded tokens per batch (default 8192 on CPU, 131072 on GPU)."),
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


# ---- stage 3: eval-retrieval, encode ----


# ---- pipelines: run; hardening: verify ----


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
