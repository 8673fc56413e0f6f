"""The `mclip` command line: options are the config fields (names, types, defaults); every bad input is one `mclip: error:`
line and exit code 2, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mclip
from mclip.cli import main
from mclip.store import shards
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory):
    return tiny.write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def _embed(out, data, teacher, *extra):
    return ["embed-teacher", "--data", str(data), "--out", str(out), "--teacher", str(teacher), "--no-progress", *extra]


def test_help_does_not_import_torch():
    code = (
        "import sys; from mclip.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'numpy', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "embed-teacher" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "mclip", "embed-teacher", "--help"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and "--cache-layers" in proc.stdout and "--image-column" in proc.stdout


def test_embed_teacher_runs(tmp_path, captions, clip_text_teacher, capsys):
    argv = _embed(
        tmp_path / "out",
        captions,
        clip_text_teacher,
        "--id-column",
        "id",
        "--cache-layers",
        "1,2",
        "--dtype",
        "float32",
        "--no-normalize",
        "--shard-size",
        "8",
    )
    main([a for a in argv if a != "--no-progress"])
    err = capsys.readouterr().err
    assert "embed-teacher: 20 captions in 3 shard(s)" in err and "this run embedded 20 unique captions" in err
    cache = shards.open_cache(tmp_path / "out")
    assert len(cache) == 20 and cache.layers == [1, 2] and cache.manifest["normalized"] is False
    assert cache.manifest["dtype"] == "float32" and len(cache.files) == 3


def test_missing_columns_name_the_existing_ones(tmp_path, captions, clip_text_teacher, cli_error):
    line = cli_error(_embed(tmp_path / "out", captions, clip_text_teacher, "--caption-column", "text"))
    assert "column 'text' not found" in line and "it has id, caption" in line and "--caption-column" in line
    line = cli_error(_embed(tmp_path / "out2", captions, clip_text_teacher, "--id-column", "key"))
    assert "column 'key' not found" in line and "it has id, caption" in line and "--id-column" in line


def test_empty_captions_skipped_or_refused_with_strict(tmp_path, clip_text_teacher, cli_error):
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"caption": "red apple"}, {"caption": ""}, {"caption": None}])
    main(_embed(tmp_path / "out", data, clip_text_teacher))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["totals"]["rows"] == 1 and manifest["totals"]["skipped"] == 2
    line = cli_error(_embed(tmp_path / "strict", data, clip_text_teacher, "--strict"))
    assert "caption of id '1' (row 1) is empty" in line


def test_bad_ids(tmp_path, clip_text_teacher, cli_error):
    rows = [{"id": "a", "caption": "x"}, {"id": "b", "caption": "y"}, {"id": "a", "caption": "z"}]
    data = tiny.write_captions(tmp_path / "dup.jsonl", rows)
    assert "id 'a' appears more than once" in cli_error(
        _embed(tmp_path / "o1", data, clip_text_teacher, "--id-column", "id")
    )
    data = tiny.write_captions(tmp_path / "none.jsonl", [{"id": "a", "caption": "x"}, {"id": None, "caption": "y"}])
    assert "is empty at row 1" in cli_error(_embed(tmp_path / "o2", data, clip_text_teacher, "--id-column", "id"))


def test_zero_rows(tmp_path, clip_text_teacher, cli_error):
    import datasets

    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert "zero rows" in cli_error(_embed(tmp_path / "o1", tmp_path / "empty.jsonl", clip_text_teacher))
    datasets.Dataset.from_dict(
        {"caption": []}, features=datasets.Features({"caption": datasets.Value("string")})
    ).save_to_disk(str(tmp_path / "empty_ds"))
    assert "has zero rows" in cli_error(_embed(tmp_path / "o2", tmp_path / "empty_ds", clip_text_teacher))


def test_teacher_that_is_neither_clip_nor_an_encoder(tmp_path, captions, gpt2_teacher, cli_error):
    line = cli_error(_embed(tmp_path / "out", captions, gpt2_teacher))
    assert "is a gpt2 model, neither CLIP nor a text encoder" in line


def test_image_column_needs_a_full_clip_teacher(tmp_path, bert_teacher, clip_text_teacher, cli_error):
    data = tiny.write_captions(tmp_path / "rows.jsonl", [{"caption": "x", "image": "a.png"}])
    for teacher, kind in ((bert_teacher, "bert"), (clip_text_teacher, "clip_text_model")):
        line = cli_error(_embed(tmp_path / f"out-{kind}", data, teacher, "--image-column", "image"))
        assert "--image-column needs a full CLIP teacher" in line and f"is a {kind} model" in line


def test_unreadable_inputs(tmp_path, captions, clip_text_teacher, cli_error):
    assert "does not exist" in cli_error(_embed(tmp_path / "o1", tmp_path / "missing.jsonl", clip_text_teacher))
    assert "does not exist" in cli_error(_embed(tmp_path / "o2", tmp_path / "missing-*.csv", clip_text_teacher))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"caption": "ok"}\n{"caption": "crème brûlée"}\n'.encode("latin-1"))
    assert "is not valid UTF-8 text" in cli_error(_embed(tmp_path / "o3", bad, clip_text_teacher))
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("caption\nok\ncrème brûlée\n".encode("latin-1"))
    assert "is not valid UTF-8 text" in cli_error(_embed(tmp_path / "o4", bad, clip_text_teacher))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    assert str(broken) in cli_error(_embed(tmp_path / "o5", broken, clip_text_teacher))
    assert "teacher folder" in cli_error(_embed(tmp_path / "o6", captions, tmp_path / "no-teacher"))


def test_output_folder_checks(tmp_path, captions, clip_text_teacher, cli_error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("keep me", encoding="utf-8")
    assert "is not empty and holds no mclip cache" in cli_error(_embed(out, captions, clip_text_teacher))
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert "is a file" in cli_error(_embed(tmp_path / "file", captions, clip_text_teacher))
    main(_embed(tmp_path / "cache", captions, clip_text_teacher))
    line = cli_error(_embed(tmp_path / "cache", captions, clip_text_teacher, "--dtype", "float32"))
    assert "other arguments (dtype: 'float16' -> 'float32')" in line and "--overwrite" in line
    assert "--cache-layers [5] exceed" in cli_error(
        _embed(tmp_path / "o3", captions, clip_text_teacher, "--cache-layers", "5")
    )
    assert "not a comma-separated list" in cli_error(
        _embed(tmp_path / "o4", captions, clip_text_teacher, "--cache-layers", "a,b")
    )
    assert "dtype='float64' is not valid" in cli_error(
        _embed(tmp_path / "o5", captions, clip_text_teacher, "--dtype", "float64")
    )


def test_error_through_a_real_process_has_no_traceback(tmp_path, clip_text_teacher):
    data = tiny.write_captions(tmp_path / "dup.jsonl", [{"id": 1, "caption": "x"}, {"id": 1, "caption": "y"}])
    argv = _embed(tmp_path / "out", data, clip_text_teacher, "--id-column", "id")
    proc = subprocess.run(
        [sys.executable, "-m", "mclip", *argv],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("mclip: error: id '1' appears more than once in column 'id'")


# ---- options are the config fields: names, types, defaults ----

STAGES = [
    ("embed-teacher", "embed_teacher", "EmbedConfig", ["--data", "d", "--out", "o"], dict(data="d", out="o")),
    (
        "train-student",
        "train_student",
        "TrainConfig",
        ["--data", "d", "--cache", "c", "--out", "o"],
        dict(data="d", cache="c", out="o"),
    ),
    (
        "eval-retrieval",
        "eval_retrieval",
        "EvalConfig",
        ["--model", "m", "--cache", "c", "--data", "d", "--out", "o", "--languages", "de"],
        dict(model="m", cache="c", data="d", out="o", languages=("de",)),
    ),
    (
        "encode",
        "encode",
        "EncodeConfig",
        ["--model", "m", "--out", "o", "--input", "t.txt"],
        dict(model="m", out="o", input="t.txt"),
    ),
]


def _config_of(argv, module, monkeypatch):
    """The config the CLI hands to the stage's run() for argv (the stage itself does not run)."""
    seen = []
    monkeypatch.setattr(getattr(mclip, module), "run", seen.append)  # mclip.<verb> is the stage's module
    main(argv)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("languages", ["de zh", "de,zh", " de , zh ", "de, zh"])
