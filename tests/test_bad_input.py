"""The bad-input catalogue: every mistake below, through `mclip.cli.main` in-process, is one `mclip: error:` line naming the
problem and the fix, exit code 2, no traceback (unless --debug), and whatever the output folder held before is untouched."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mclip.cli import main
from mclip.config import EmbedConfig, EvalConfig
from mclip.embed.run import run as embed
from mclip.errors import UserError
from mclip.evaluate.run import run as evaluate
from mclip.store import shards
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["a cat sitting on a red sofa"] * 12)  # over CLIP's 77 tokens


@pytest.fixture(scope="module")
def fx(small_run, clip_text_teacher, tmp_path_factory):
    """Inputs for every case (built once, never changed) and finished outputs to place at --out before a case."""
    root = tmp_path_factory.mktemp("bad_input")
    rows = small_run["rows"]
    files = {
        "strict_empty": [{"id": "a", "caption": "red apple"}, {"id": "b", "caption": "  "}],
        "strict_none": [{"id": "a", "caption": "red apple"}, {"id": "b", "caption": None}],
        "duplicate_ids": [
            {"id": "a", "caption": "red apple"},
            {"id": "b", "caption": "green tree"},
            {"id": "a", "caption": "blue car"},
        ],
        "images": [{"id": "a", "caption": "red apple", "image": "apple.png"}],
        "other_ids": [{**r, "id": "x" + r["id"]} for r in rows],
        "long": [{"id": r["id"], "lang": lang, "text": r[f"caption_{lang}"]} for r in rows for lang in ("de", "zh")],
    }
    paths = {name: tiny.write_captions(root / f"{name}.jsonl", data) for name, data in files.items()}
    paths["empty"] = root / "empty.jsonl"
    paths["empty"].write_bytes(b"")
    paths["latin1"] = root / "latin1.jsonl"
    paths["latin1"].write_bytes('{"caption": "ok"}\n{"caption": "crème brûlée"}\n'.encode("latin-1"))
    paths["latin1_txt"] = root / "latin1.txt"
    paths["latin1_txt"].write_bytes(b"ein Hund\n" + "café crème\n".encode("latin-1"))
    paths["texts"] = root / "texts.txt"
    paths["texts"].write_text("ein Hund\n一只狗\n", encoding="utf-8")
    gpt2 = tiny.write_tiny_gpt2(root / "gpt2")
    other_teacher = tiny.write_tiny_bert(root / "other_teacher", hidden=24, seed=7)
    for name, teacher in (
        ("cache16", clip_text_teacher),
        ("cache_other", other_teacher),
    ):  # 16-d; 24-d from other weights
        embed(
            EmbedConfig(
                data=str(small_run["data"]), out=str(root / name), teacher=str(teacher), id_column="id", progress=False
            )
        )
    outputs = {
        "cache": small_run["cache"],
        "run": small_run["run"],
        "eval": root / "eval",
        "encode": root / "encode",
        "foreign": root / "foreign",
    }
    evaluate(
        EvalConfig(
            model=str(small_run["run"]),
            cache=str(small_run["cache"]),
            data=str(small_run["data"]),
            out=str(root / "eval"),
            languages=("de",),
            split="train",
            progress=False,
        )
    )
    main(
        [
            "encode",
            "--model",
            str(small_run["run"]),
            "--input",
            str(paths["texts"]),
            "--out",
            str(root / "encode"),
            "--no-progress",
        ]
    )
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("mine", encoding="utf-8")
    return {
        **small_run,
        **paths,
        "gpt2": gpt2,
        "cache16": root / "cache16",
        "cache_other": root / "cache_other",
        "outputs": outputs,
    }


def embed_(fx, out, *extra, data=None, teacher=None):
    return [
        "embed-teacher",
        "--data",
        str(data or fx["data"]),
        "--teacher",
        str(teacher or fx["teacher"]),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def train(fx, out, *extra, **swap):
    args = list(fx["train_args"])
    for option, value in swap.items():
        args[args.index(f"--{option}") + 1] = str(value)
    return ["train-student", *args, "--out", str(out), *extra]


def eval_(fx, out, *extra, data=None, cache=None, languages="de"):
    return [
        "eval-retrieval",
        "--model",
        str(fx["run"]),
        "--cache",
        str(cache or fx["cache"]),
        "--data",
        str(data or fx["data"]),
        "--languages",
        languages,
        "--split",
        "train",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def encode_(fx, out, *extra):
    return ["encode", "--model", str(fx["run"]), "--out", str(out), "--no-progress", *extra]


# (case, argv builder, what the line must say, the finished output placed at --out first)
CASES = [
    (
        "missing column lists the existing ones",
        lambda f, o: embed_(f, o, "--caption-column", "text", "--overwrite"),
        ["column 'text' not found", "it has id, caption, caption_de, caption_zh", "(use --caption-column)"],
        "cache",
    ),
    (
        "empty caption with --strict",
        lambda f, o: embed_(f, o, "--strict", "--id-column", "id", "--overwrite", data=f["strict_empty"]),
        ["caption of id 'b' (row 1) is empty", "drop --strict"],
        "cache",
    ),
    (
        "None caption with --strict",
        lambda f, o: embed_(f, o, "--strict", "--id-column", "id", "--overwrite", data=f["strict_none"]),
        ["caption of id 'b' (row 1) is empty", "fill it"],
        "cache",
    ),
    (
        "non-UTF-8 captions",
        lambda f, o: embed_(f, o, "--overwrite", data=f["latin1"]),
        ["is not valid UTF-8 text", "re-encode the file as UTF-8"],
        "cache",
    ),
    (
        "non-UTF-8 text file to encode",
        lambda f, o: encode_(f, o, "--input", f["latin1_txt"], "--overwrite"),
        ["latin1.txt line 2 is not UTF-8", "iconv"],
        "encode",
    ),
    (
        "zero rows",
        lambda f, o: embed_(f, o, "--overwrite", data=f["empty"]),
        ["is empty (zero rows); check --data"],
        "cache",
    ),
    (
        "duplicate ids",
        lambda f, o: embed_(f, o, "--id-column", "id", "--overwrite", data=f["duplicate_ids"]),
        ["id 'a' appears more than once in column 'id'", "ids must be unique"],
        "cache",
    ),
    (
        "teacher neither CLIP nor an encoder",
        lambda f, o: embed_(f, o, "--overwrite", teacher=f["gpt2"]),
        ["is a gpt2 model, neither CLIP nor a text encoder", "use a CLIP checkpoint or an encoder"],
        "cache",
    ),
    (
        "image column with a non-CLIP teacher",
        lambda f, o: embed_(f, o, "--image-column", "image", "--overwrite", data=f["images"]),
        ["--image-column needs a full CLIP teacher", "is a bert model", "drop --image-column"],
        "cache",
    ),
    (
        "cache made with other arguments",
        lambda f, o: embed_(f, o, "--id-column", "id", "--dtype", "float16"),
        ["holds a cache made with other arguments (", "dtype: 'float32' -> 'float16'", "pass --overwrite"],
        "cache",
    ),
    (
        "non-empty folder without --overwrite (embed)",
        lambda f, o: embed_(f, o),
        ["is not empty and holds no mclip cache", "pass --overwrite"],
        "foreign",
    ),
    (
        "cache/student dimension mismatch",
        lambda f, o: train(f, o, "--overwrite", cache=f["cache16"], student=f["run"] / "final"),
        ["projects to 24 dims but cache", "holds 16-dim targets", "use the cache it was trained on"],
        "run",
    ),
    (
        "resumed run, cache from another teacher",
        lambda f, o: train(f, o, "--resume", cache=f["cache_other"]),
        ["was made by teacher", "but this run trained on", "point --cache at the original cache"],
        "run",
    ),
    (
        "language column missing (train)",
        lambda f, o: train(f, o, "--overwrite", languages="de,fr"),
        ["column 'caption_fr' for language 'fr' not found", "fix --languages or --text-column-template"],
        "run",
    ),
    (
        "empty join (train)",
        lambda f, o: train(f, o, "--overwrite", data=f["other_ids"]),
        ["no caption id in", "matches an id in the cache", "build the cache from the same rows"],
        "run",
    ),
    ("negative lr", lambda f, o: train(f, o, "--overwrite", "--lr", "-1e-3"), ["lr=-0.001 must be > 0"], "run"),
    ("batch 0", lambda f, o: train(f, o, "--overwrite", **{"batch-size": 0}), ["batch_size=0 must be >= 1"], "run"),
    (
        "unknown loss",
        lambda f, o: train(f, o, "--overwrite", "--loss", "kl"),
        ["loss='kl' is not valid; choose one of mse, cosine, cl"],
        "run",
    ),
    (
        "alpha outside [0, 1]",
        lambda f, o: train(f, o, "--overwrite", "--alpha", "1.5"),
        ["alpha=1.5 must be in [0, 1]"],
        "run",
    ),
    (
        "unknown extend_vocab_init",
        lambda f, o: train(f, o, "--overwrite", "--extend-vocab-init", "zeros"),
        ["extend_vocab_init='zeros' is not valid; choose one of mean, aligned"],
        "run",
    ),
    (
        "non-empty run folder without --resume/--overwrite",
        lambda f, o: train(f, o),
        ["is not empty; pass --resume to continue the run in it, --overwrite to replace it"],
        "run",
    ),
    (
        "model/cache dimension mismatch (eval)",
        lambda f, o: eval_(f, o, "--overwrite", cache=f["cache16"]),
        [
            "makes 24-d embeddings but cache",
            "holds 16-d ones",
            "pass the cache of the teacher the model was distilled from",
        ],
        "eval",
    ),
    (
        "evaluated model from another teacher than the cache",
        lambda f, o: eval_(f, o, "--overwrite", cache=f["cache_other"]),
        ["was made by teacher", "but model", "pass the cache made by the model's teacher"],
        "eval",
    ),
    (
        "language column missing (eval)",
        lambda f, o: eval_(f, o, "--overwrite", languages="de,fr"),
        ["column 'caption_fr' for language 'fr' not found"],
        "eval",
    ),
    (
        "language missing from a long-format language column",
        lambda f, o: eval_(f, o, "--overwrite", data=f["long"], languages="ja"),
        ["language 'ja' has no rows", "column 'lang' has de, zh", "fix --languages"],
        "eval",
    ),
    (
        "empty join (eval)",
        lambda f, o: eval_(f, o, "--overwrite", data=f["other_ids"]),
        ["none of the ids in", "are in cache", "pass the cache built from this data"],
        "eval",
    ),
    (
        "FAISS factory string FAISS rejects",
        lambda f, o: eval_(f, o, "--overwrite", "--index", "IVF4,Nonsense"),
        ["FAISS rejects index 'IVF4,Nonsense'"],
        "eval",
    ),
    (
        "non-empty folder without --overwrite (eval)",
        lambda f, o: eval_(f, o),
        ["is not empty; choose an empty folder, or pass --overwrite"],
        "eval",
    ),
    (
        "non-empty folder without --overwrite (encode)",
        lambda f, o: encode_(f, o, "--input", f["texts"]),
        ["is not empty; choose an empty folder, or pass --overwrite"],
        "encode",
    ),
    (
        "encode: missing column",
        lambda f, o: encode_(f, o, "--data", f["data"], "--column", "text", "--overwrite"),
        ["column 'text' not found", "(use --column)"],
        "encode",
    ),
    ("verify: not an mclip folder", lambda f, o: ["verify", str(f["root"])], ["is not an mclip folder"], None),
]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case, argv, expected, previous", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(case, argv, expected, previous, fx, tmp_path, capsys):
    out = tmp_path / "out"
    if previous is not None:
        shutil.copytree(fx["outputs"][previous], out)
    before = snapshot(tmp_path)
    inputs = snapshot(fx["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv(fx, out))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mclip: error: ") and "Traceback" not in err, err
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert snapshot(tmp_path) == before  # a previous output untouched, and no new folder when there was none
    assert snapshot(fx["root"]) == inputs


def test_the_catalogue_covers_every_verb_and_at_least_15_mistakes():
    verbs = {argv(_Fake(), Path("o"))[0] for _, argv, _, _ in CASES}
    assert verbs == {"embed-teacher", "train-student", "eval-retrieval", "encode", "verify"} and len(CASES) >= 15


class _Fake(dict):
    """Any fixture key, to read a case's verb without building its inputs."""

    def __missing__(self, key):
        return (
            Path(key)
            if key != "train_args"
            else ["--data", "d", "--cache", "c", "--student", "s", "--languages", "de", "--batch-size", "1"]
        )


