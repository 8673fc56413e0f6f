"""The `mclip` command line: a stage's options are its config's fields (name, type, default and help from the field, see
`mclip.config.option`); a command builds the config and calls the stage's run(). No logic lives here."""

from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import os
import re
import signal
import sys
import threading
import types
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import typer

from mclip.config import EmbedConfig, EncodeConfig, EvalConfig, ExportConfig, TrainConfig
from mclip.errors import Interrupted, UserError, first_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil an English CLIP text tower into a multilingual student, from cached teacher embeddings.",
)
_state = {"debug": False, "signal": signal.SIGINT, "args": []}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error.")):
    _state["debug"] = debug


def _split(text: str | None, kind: type) -> tuple:
    """A comma- or space-separated value (--languages zh,de or "zh de", --cache-layers 4,8,12, --betas 0.9,0.999) as a
    tuple of `kind`: no value holds a comma or a space, so `--languages "de zh"` is two languages, not one."""

    try:
        return tuple(kind(x) for x in re.split(r"[,\s]+", text or "") if x)
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
        config = config_cls(**values)
        stage = importlib.import_module(module)
        _interruptible(stage.run, stage.interrupted, config)

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
    from mclip.pipeline import interrupted, load_pipeline, run

    _interruptible(run, interrupted, load_pipeline(pipeline, out=out, overrides=set_ or []))


def _interruptible(run: Any, interrupted: Any, config: Any) -> None:
    """run(config); SIGINT or SIGTERM (a KeyboardInterrupt, see `_on_sigterm`) becomes `Interrupted`, which carries what
    the output keeps (`interrupted(config)`) past typer, which would otherwise swallow it into a returned exit code."""
    try:
        run(config)
    except KeyboardInterrupt:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        raise Interrupted(*interrupted(config)) from None
    except OSError as exc:  # a full disk met by a write no stage turned into its own line
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or _state["debug"]:
            raise
        kept, flag = interrupted(config)
        where = f" writing {exc.filename}" if exc.filename else ""
        raise UserError(
            f"no space left on device{where}; {kept}; free space and continue with: "
            f"{_continue_command(_state['args'], flag)}"
        ) from None


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


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's stop, torchrun's agent stopping its ranks) takes Ctrl-C's path: the run stops where it is,
    its output keeps what is written, and one line says how to continue. A second SIGTERM ends the process at once."""
    _state["signal"] = signum
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt


def _continue_command(args: list[str], flag: str | None) -> str:
    """The command line that continues an interrupted one: the same arguments, with `flag` (--resume, --overwrite) added
    in place of the ones it excludes."""
    if flag and flag not in args:
        drop = {"--resume": ("--overwrite", "--no-resume"), "--overwrite": ("--no-overwrite",)}.get(flag, ())
        args = [a for a in args if a not in drop] + [flag]
    return " ".join(_quote(arg) for arg in ["mclip", *args])


def _quote(arg: str) -> str:
    """An argument as a POSIX shell reads it back: shlex.quote's rule (mclip imports no shell module: test_trust)."""
    if arg and re.fullmatch(r"[\w@%+=:,./-]+", arg, flags=re.ASCII):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _interrupted(kept: str | None, flag: str | None, args: list[str]) -> None:
    """The one line of an interrupted command, then exit 128 + the signal (130 for SIGINT, 143 for SIGTERM); under
    torchrun only rank 0 speaks."""
    signum = _state["signal"]
    if os.environ.get("RANK", "0") == "0":
        name, command = signal.Signals(signum).name, _continue_command(args, flag)
        print(
            f"mclip: interrupted by {name}; {kept or 'nothing written yet'}; continue with: {command}", file=sys.stderr
        )
    sys.exit(128 + signum)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: a user error is one line on stderr and exit code 2 (the traceback only with --debug); SIGINT and
    SIGTERM are one line saying what was kept and how to continue, and exit code 130 or 143."""

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    _state["args"] = args
    main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    before = signal.getsignal(signal.SIGTERM) if main_thread else None
    if before == signal.SIG_DFL:  # never over a handler the caller installed, nor a SIGTERM it ignores
        signal.signal(signal.SIGTERM, _on_sigterm)
    _state["signal"] = signal.SIGINT
    try:
        code = app(args=args, standalone_mode=False)
    except UserError as exc:
        if _state["debug"]:
            raise
        print(f"mclip: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        _interrupted(exc.kept, exc.flag, args)
    except KeyboardInterrupt:  # before typer ran the command (typer turns one inside it into a returned 130)
        _interrupted(None, None, args)
    except Exception as exc:
        broken = _broken_torchvision(exc)
        if broken and not _state["debug"]:
            print(f"mclip: error: {broken}", file=sys.stderr)
            sys.exit(2)
        click_errors, aborts = _click_exceptions()
        if isinstance(exc, click_errors):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, aborts):
            sys.exit(1)
        raise
    finally:
        if before == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code == 130:  # typer's Exit(130): interrupted while parsing the options, before any command ran
        _interrupted(None, None, args)
    if isinstance(code, int) and code:
        sys.exit(code)


def _broken_torchvision(exc: BaseException) -> str | None:
    """One line for a torchvision that cannot load beside the installed torch (one built for CUDA beside a CPU torch,
    or for another torch version): transformers imports it whenever it is installed, and its failure surfaces as
    `Could not import module 'BertModel'`, naming neither torchvision nor the fix. None for any other error."""
    import traceback
    from importlib import metadata

    seen, cause = [], exc
    while cause is not None and cause not in seen:
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in seen:
        frames = traceback.extract_tb(error.__traceback__)
        if "torchvision" in str(error) or any(f"{os.sep}torchvision{os.sep}" in f.filename for f in frames):
            try:
                version = metadata.version("torchvision")
            except metadata.PackageNotFoundError:
                version = "?"
            torch = sys.modules.get("torch")
            beside = f"torch {torch.__version__}" if torch is not None else "the installed torch"
            return (
                f"torchvision {version} cannot be imported beside {beside} ({first_line(error, 160)}), and "
                "transformers imports it whenever it is installed; install the torchvision built for this torch, or "
                "uninstall it"
            )
    return None


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
