"""Do no harm out of domain (issue #12): a student beside its teacher used directly, per language, on data/ood/.

    python tests/bench/eval_ood.py runs/demo/train/final                  # every data/ood/*.jsonl, work files in a temp folder
    python tests/bench/eval_ood.py runs/demo/train/final --out /tmp/ood   # keep each file's cache/ and eval/ (report.md)

data/ood/ holds human-translated text that the demo's training (data/emoji) never saw: CLDR language and unit names in
all 14 languages and Debian package descriptions in 10 (data/README.md). For each file, stage 1 embeds its English with
the teacher (the one the student records in mclip.json, else --teacher), and stage 3 scores student(xx) -> teacher(en)
retrieval beside the teacher applied directly to the same xx text. It prints R@1 and R@5 of both per language and whether
the student is at least as good as the teacher on R@1 in every language and better on average; the last printed line is
the JSON result. The exit code is 0 either way (1 with --strict when the check fails).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common  # tests/bench is the script's folder; also puts this checkout first on sys.path

OOD = common.ROOT / "data" / "ood"
KS = (1, 5, 10)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="exported student folder (a run's train/final), a checkpoint or a run folder")
    p.add_argument(
        "--out", type=Path, help="keep the work files here: <file>/cache and <file>/eval (default: a temp folder)"
    )
    p.add_argument(
        "--data", nargs="+", type=Path, help="OOD files in the wide parallel format (default: data/ood/*.jsonl)"
    )
    p.add_argument(
        "--teacher", help="teacher for stage 1 and the baseline (default: the one the model records in mclip.json)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, help="score only the first N captions per language (smoke runs)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the student is below the teacher somewhere")
    p.add_argument("--progress", action="store_true", help="show the stages' progress bars and tables")
    return p.parse_args(argv)


def languages_of(path: Path) -> tuple[str, ...]:
    """The caption_<lang> columns of a wide file, in file order (every row carries every column, None where missing)."""
    with path.open(encoding="utf-8") as f:
        first = json.loads(f.readline())
    return tuple(key[len("caption_") :] for key in first if key.startswith("caption_"))


def model_teacher(model: str) -> str | None:
    from mclip.models.student import model_folder
    from mclip.store.outputs import META

    meta = json.loads((model_folder(model) / META).read_text(encoding="utf-8"))
    return (meta.get("teacher") or {}).get("name")


def score_file(path: Path, model: str, teacher: str, work: Path, args) -> dict:
    """Stage 1 on the file's English, stage 3 with the teacher baseline; per language R@1/R@5 of student and teacher."""
    from mclip.config import EmbedConfig, EvalConfig
    from mclip.embed import run as embed_teacher
    from mclip.evaluate import run as eval_retrieval

    languages = languages_of(path)
    cache = work / "cache"
    embed_teacher.run(
        EmbedConfig(
            data=str(path),
            teacher=teacher,
            id_column="id",
            caption_column="caption",
            dtype="float32",
            out=str(cache),
            device=args.device,
            progress=args.progress,
        )
    )
    result = eval_retrieval.run(
        EvalConfig(
            model=model,
            cache=str(cache),
            data=str(path),
            split="train",
            languages=languages,
            teacher_baseline=True,
            teacher=teacher,
            ks=KS,
            out=str(work / "eval"),
            device=args.device,
            limit=args.limit,
            overwrite=True,
            progress=args.progress,
        )
    )
    m = result.metrics
    per_lang = {}
    for lang in languages:
        if f"{lang}/text_to_text/R@1" not in m:  # every caption of the language was empty: eval left it out
            continue
        per_lang[lang] = {
            "captions": result.counts[lang]["captions"],
            **{
                f"{system}_r{k}": round(m[f"{lang}/{key}text_to_text/R@{k}"], 4)
                for system, key in (("student", ""), ("teacher", "teacher_baseline/"))
                for k in (1, 5)
            },
        }
    avg = {
        f"{system}_r{k}": round(m[f"avg/{key}text_to_text/R@{k}"], 4)
        for system, key in (("student", ""), ("teacher", "teacher_baseline/"))
        for k in (1, 5)
    }
    worse = [lang for lang, v in per_lang.items() if v["student_r1"] < v["teacher_r1"]]
    return {
        "rows": result.counts["en"]["captions"],
        "languages": per_lang,
        "avg": avg,
        "en_student_r1": round(m["en/text_to_text/R@1"], 4),  # the student on English: the no-forgetting check
        "student_ge_teacher_every_language": not worse,
        "below_teacher": worse,
        "student_better_on_average": avg["student_r1"] > avg["teacher_r1"],
        "warnings": result.warnings,
    }


def table(name: str, scored: dict) -> list[str]:
    pct = lambda v: f"{100 * v:5.1f}"  # noqa: E731
    lines = [
        f"{name}: {scored['rows']} English targets; R@1 and R@5 (%) of student(xx) -> teacher(en), "
        "beside the teacher applied to the xx text",
        f"  {'lang':<5}{'captions':>9}  {'student R@1':>11}{'teacher R@1':>12}{'delta':>7}  {'student R@5':>11}{'teacher R@5':>12}  ok",
    ]
    for lang, v in scored["languages"].items():
        delta = 100 * (v["student_r1"] - v["teacher_r1"])
        lines.append(
            f"  {lang:<5}{v['captions']:>9}  {pct(v['student_r1']):>11}{pct(v['teacher_r1']):>12}{delta:>+7.1f}  "
            f"{pct(v['student_r5']):>11}{pct(v['teacher_r5']):>12}  {'yes' if v['student_r1'] >= v['teacher_r1'] else 'NO'}"
        )
    a = scored["avg"]
    lines.append(
        f"  {'avg':<5}{'':>9}  {pct(a['student_r1']):>11}{pct(a['teacher_r1']):>12}"
        f"{100 * (a['student_r1'] - a['teacher_r1']):>+7.1f}  {pct(a['student_r5']):>11}{pct(a['teacher_r5']):>12}  "
        f"{'yes' if scored['student_better_on_average'] else 'NO'}"
    )
    lines.append(f"  {'en':<5}{scored['rows']:>9}  {pct(scored['en_student_r1']):>11}{'(cache)':>12}")
    below = ", ".join(scored["below_teacher"]) or "none"
    lines.append(
        f"  student >= teacher in every language: {'yes' if scored['student_ge_teacher_every_language'] else 'NO'} "
        f"(below: {below}); better on average: {'yes' if scored['student_better_on_average'] else 'NO'}"
    )
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    files = args.data or sorted(OOD.glob("*.jsonl"))
    if not files:
        sys.exit(f"eval_ood: no OOD files in {OOD}; run python data/build_ood.py")
    teacher = args.teacher or model_teacher(args.model)
    if not teacher:
        sys.exit(f"eval_ood: {args.model} records no teacher in mclip.json; pass --teacher")
    with tempfile.TemporaryDirectory(prefix="mclip-ood-") as tmp:
        root = args.out or Path(tmp)
        scored = {path.name: score_file(path, args.model, teacher, root / path.stem, args) for path in files}
    ok = all(s["student_ge_teacher_every_language"] and s["student_better_on_average"] for s in scored.values())
    summary = [f"eval_ood: {args.model} (teacher {teacher})", ""]
    for name, s in scored.items():
        summary += table(name, s) + [""]
    summary.append(
        f"do no harm out of domain: {'PASS' if ok else 'FAIL'} (R@1: student >= teacher in every language of "
        "every file, and better on average)"
    )
    common.emit(summary, {"model": str(args.model), "teacher": teacher, "pass": ok, "files": scored})
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