def test_captions_over_the_teacher_limit_are_truncated_and_counted(clip_text_teacher, tmp_path, capsys):
    data = tiny.write_captions(
        tmp_path / "rows.jsonl", [{"caption": t} for t in ["red apple", LONG, "green tree", LONG + " again"]]
    )
    capsys.readouterr()
    main(["embed-teacher", "--data", str(data), "--out", str(tmp_path / "out"), "--teacher", str(clip_text_teacher)])
    err = capsys.readouterr().err
    assert "mclip: error" not in err and "truncated 2 over 77 tokens" in err
    cache = shards.open_cache(tmp_path / "out")
    assert len(cache) == 4 and cache.manifest["totals"]["truncated"] == 2


def test_debug_shows_the_traceback(fx, tmp_path, capsys):
    with pytest.raises(UserError, match="alpha=1.5 must be in"):  # in-process: raised, not turned into exit code 2
        main(["--debug", *train(fx, tmp_path / "out", "--alpha", "1.5")])
    done = subprocess.run(
        [sys.executable, "-m", "mclip", "--debug", "verify", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode != 2 and "Traceback (most recent call last)" in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("mclip.errors.UserError: ") and "is not a folder" in done.stderr
    )
    done = subprocess.run(
        [sys.executable, "-m", "mclip", "verify", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (
        done.returncode == 2
        and done.stderr.strip()
        == f"mclip: error: {tmp_path / 'missing'} is not a folder; pass a teacher cache, "
        "a train-student run folder or a final/ folder"
    )


def test_a_refused_run_can_be_fixed_and_rerun_in_the_same_folder(fx, tmp_path, capsys):
    """Nothing a refused run leaves behind stands in the way of the corrected command (no half-made cache to --overwrite)."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(embed_(fx, out, "--caption-column", "text", "--id-column", "id"))
    assert not out.exists()
    main(embed_(fx, out, "--id-column", "id"))
    assert (
        len(shards.open_cache(out)) == len(fx["rows"]) and json.loads((out / "manifest.json").read_text())["complete"]
    )