def test_a_list_option_takes_commas_or_spaces(languages, monkeypatch):
    """--languages "de zh" once looked for a column named caption_de zh."""
    argv = ["train-student", "--data", "d", "--cache", "c", "--out", "o", "--languages", languages]
    assert _config_of(argv, "train_student", monkeypatch).languages == ("de", "zh")


@pytest.mark.parametrize("verb, module, cls, required, values", STAGES, ids=[s[0] for s in STAGES])
def test_an_option_left_out_takes_the_config_default(verb, module, cls, required, values, monkeypatch):
    import mclip.config

    assert _config_of([verb, *required], module, monkeypatch) == getattr(mclip.config, cls)(**values)


@pytest.mark.parametrize("verb, module, cls, required, values", STAGES, ids=[s[0] for s in STAGES])
def test_each_config_field_is_one_option_named_after_it(verb, module, cls, required, values):
    import dataclasses

    import typer

    import mclip.config
    from mclip.cli import app

    command = typer.main.get_command(app).commands[verb]
    fields = dataclasses.fields(getattr(mclip.config, cls))
    assert [p.name for p in command.params] == [f.name for f in fields]
    for param, field in zip(command.params, fields):
        assert param.opts == [f"--{field.name.replace('_', '-')}"] and param.help == field.metadata["help"]
        assert param.required == field.metadata["required"]


