"""Stage 3: score a student per language by FAISS retrieval against the cached teacher (and images), beside baselines.

Text -> text: the student's language-X captions search the teacher's cached English embeddings of the same ids (and the
reverse, teacher English -> student X). Text <-> image when the cache holds image embeddings. Writes metrics.json,
report.md, r_at_1.png and eval.json to --out and prints the table.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mclip import distributed
from mclip.config import EvalConfig, to_dict
from mclip.distributed import resolve_precision
from mclip.errors import UserError, writing
from mclip.evaluate import captions, gallery
from mclip.evaluate.gallery import BASELINE
from mclip.evaluate.metrics import make_index
from mclip.models.student import load, model_folder
from mclip.models.teacher import load_teacher
from mclip.store import join, outputs, shards
from mclip.store.outputs import META

OUTPUTS = ("metrics.json", "report.md", "r_at_1.png", "eval.json")
SCRATCH = ".scratch"  # the run's work folder inside --out
DIRECTIONS = ("text_to_text", "text_to_text_reverse", "text_to_image", "image_to_text")
RERUN = "rerun the same command with --overwrite"  # after a failed write
TIE_RULE = "ties count against the query: rank = 1 + non-relevant items scoring >= the best relevant one"


@dataclass
class EvalResult:
    out: Path
    metrics: dict[str, float]  # "de/text_to_text/R@1" -> 0.93, "avg/...", "de/teacher_baseline/..."
    rows: list[dict]  # the report table: lang, system, direction, queries, gallery and the metrics
    counts: dict[str, dict]  # lang -> captions scored, ids missing from the cache, empty captions, images
    warnings: list[str]
    seconds: float


def _warn(warnings: list[str], message: str) -> None:
    warnings.append(message)
    print(f"mclip: warning: {message}", file=sys.stderr)


def _check_pair(meta: dict, folder: Path, cache: shards.TeacherCache, warnings: list[str]) -> None:
    """Refuse a cache the model cannot be scored against: other dimension, or another teacher's embeddings."""
    if int(meta["dim"]) != cache.dim:
        raise UserError(
            f"model {folder} makes {meta['dim']}-d embeddings but cache {cache.path} holds {cache.dim}-d ones; "
            "pass the cache of the teacher the model was distilled from"
        )
    theirs = cache.manifest.get("teacher") or {}
    ours = meta.get("teacher") or {}
    if not ours.get("fingerprint"):
        _warn(
            warnings,
            f"model {folder} records no teacher (no 'teacher' in mclip.json), so it cannot be checked against "
            f"{theirs.get('name')!r}, the teacher of {cache.path}; scores are meaningless if they differ",
        )
    elif ours["fingerprint"] != theirs.get("fingerprint"):
        hint = " (same name, other weights)" if ours.get("name") == theirs.get("name") else ""
        raise UserError(
            f"cache {cache.path} was made by teacher {theirs.get('name')!r} ({str(theirs.get('fingerprint'))[:12]}) but "
            f"model {folder} was distilled from {ours.get('name')!r} ({ours['fingerprint'][:12]}){hint}; "
            "pass the cache made by the model's teacher"
        )


def is_complete(config: EvalConfig) -> bool:
    """Whether --out holds the report of this very evaluation: made with the same settings (but the runtime ones) and
    written after the model was, so a retrained model is scored again."""

    out, meta = Path(config.out), Path(config.model) / META
    if not all(path.exists() for path in (out / "metrics.json", out / "eval.json", meta)):
        return False
    saved = json.loads((out / "eval.json").read_text(encoding="utf-8")).get("config", {})
    return not outputs.changed(saved, config) and (out / "metrics.json").stat().st_mtime >= meta.stat().st_mtime


def interrupted(config: EvalConfig) -> tuple[str, str | None]:
    """What an interrupted run left in --out (the report is written at the end), and the flag that continues it."""
    written = [name for name in OUTPUTS if (Path(config.out) / name).exists()]
    if written:
        return f"{', '.join(written)} in {config.out} incomplete", "--overwrite"
    return "no report written yet (it is written at the end)", None


