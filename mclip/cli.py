"""The `mclip` command line: a stage's options are its config's fields (name, type, default and help from the field, see
`mclip.config.option`); a command builds the config and calls the stage's run(). No logic lives here."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
import types
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import typer

from mclip.config import EmbedConfig, EncodeConfig, EvalConfig, ExportConfig, TrainConfig
from mclip.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil an English CLIP text tower into a multilingual student, from cached teacher embeddings.",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from mclip import __version__

        print(f"mclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="Print the version."),
):
    _state["debug"] = debug


def _split(text: str | None, kind: type) -> tuple:
    """A comma-separated value (--languages zh,de, --cache-layers 4,8,12, --betas 0.9,0.999) as a tuple of `kind`."""

    try:
        return tuple(kind(x.strip()) for x in (text or "").split(",") if x.strip())
    except ValueError:
        what = "integers, e.g. 4,8,12" if kind is int else "numbers, e.g. 0.9,0.999"
        raise UserError(f"{text!r} is not a comma-separated list of {what}") from None


def _option(field: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """The annotation and typer.Option of a config field: a tuple is one comma-separated string, `X | None` is Optional[X],
    a bool is --name/--no-name (typer's default; spelled out for `bool | None`, whose None means "decide for me")."""
    default = ... if field.metadata["required"] else field.default
    decls = []
    if get_origin(hint) is tuple:
        annotation = Optional[str]
        default = default if default is ... else ",".join(map(str, default)) or None
    elif get_origin(hint) in (Union, types.UnionType):
        annotation = Optional[next(arg for arg in get_args(hint) if arg is not type(None))]
        name = field.name.replace("_", "-")
        decls = [f"--{name}/--no-{name}"] if annotation == Optional[bool] else []
    else:
        annotation = hint
    if field.metadata.get("argument"):
        return annotation, typer.Argument(
            default, help=field.metadata["help"], show_default=False, metavar=field.name.upper()
        )
    return annotation, typer.Option(default, *decls, help=field.metadata["help"])


def _stage(name: str, config_cls: type, module: str) -> None:
    """`mclip NAME`: one option per field of `config_cls`; runs `MODULE.run(config)` (imported only then)."""
    hints = get_type_hints(config_cls)
    fields = dataclasses.fields(config_cls)
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
        for f in fields
        for annotation, option in [_option(f, hints[f.name])]
    ]

    def command(**values):
        for f in fields:
            if get_origin(hints[f.name]) is tuple:  # tuple[int, ...], tuple[float, float], tuple[str, ...]
                values[f.name] = _split(values[f.name], get_args(hints[f.name])[0])
        importlib.import_module(module).run(config_cls(**values))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__, command.__doc__ = name.replace("-", "_"), config_cls.__doc__
    app.command(name)(command)


_stage("embed-teacher", EmbedConfig, "mclip.embed.run")
_stage("train-student", TrainConfig, "mclip.train.run")
_stage("eval-retrieval", EvalConfig, "mclip.evaluate.run")
_stage("encode", EncodeConfig, "mclip.deploy.encode")
_stage("export", ExportConfig, "mclip.deploy.export")


# ---- pipelines: run; hardening: verify ----


@app.command("run")
def run_pipeline(
    pipeline: str = typer.Argument(..., help="Pipeline TOML file, e.g. pipelines/demo.toml."),
    out: Optional[str] = typer.Option(None, help="Run folder (default: the file's out)."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", help="Override a setting: section.key=value, e.g. train.lr=2e-4 (repeatable)."
    ),
):
    """Run embed-teacher -> train-student -> eval-retrieval as a pipeline file names them; rerun to resume."""
    from mclip.pipeline import load_pipeline, run

    run(load_pipeline(pipeline, out=out, overrides=set_ or []))


@app.command("verify")
def verify(
    path: str = typer.Argument(
        ..., help="A teacher cache, a train-student run folder, or a final/ (or checkpoint) folder."
    ),
):
    """Check a cache, a run (every checkpoint and final/) or a student folder against its checksums; changes nothing.

    Prints one line per problem and a summary; exit code 0 when intact, 1 when problems were found, 2 on a user error."""
    from mclip.store.verify import report, run

    code = report(run(path))
    if code:
        raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: a user error is one line on stderr and exit code 2 (the traceback only with --debug)."""

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
        click_errors, aborts = _click_exceptions()
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, aborts):
            sys.exit(1)
        raise


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage errors and aborts of click and of the copy of click that typer >= 0.29 bundles (typer._click), so a missing
    option is click's one-line usage error, not a traceback, whichever click typer runs on."""
    import importlib

    errors, aborts = [], []
    for name in ("click", "typer._click"):
        try:
            module = importlib.import_module(f"{name}.exceptions")
        except ImportError:
            continue
        errors.append(module.ClickException)
        aborts += [module.Abort] if hasattr(module, "Abort") else []
    import typer

    return tuple(errors), tuple(aborts + [typer.Abort])
