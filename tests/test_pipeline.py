"""`mclip run`: pipeline files parse with closest-key errors and path resolution; a tiny pipeline runs all three stages,
skips what is complete, and resumes after a killed stage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mclip import pipeline
from mclip.cli import main
from mclip.errors import ConfigError, UserError
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
LANGS = ["de", "zh"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, bert_teacher):
    """A pipeline file over tiny models and real parallel phrases (emoji names), paths relative to the file."""
    import emoji

    root = tmp_path_factory.mktemp("pipe")
    for lang in LANGS:
        emoji.config.load_language(lang)
    clean = lambda s: s.strip(":").replace("_", " ")  # noqa: E731
    items = sorted(
        (clean(d["en"]), clean(d["de"]), clean(d["zh"]))
        for d in emoji.EMOJI_DATA.values()
        if "de" in d
        and "zh" in d
        and d.get("status") == emoji.STATUS["fully_qualified"]
        and "skin tone" not in clean(d["en"])
    )[:60]
    rows = [
        {"id": f"e{i:03d}", "caption": en, "caption_de": de, "caption_zh": zh} for i, (en, de, zh) in enumerate(items)
    ]
    tiny.write_captions(root / "data" / "train.jsonl", rows[:40])
    tiny.write_captions(root / "data" / "test.jsonl", rows[40:])
    corpus = [r[k] for r in rows for k in ("caption", "caption_de", "caption_zh")]
    tiny.write_tiny_bert(root / "student", hidden=32, seed=2, corpus=corpus)
    toml = root / "pipelines" / "tiny.toml"
    toml.parent.mkdir()
    toml.write_text(
        f'''
name = "tiny"
out = "../runs/tiny"
[embed]
data = "../data/*.jsonl"
id_column = "id"
teacher = "{bert_teacher}"
[train]
data = "../data/train.jsonl"
languages = ["de", "zh"]
student = "../student"
batch_size = 16
epochs = 2
warmup_steps = 2
lr = 1e-3
num_workers = 0
num_threads = 1
eval_every = 0
save_every = 2
progress = false
[eval]
data = "../data/test.jsonl"
split = "train"
languages = ["de", "zh"]
teacher_baseline = true
progress = false
''',
        encoding="utf-8",
    )
    return {"root": root, "toml": toml}


def test_shipped_pipeline_files_parse():
    for path in sorted((ROOT / "pipelines").glob("*.toml")):
        config = pipeline.load_pipeline(path)
        assert config.train.languages and config.eval.languages, path
        assert Path(config.embed.out).name == "cache" and Path(config.eval.model).parts[-2:] == ("train", "final")


def test_seed_recipe_file_holds_the_seed_hyper_parameters():
    config = pipeline.load_pipeline(ROOT / "pipelines" / "cc3m-zh-xlmr-base.toml")
    t = config.train
    assert (config.embed.teacher, t.student, t.loss, t.alpha, t.pooler) == (
        "openai/clip-vit-base-patch16",
        "xlm-roberta-base",
        "cl",
        0.1,
        "cls",
    )
    assert (t.batch_size, t.warmup_steps, t.lr, t.weight_decay, t.epochs, t.seed) == (512, 1000, 1e-4, 1e-4, 10, 42)


def test_unknown_keys_name_the_closest_valid_key(tiny_pipeline, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_pipeline["toml"].read_text().replace("warmup_steps = 2", "warmup_step = 2"))
    with pytest.raises(ConfigError, match=r"unknown key 'warmup_step' in \[train\].*did you mean 'warmup_steps'"):
        pipeline.load_pipeline(bad)
    bad.write_text(tiny_pipeline["toml"].read_text().replace("[eval]", "[evaluate]"))
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate'.*did you mean 'eval'"):
        pipeline.load_pipeline(bad)
    with pytest.raises(UserError, match=r"unknown section 'trian'.*did you mean 'train'"):
        pipeline.load_pipeline(tiny_pipeline["toml"], overrides=["trian.lr=1"])


def test_paths_resolve_against_the_file_and_set_overrides(tiny_pipeline):
    config = pipeline.load_pipeline(
        tiny_pipeline["toml"], overrides=["train.lr=2e-4", "train.languages=['de']", "name=renamed"]
    )
    root = tiny_pipeline["root"]
    assert config.train.lr == 2e-4 and config.train.languages == ("de",) and config.name == "renamed"
    assert Path(config.train.student) == (root / "student").resolve()
    assert Path(config.out) == (root / "runs" / "tiny").resolve()
    assert config.embed.data == str(root / "pipelines" / "../data/*.jsonl")
    assert pipeline.load_pipeline(tiny_pipeline["toml"], out="elsewhere").train.out == str(Path("elsewhere") / "train")


def test_set_values_are_parsed_by_the_field_type(tiny_pipeline):
    """--set train.include_english=False stored the string 'False', which counted as true."""
    sets = ["train.include_english=False", "train.extend_vocab=no", "train.lr=1e-3", "eval.languages=de zh"]
    config = pipeline.load_pipeline(tiny_pipeline["toml"], overrides=sets)
    assert config.train.include_english is False and config.train.extend_vocab is False and config.train.lr == 1e-3
    assert config.eval.languages == ("de", "zh")
    with pytest.raises(ConfigError, match=r"^--set train.include_english=maybe: include_english takes true or false"):
        pipeline.load_pipeline(tiny_pipeline["toml"], overrides=["train.include_english=maybe"])


@pytest.mark.parametrize(
    "line, says",
    [
        (
            'include_english = "false"',
            'include_english = "false" in [train] of {toml} is a string; include_english takes',
        ),
        ('lr = "1e-3"', 'lr = "1e-3" in [train] of {toml} is a string; lr takes a number, written e.g. lr = 1e-4'),
    ],
)
def test_a_string_for_a_typed_key_in_the_file_is_one_line_naming_the_key(
    line, says, tiny_pipeline, tmp_path, cli_error
):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_pipeline["toml"].read_text().replace("lr = 1e-3", line))
    assert cli_error(["run", str(bad)]).startswith(says.format(toml=bad))


@pytest.mark.parametrize("where", ["out", "out/run"])
def test_a_read_only_run_folder_is_one_line(where, tiny_pipeline, read_only_dir, cli_error):
    """Each verb alone said one line; `mclip run` ended in a 39-line traceback."""
    out = read_only_dir / where
    line = cli_error(["run", str(tiny_pipeline["toml"]), "--out", str(out)])
    assert line.startswith(f"permission denied writing {out}") and "Read-only file system" in line, line


def test_a_stage_output_key_in_the_file_is_refused(tiny_pipeline, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_pipeline["toml"].read_text().replace("[train]\n", "[train]\nout = 'x'\n"))
    with pytest.raises(ConfigError, match=r"train.out .* is set by the pipeline"):
        pipeline.load_pipeline(bad)


def test_bad_value_in_the_file_is_one_line_error_from_the_cli(tiny_pipeline, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_pipeline["toml"].read_text().replace("lr = 1e-3", "lr = -1.0"))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("mclip: error:") and "lr" in err[0]


def test_run_resumes_after_a_killed_stage_and_skips_what_is_complete(tiny_pipeline, tmp_path):
    """SIGKILL the pipeline once the cache is complete (inside train-student); the same command finishes the run, with
    the cache left as it was, and a clean run to another folder gives the same metrics."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mclip", "run", str(tiny_pipeline["toml"]), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / "cache" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(manifest.read_text())["complete"] and not (out / "eval" / "metrics.json").exists()
    # the cache's content (shards, manifest); the lock dot-file comes and goes with whoever holds the folder
    cache_mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir() if not p.name.startswith(".")}

    resumed = pipeline.run(pipeline.load_pipeline(tiny_pipeline["toml"], out=str(out)))
    assert resumed.stages["embed"] == "skipped"
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir() if not p.name.startswith(".")
    } == cache_mtimes
    clean = pipeline.run(pipeline.load_pipeline(tiny_pipeline["toml"], out=str(tmp_path / "clean")))
    assert clean.stages == {"embed": "ran", "train": "ran", "eval": "ran"}
    for key in (
        "de/text_to_text/R@1",
        "zh/text_to_text/R@5",
        "en/text_to_text/R@1",
        "de/teacher_baseline/text_to_text/R@1",
    ):
        assert resumed.metrics[key] == pytest.approx(clean.metrics[key], abs=1e-6), key
    again = pipeline.run(pipeline.load_pipeline(tiny_pipeline["toml"], out=str(out)))
    assert (
        again.stages == {"embed": "skipped", "train": "skipped", "eval": "skipped"} and again.metrics == resumed.metrics
    )
    assert json.loads((out / "eval" / "metrics.json").read_text()) == resumed.metrics


def test_summary_table_shows_student_beside_teacher(tiny_pipeline, tmp_path, capsys):
    result = pipeline.run(pipeline.load_pipeline(tiny_pipeline["toml"], out=str(tmp_path / "run")))
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| de |"))
    assert (
        f"{result.metrics['de/text_to_text/R@1']:.3f}" in row
        and f"{result.metrics['de/teacher_baseline/text_to_text/R@1']:.3f}" in row
    )
    assert "avg (non-English)" in printed and "en (no-forgetting check)" in printed


@pytest.mark.slow
def test_run_under_torchrun_scores_once_on_rank_0(tiny_pipeline, tmp_path):
    # stages 1 and 2 are distributed; stage 3 is one process: rank 0 scores, rank 1 ends after training (it used to run
    # eval-retrieval too, into the same folder, which the first rank's lock refused)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            "-m",
            "mclip",
            "run",
            str(tiny_pipeline["toml"]),
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("avg (non-English)") == 1  # one summary table: rank 0's
    assert json.loads((tmp_path / "run" / "train" / "config.json").read_text())["world_size"] == 2
    assert "de/text_to_text/R@1" in json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
