"""Nothing runs that should not: checkpoint code only with --trust-remote-code, mclip's own weights only from safetensors,
every torch.load with weights_only=True, no config value ever reaching a shell or eval."""

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mclip.errors import UserError
from mclip.store import verify
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "mclip").rglob("*.py"))


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies trusted checkpoint code into HF_MODULES_CACHE and imports it from there: keep that in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path / "hf_modules"


def with_code(folder: Path, marker: Path, model_type: str = "bert") -> Path:
    """Give a saved model folder an auto_map pointing at a local module that writes `marker` when imported."""
    name = f"shipped_{abs(hash(str(folder))) % 10**8}"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('model code ran')\n"
        "from transformers import BertConfig, BertModel\n"
        f"class ShippedConfig(BertConfig):\n    model_type = {model_type!r}\n"
        "class ShippedModel(BertModel):\n    config_class = ShippedConfig\n",
        encoding="utf-8",
    )
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(
        model_type=model_type, auto_map={"AutoConfig": f"{name}.ShippedConfig", "AutoModel": f"{name}.ShippedModel"}
    )
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "model_type", ["bert", "shippedbert"]
)  # a known type (transformers would silently use its own class) or not
def test_teacher_code_runs_only_with_trust_remote_code(model_type, tmp_path, captions, cli_error, modules_cache):
    from mclip.models.teacher import load_teacher

    marker = tmp_path / "marker"
    teacher = with_code(tiny.write_tiny_bert(tmp_path / "teacher", hidden=24), marker, model_type)
    err = cli_error(
        [
            "embed-teacher",
            "--data",
            str(captions),
            "--out",
            str(tmp_path / "out"),
            "--teacher",
            str(teacher),
            "--no-progress",
        ]
    )
    assert f"teacher {teacher} ships its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    load_teacher(str(teacher), trust_remote_code=True)  # the same folder with the flag: its code does run
    assert marker.read_text() == "model code ran"


def test_student_code_runs_only_with_trust_remote_code(small_run, tmp_path, cli_error, modules_cache):
    marker = tmp_path / "marker"
    fresh = with_code(shutil.copytree(small_run["student"], tmp_path / "fresh"), marker)
    args = list(small_run["train_args"])
    args[args.index("--student") + 1] = str(fresh)
    err = cli_error(["train-student", *args, "--out", str(tmp_path / "run")])
    assert f"student {fresh} ships its own Python code (auto_map in config.json: AutoConfig, AutoModel)" in err
    exported = with_code(shutil.copytree(small_run["run"] / "final", tmp_path / "final"), marker)
    source = tmp_path / "texts.txt"
    source.write_text("ein Hund\n", encoding="utf-8")
    for argv in (
        ["encode", "--model", str(exported), "--input", str(source), "--out", str(tmp_path / "enc"), "--no-progress"],
        [
            "eval-retrieval",
            "--model",
            str(exported),
            "--cache",
            str(small_run["cache"]),
            "--data",
            str(small_run["data"]),
            "--languages",
            "de",
            "--split",
            "train",
            "--out",
            str(tmp_path / "eval"),
            "--no-progress",
        ],
    ):
        assert "ships its own Python code" in cli_error(argv)
    assert not marker.exists()


class _Payload:
    """A pickle that runs code when loaded: what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_own_students_load_from_safetensors_only(small_run, tmp_path, cli_error):
    from safetensors.torch import load_file

    marker = tmp_path / "marker"
    final = shutil.copytree(small_run["run"] / "final", tmp_path / "final")
    weights = load_file(str(final / "model.safetensors"))
    (final / "model.safetensors").unlink()
    torch.save({**weights, "payload": _Payload(marker)}, final / "pytorch_model.bin")
    source = tmp_path / "texts.txt"
    source.write_text("ein Hund\n", encoding="utf-8")
    err = cli_error(
        ["encode", "--model", str(final), "--input", str(source), "--out", str(tmp_path / "enc"), "--no-progress"]
    )
    assert "has no model.safetensors; mclip loads its own students from safetensors only" in err
    assert not marker.exists()


def test_a_trainer_state_that_would_run_code_is_refused(small_run, tmp_path, cli_error):
    marker = tmp_path / "marker"
    run = shutil.copytree(small_run["run"], tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-0000004"
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    torch.save({**state, "payload": _Payload(marker)}, checkpoint / "trainer.pt")
    verify.write_checksums(checkpoint)  # whoever swapped the file can rewrite the checksums too
    err = cli_error(["train-student", *small_run["train_args"], "--out", str(run), "--resume"])
    assert f"cannot load {checkpoint / 'trainer.pt'} (" in err and "was not written by mclip" in err
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else (
                    f"{func.value.id}.{func.attr}"
                    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    else None
                )
            )
            yield name, node


def test_every_torch_load_is_weights_only():
    found = []
    for path in SOURCES:
        for name, call in _calls(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "torch.load":
                weights_only = [k.value for k in call.keywords if k.arg == "weights_only"]
                assert weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True, (
                    f"{path.name}:{call.lineno} torch.load without weights_only=True"
                )
                found.append(f"{path.name}:{call.lineno}")
            assert name not in ("pickle.load", "pickle.loads"), f"{path.name}:{call.lineno} unpickles"
    assert found, "expected the trainer-state load in train_student.py"


def test_no_config_value_reaches_a_shell_or_eval():
    banned = {
        "eval",
        "exec",
        "compile",
        "os.system",
        "os.popen",
        "subprocess.run",
        "subprocess.Popen",
        "subprocess.call",
        "subprocess.check_call",
        "subprocess.check_output",
        "__import__",
    }
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, call in _calls(tree):
            assert name not in banned, f"{path.name}:{call.lineno} calls {name}"
            assert not any(k.arg == "shell" for k in call.keywords), f"{path.name}:{call.lineno} passes shell="
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"subprocess", "shlex"}, f"{path.name} imports {imported & {'subprocess', 'shlex'}}"


def test_from_pretrained_always_passes_trust_remote_code():
    """Every from_pretrained that can load checkpoint code is told the user's choice (default False), never left to its prompt."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                owner = ast.unparse(node.func.value)
                if owner.startswith("Auto"):  # the Auto* classes are the ones that resolve auto_map code
                    assert any(k.arg == "trust_remote_code" for k in node.keywords) or any(
                        isinstance(k.value, ast.Name) and k.arg is None for k in node.keywords
                    ), f"{path.name}:{node.lineno} {owner}"


def test_library_default_is_no_trust(tmp_path, modules_cache):
    from mclip.models.student import build_student

    marker = tmp_path / "marker"
    folder = with_code(tiny.write_tiny_bert(tmp_path / "student", hidden=32), marker)
    with pytest.raises(UserError, match="ships its own Python code"):
        build_student(str(folder), dim=8)
    assert not marker.exists()