@contextlib.contextmanager
def _scratch(out: Path):
    """out/.scratch for the run's on-disk arrays (tens of GB at laion28m: on the disk the user chose for --out, not in
    $TMPDIR), removed when the run ends, failed or not, with --out itself if the run created it and left it empty."""
    made = not out.exists()
    work = out / SCRATCH
    shutil.rmtree(work, ignore_errors=True)  # a killed run's
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def run(config: EvalConfig) -> EvalResult:
    """Score the student per language (and its teacher baseline) and write the report files to --out."""
    start = time.perf_counter()
    with outputs.hold(config.out, "eval-retrieval"):
        return _run(config, start)


def _run(config: EvalConfig, start: float) -> EvalResult:
    out = Path(config.out)
    outputs.check(out, config.overwrite, owned=lambda name: name in (*OUTPUTS, SCRATCH), command="eval-retrieval")
    warnings: list[str] = []

    folder = model_folder(config.model)

    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    cache = shards.open_cache(config.cache)
    _check_pair(meta, folder, cache, warnings)
    if config.images and not cache.has_images:
        raise UserError(
            f"--images asks for text<->image metrics but cache {cache.path} holds no image embeddings; "
            "rebuild it with `mclip embed-teacher --image-column ...` or drop --images"
        )
    use_images = cache.has_images if config.images is None else config.images
    make_index(config.index, cache.dim)  # a factory string FAISS rejects fails now, before any encoding

    languages = [code for code in config.languages if code != "en"] + ["en"]
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    counts: dict[str, dict] = {}
    with _scratch(out) as work:  # the id index and every per-caption array: on disk
        id_index = join.IdIndex.build(cache, work / "ids")
        joined, notes = captions.join(config, cache, id_index, languages, work)
        del id_index
        for note in notes:
            _warn(warnings, note)

        device = distributed.resolve_device(config.device)
        model = load(folder, device=device, trust_remote_code=config.trust_remote_code)
        teacher = _load_baseline_teacher(config, cache, device, warnings) if config.teacher_baseline else None
        values = {
            column: gallery.cache_values(cache, column, work / f"cache.{column}")
            for column in ("text", "image_id")[: 2 if use_images else 1]
        }
        for lang, part in joined.items():
            scored, counts[lang] = gallery.score(part, lang, cache, model, teacher, values, config, work)
            for system, directions in scored.items():
                for direction, (found, n_queries, n_gallery) in directions.items():
                    rows.append(
                        {
                            "lang": lang,
                            "system": system,
                            "direction": direction,
                            "queries": n_queries,
                            "gallery": n_gallery,
                            **found,
                        }
                    )
                    prefix = f"{lang}/{direction}" if system == "student" else f"{lang}/{system}/{direction}"
                    metrics.update({f"{prefix}/{name}": value for name, value in found.items()})
        del joined, values  # their files (read by pread, open until then) go with the folder
    rows += _averages(rows, [code for code in counts if code != "en"], metrics)
    rows.sort(
        key=lambda r: (_lang_order(r["lang"], languages), DIRECTIONS.index(r["direction"]), r["system"] != "student")
    )
    seconds = time.perf_counter() - start
    result = EvalResult(out, metrics, rows, counts, warnings, seconds)
    _write(result, config, folder, meta, cache)
    _print_table(result, config)
    return result


def _lang_order(lang: str, languages: list[str]) -> int:
    order = [code for code in languages if code != "en"] + ["avg", "en"]
    return order.index(lang)


