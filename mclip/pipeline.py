"""`mclip run PIPELINE.toml`: a TOML file names a whole run (embed-teacher -> train-student -> eval-retrieval) into one folder.

Paths in the file are relative to the file. The stages land in OUT/cache, OUT/train and OUT/eval; a stage whose output is
already complete is skipped, so a killed run resumes by running the same command again.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mclip import distributed
from mclip.config import EmbedConfig, EvalConfig, PipelineConfig, TrainConfig, from_dict, parse_text, to_dict, unquote
from mclip.embed import run as embed_teacher
from mclip.errors import ConfigError, UserError, writing
from mclip.evaluate import run as eval_retrieval
from mclip.store import outputs
from mclip.train import run as train_student

SECTIONS = {"embed": EmbedConfig, "train": TrainConfig, "eval": EvalConfig}
# Set by the pipeline itself: where each stage writes and what it reads from the stage before.
WIRED = {"embed": ("out",), "train": ("cache", "out"), "eval": ("model", "cache", "out")}
# Values that name a file, folder or model: resolved relative to the pipeline file when they look like paths.
PATH_KEYS = {"embed": ("data", "teacher"), "train": ("data", "val_data", "student"), "eval": ("data", "teacher")}


@dataclass
class PipelineResult:
    out: Path
    stages: dict  # stage -> "ran" or "skipped"
    metrics: dict  # eval metrics.json
    seconds: float


def _toml(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where} is not valid TOML ({exc}); fix the file") from None


def _resolve(value, base: Path):
    """A relative path-looking value (./x, ../x, or a path that exists next to the file) is made relative to the file;
    hub ids (org/name) and package: sources pass through."""
    if not isinstance(value, str) or not value or value.startswith(("package:", "/")):
        return value
    candidate = base / value
    if value.startswith(("./", "../")) or candidate.exists():
        return str(candidate.resolve()) if "*" not in value else str(candidate)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply --set section.key=value (or key=value at the top level) to the parsed file."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not key=value; write e.g. --set train.lr=2e-4")
        *path, leaf = key.strip().split(".")
        if len(path) > 1:
            raise UserError(f"--set {key!r} is nested too deep; write section.key, e.g. train.lr")
        if path and path[0] not in SECTIONS:
            close = difflib.get_close_matches(path[0], list(SECTIONS), n=1)
            raise UserError(
                f"--set {key!r}: unknown section {path[0]!r}"
                + (f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(SECTIONS)}")
            )
        target = raw.setdefault(path[0], {}) if path else raw
        cls = SECTIONS[path[0]] if path else None
        known = cls is not None and leaf in {f.name for f in dataclasses.fields(cls)}
        # parsed by the field's type; an unknown key is refused, with the closest one, by from_dict
        target[leaf] = parse_text(cls, leaf, value, where=f"--set {item}") if known else unquote(value.strip())
    return raw


def load_pipeline(path: str | Path, out: str | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Parse and validate a pipeline file: unknown keys are refused naming the closest valid one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file {path} does not exist; pass a file such as pipelines/demo.toml")
    raw = apply_overrides(_toml(path.read_text(encoding="utf-8"), str(path)), list(overrides))
    base = path.parent
    top = {"name", "out", *SECTIONS}
    for key in raw:
        if key not in top:
            close = difflib.get_close_matches(key, sorted(top), n=1)
            raise ConfigError(
                f"unknown key {key!r} in {path}"
                + (f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(top))}")
            )
    run_dir = Path(out) if out else (_resolve_out(raw.get("out"), base, path))
    stage_out = {
        "embed": {"out": run_dir / "cache"},
        "train": {"cache": run_dir / "cache", "out": run_dir / "train"},
        "eval": {"model": run_dir / "train" / "final", "cache": run_dir / "cache", "out": run_dir / "eval"},
    }
    configs = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{name}] in {path} must be a table of settings")
        for key in WIRED[name]:
            if key in section:
                raise ConfigError(f"{name}.{key} in {path} is set by the pipeline ({stage_out[name][key]}); remove it")
        values = {k: (_resolve(v, base) if k in PATH_KEYS[name] else v) for k, v in section.items()}
        values.update({k: str(v) for k, v in stage_out[name].items()})
        configs[name] = from_dict(cls, values, where=f"[{name}] of {path}")
    return PipelineConfig(name=str(raw.get("name", path.stem)), out=str(run_dir), **configs)


def _resolve_out(value, base: Path, path: Path) -> Path:
    if not value:
        raise UserError(f'{path} sets no out folder; add out = "..." to it or pass --out')
    return (base / value).resolve()


def run(config: PipelineConfig) -> PipelineResult:
    """embed-teacher -> train-student -> eval-retrieval into config.out, skipping what is already complete."""
    import time

    start = time.perf_counter()
    out = Path(config.out)
    with writing(out, "rerun the same command"):  # as each verb alone: one line, not a traceback
        out.mkdir(parents=True, exist_ok=True)
        outputs.write_json(out / "pipeline.json", {"name": config.name, **to_dict(config)})
    stages = {}
    say = (lambda text: print(text, file=sys.stderr)) if config.embed.progress else (lambda text: None)
    eval_dir = Path(config.eval.out)
    with distributed.group(config.embed.device) as (ctx, _):  # under torchrun one process group serves all three stages
        say(f"[1/3] embed-teacher -> {config.embed.out}")
        stages["embed"] = "skipped" if embed_teacher.is_complete(config.embed) else "ran"
        embed_teacher.run(config.embed)  # a complete cache made with the same arguments returns at once

        say(f"[2/3] train-student -> {config.train.out}")
        stages["train"] = "skipped" if train_student.is_complete(config.train) else "ran"
        train_student.run(
            dataclasses.replace(config.train, resume=True)
        )  # one command starts, resumes or finds the run done

        say(f"[3/3] eval-retrieval -> {config.eval.out}")
        if (
            not ctx.is_main
        ):  # stage 3 is one process: rank 0 scores; the others end here (a wait could pass NCCL's timeout)
            return PipelineResult(out, {**stages, "eval": "rank 0"}, {}, time.perf_counter() - start)
        if eval_retrieval.is_complete(config.eval):
            stages["eval"] = "skipped"
            print((eval_dir / "report.md").read_text(encoding="utf-8") if config.eval.progress else "", end="")
        else:
            stages["eval"] = "ran"
            eval_retrieval.run(dataclasses.replace(config.eval, overwrite=True))
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    result = PipelineResult(out, stages, metrics, time.perf_counter() - start)
    print(summary_table(config, metrics))
    say(
        f"mclip run: {config.name} done in {result.seconds:.0f}s ({', '.join(f'{k} {v}' for k, v in stages.items())}); "
        f"metrics in {eval_dir / 'metrics.json'}"
    )
    return result


def interrupted(config: PipelineConfig) -> tuple[str, str | None]:
    """What an interrupted pipeline left in its folder, stage by stage; the same command continues it."""
    kept = [
        "cache complete" if embed_teacher.is_complete(config.embed) else embed_teacher.interrupted(config.embed)[0],
        "training finished" if train_student.is_complete(config.train) else train_student.interrupted(config.train)[0],
    ]
    return "; ".join(kept), None


def summary_table(config: PipelineConfig, metrics: dict) -> str:
    """The table that makes the point: student(xx) -> teacher(en) beside the teacher used directly on xx text."""
    languages = [lang for lang in config.eval.languages if lang != "en"]
    ks = [k for k in (1, 5) if k in config.eval.ks] or list(config.eval.ks[:2])
    head = (
        "| lang | " + " | ".join(f"student R@{k}" for k in ks) + " | " + " | ".join(f"teacher R@{k}" for k in ks) + " |"
    )
    lines = [
        f"{config.name}: retrieval of the English caption (teacher space) from a caption in another language",
        "",
        head,
        "|" + "---|" * (1 + 2 * len(ks)),
    ]

    def cell(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    for lang in languages + ["avg"]:
        student = [cell(f"{lang}/text_to_text/R@{k}") for k in ks]
        teacher = [cell(f"{lang}/teacher_baseline/text_to_text/R@{k}") for k in ks]
        label = "**avg (non-English)**" if lang == "avg" else lang
        lines.append(f"| {label} | " + " | ".join(student) + " | " + " | ".join(teacher) + " |")
    english = [cell(f"en/text_to_text/R@{k}") for k in ks]
    lines.append("| en (no-forgetting check) | " + " | ".join(english) + " | " + " | ".join("-" for _ in ks) + " |")
    return "\n".join(lines)