def test_options_take_the_values_users_type(monkeypatch):
    train = _config_of(
        [
            "train-student",
            "--data",
            "d",
            "--cache",
            "c",
            "--out",
            "o",
            "--languages",
            "zh, de",
            "--betas",
            "0.8,0.99",
            "--layer-kd",
            "--student-layers",
            "1,2",
            "--no-include-english",
            "--no-progress",
            "--max-steps",
            "5",
            "--lr",
            "2e-4",
            "--val-data",
            "v.jsonl",
        ],
        "train_student",
        monkeypatch,
    )
    assert (train.languages, train.betas, train.student_layers, train.layer_kd) == (
        ("zh", "de"),
        (0.8, 0.99),
        (1, 2),
        True,
    )
    assert (train.include_english, train.progress, train.max_steps, train.lr, train.val_data) == (
        False,
        False,
        5,
        2e-4,
        "v.jsonl",
    )
    embed = _config_of(
        [
            "embed-teacher",
            "--data",
            "d",
            "--out",
            "o",
            "--cache-layers",
            "4,8,12",
            "--no-normalize",
            "--no-dedup",
            "--batch-tokens",
            "64",
            "--id-column",
            "id",
        ],
        "embed_teacher",
        monkeypatch,
    )
    assert (embed.cache_layers, embed.normalize, embed.dedup, embed.batch_tokens, embed.id_column) == (
        (4, 8, 12),
        False,
        False,
        64,
        "id",
    )
    args = [
        "eval-retrieval",
        "--model",
        "m",
        "--cache",
        "c",
        "--data",
        "d",
        "--out",
        "o",
        "--languages",
        "de,fr",
        "--ks",
        "1,5",
    ]
    evaluated = _config_of([*args, "--no-images", "--no-faiss-gpu", "--nprobe", "4"], "eval_retrieval", monkeypatch)
    assert (evaluated.languages, evaluated.ks, evaluated.images, evaluated.faiss_gpu, evaluated.nprobe) == (
        ("de", "fr"),
        (1, 5),
        False,
        False,
        4,
    )
    assert _config_of([*args, "--images"], "eval_retrieval", monkeypatch).images is True
    encoded = _config_of(
        ["encode", "--model", "m", "--out", "o", "--input", "t.txt", "--npy", "--dtype", "float16"],
        "encode",
        monkeypatch,
    )
    assert (encoded.input, encoded.npy, encoded.dtype) == ("t.txt", True, "float16")


def test_a_bad_comma_separated_list_is_one_line(cli_error):
    assert (
        cli_error(["train-student", "--data", "d", "--cache", "c", "--out", "o", "--betas", "0.9,x"])
        == "'0.9,x' is not a comma-separated list of numbers, e.g. 0.9,0.999"
    )
    assert "is not a comma-separated list of integers, e.g. 4,8,12" in cli_error(
        [
            "eval-retrieval",
            "--model",
            "m",
            "--cache",
            "c",
            "--data",
            "d",
            "--out",
            "o",
            "--languages",
            "de",
            "--ks",
            "1,five",
        ]
    )


def test_a_missing_required_option_is_clicks_usage_error_not_a_traceback(capsys):
    # typer >= 0.29 raises the usage errors of its own bundled click copy, which `main` must catch too
    with pytest.raises(SystemExit) as exit_:
        main(["embed-teacher", "--out", "o"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and "Missing option '--data'" in err, err


def test_a_torchvision_that_cannot_load_beside_torch_is_one_line_naming_it(tmp_path, captions, bert_teacher):
    """transformers imports an installed torchvision; one built for CUDA beside the CPU torch failed every verb with
    `Could not import module 'BertModel'`. Here a stand-in torchvision package fails to import as such a build does."""
    site = tmp_path / "site"
    (site / "torchvision").mkdir(parents=True)
    (site / "torchvision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0+cu128\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mclip", *_embed(tmp_path / "out", captions, bert_teacher, "--id-column", "id")],
        cwd=ROOT,
        env=dict(_env(), PYTHONPATH=f"{ROOT}{os.pathsep}{site}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    import torch

    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"mclip: error: torchvision 0.28.0+cu128 cannot be imported beside torch {torch.__version__} (operator "
        "torchvision::nms does not exist), and transformers imports it whenever it is installed; install the "
        "torchvision built for this torch, or uninstall it"
    ], proc.stderr[-2000:]