def _load_baseline_teacher(config: EvalConfig, cache: shards.TeacherCache, device, warnings: list[str]):
    """The teacher that made the cache, checked by its weight fingerprint, to embed each language's text directly."""

    record = cache.manifest.get("teacher") or {}
    name = config.teacher or record.get("name")
    if not name:
        raise UserError(f"cache {cache.path} names no teacher; pass --teacher for --teacher-baseline")
    teacher = load_teacher(
        name,
        device=str(device),
        precision=resolve_precision("auto", device),
        need_images=cache.has_images and record.get("kind") == "clip",
        max_length=record.get("max_length"),
        trust_remote_code=config.trust_remote_code,
    )
    if record.get("fingerprint") and teacher.info().fingerprint != record["fingerprint"]:
        raise UserError(
            f"teacher {name!r} has other weights than the one that made cache {cache.path}; "
            "pass --teacher with the exact teacher the cache was built with"
        )
    return teacher


def _averages(rows: list[dict], languages: list[str], metrics: dict[str, float]) -> list[dict]:
    """Mean over the non-English languages of every (system, direction) all of them have: rows and avg/... keys."""
    out = []
    if not languages:
        return out
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["lang"] in languages:
            groups.setdefault((row["system"], row["direction"]), []).append(row)
    for (system, direction), members in groups.items():
        if len(members) != len(languages):
            continue
        names = [k for k in members[0] if k.startswith(("R@", "MRR@"))]
        values = {name: float(np.mean([m[name] for m in members])) for name in names}
        out.append(
            {"lang": "avg", "system": system, "direction": direction, "queries": None, "gallery": None, **values}
        )
        prefix = f"avg/{direction}" if system == "student" else f"avg/{system}/{direction}"
        metrics.update({f"{prefix}/{name}": value for name, value in values.items()})
    return out


def _metric_names(config: EvalConfig) -> list[str]:
    return [f"R@{k}" for k in config.ks] + [f"MRR@{max(config.ks)}"]


def _system_label(system: str) -> str:
    return "student" if system == "student" else "teacher"


def _task(lang: str, direction: str) -> str:
    """A compact label for a table cell: de→en, en→de, de→img, img→de."""
    xx = "xx" if lang == "avg" else lang
    return {
        "text_to_text": f"{xx}→en",
        "text_to_text_reverse": "en→en (rev)" if xx == "en" else f"en→{xx}",
        "text_to_image": f"{xx}→img",
        "image_to_text": f"img→{xx}",
    }[direction]


def _markdown(result: EvalResult, config: EvalConfig, folder: Path, cache: shards.TeacherCache) -> str:
    names = _metric_names(config)
    teacher = (cache.manifest.get("teacher") or {}).get("name")
    lines = [
        "# Retrieval report",
        "",
        f"- model: `{folder}`",
        f"- cache: `{cache.path}` (teacher `{teacher}`, dim {cache.dim}{', with images' if 'images' in next(iter(result.counts.values())) else ''})",
        f"- data: `{config.data}` split `{config.split}`; index `{config.index}`; cosine similarity (L2-normalised, inner product)",
        "- captions scored: "
        + ", ".join(
            f"{lang} {c['captions']:,}"
            + (f" ({c['missing_ids']:,} ids not in the cache)" if c["missing_ids"] else "")
            + (f", {c['images']:,} images" if "images" in c else "")
            for lang, c in result.counts.items()
        ),
        f"- {TIE_RULE}; identical English captions count as one target; avg = mean over the non-English languages",
        "- xx→en (text_to_text): the model's xx captions search the teacher's English ones; en→xx (text_to_text_reverse) the other way; "
        "xx→img / img→xx: captions and images (an image hits any of its captions); "
        "teacher: the teacher applied directly to the xx text (what English CLIP gives); for en with images, the cached teacher itself",
        "",
    ]
    lines.append("| lang | model | task | key | queries | gallery | " + " | ".join(f"{n} (%)" for n in names) + " |")
    lines.append("|---|---|---|---|---:|---:|" + "---:|" * len(names))
    for row in result.rows:
        size = lambda v: "" if v is None else f"{v:,}"  # noqa: E731
        key = row["direction"] if row["system"] == "student" else f"{row['system']}/{row['direction']}"
        lines.append(
            f"| {row['lang']} | {_system_label(row['system'])} | {_task(row['lang'], row['direction'])} | {key} | "
            f"{size(row['queries'])} | {size(row['gallery'])} | "
            + " | ".join(f"{100 * row[n]:.1f}" for n in names)
            + " |"
        )
    if result.warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def _chart(result: EvalResult, languages: list[str]) -> bytes:
    """PNG: R@1 per language, student beside the teacher baseline, one panel per query direction scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [d for d in ("text_to_text", "text_to_image") if any(r["direction"] == d for r in result.rows)]
    order = [code for code in languages if code != "en" and code in result.counts] + ["avg", "en"]
    systems = [s for s in ("student", BASELINE) if any(r["system"] == s for r in result.rows)]
    value = {(r["lang"], r["system"], r["direction"]): r["R@1"] for r in result.rows}
    fig = Figure(figsize=(max(4.0, 0.9 * len(order) + 1.5) * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    width = 0.8 / len(systems)
    titles = {
        "text_to_text": "caption → teacher's English caption (xx→en)",
        "text_to_image": "caption → image (xx→img)",
    }
    labels = {"student": "student", BASELINE: "teacher applied to the xx text"}
    for ax, direction in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        x = np.arange(len(order))
        for j, system in enumerate(systems):
            heights = [value.get((lang, system, direction), np.nan) for lang in order]
            ax.bar(x + (j - (len(systems) - 1) / 2) * width, np.nan_to_num(heights), width, label=labels[system])
        ax.set_xticks(x, order)
        ax.set_ylim(0, 1)
        ax.set_ylabel("R@1")
        ax.set_title(titles[direction], fontsize="medium")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(systems), fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _write(result: EvalResult, config: EvalConfig, folder: Path, meta: dict, cache: shards.TeacherCache) -> None:
    """Each file whole or absent (atomic writes); a failed one is named with what to do."""
    payloads = {
        "metrics.json": lambda: json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n",
        "report.md": lambda: _markdown(result, config, folder, cache),
        "r_at_1.png": lambda: _chart(result, list(config.languages)),
        "eval.json": lambda: (
            json.dumps(
                {
                    "config": to_dict(config),
                    "model": str(folder),
                    "model_teacher": meta.get("teacher"),
                    "cache": {
                        "path": str(cache.path),
                        "teacher": cache.manifest.get("teacher"),
                        "dim": cache.dim,
                        "images": cache.has_images,
                    },
                    "counts": result.counts,
                    "rows": result.rows,
                    "warnings": result.warnings,
                    "tie_rule": TIE_RULE,
                    "seconds": round(result.seconds, 3),
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n"
        ),
    }
    assert tuple(payloads) == OUTPUTS, f"{tuple(payloads)} != {OUTPUTS}"
    outputs.claim(result.out, (), RERUN)
    for name, payload in payloads.items():
        data = payload()
        with writing(result.out / name, RERUN):
            outputs.atomic_write_bytes(result.out / name, data.encode("utf-8") if isinstance(data, str) else data)


def _print_table(result: EvalResult, config: EvalConfig) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    names = _metric_names(config)
    table = Table(title=f"eval-retrieval -> {result.out} (%)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("lang", "model", "task", "queries", "gallery", *names):
        table.add_column(column, justify="left" if column in ("lang", "model", "task") else "right", no_wrap=True)
    for row in result.rows:
        table.add_row(
            row["lang"],
            _system_label(row["system"]),
            _task(row["lang"], row["direction"]),
            "" if row["queries"] is None else f"{row['queries']:,}",
            "" if row["gallery"] is None else f"{row['gallery']:,}",
            *(f"{100 * row[n]:.1f}" for n in names),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a pipe or file gets the whole table, not a wrapped 80-column one
    console.print(table)
