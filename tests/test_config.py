"""The stage configs: one-line validation errors that name the fix, JSON round trips, closest-key errors, and the field
metadata (help, runtime, required) that the CLI and the resume checks read."""

import dataclasses

import pytest

from mclip import config
from mclip.config import EmbedConfig, EncodeConfig, EvalConfig, ExportConfig, PipelineConfig, TrainConfig
from mclip.errors import ConfigError, UserError

MINIMAL = {
    EmbedConfig: dict(data="d", out="o"),
    TrainConfig: dict(data="d", cache="c", out="o"),
    EvalConfig: dict(model="m", cache="c", data="d", out="o", languages=("de",)),
    EncodeConfig: dict(model="m", out="o", input="t.txt"),
    ExportConfig: dict(model="m", out="o"),
}
STAGES = list(MINIMAL)


@pytest.mark.parametrize(
    "cls, changes, says",
    [
        (EmbedConfig, dict(data=""), "pass --data"),
        (EmbedConfig, dict(dtype="float64"), "choose one of float16, float32"),
        (EmbedConfig, dict(cache_layers=(0,)), "e.g. --cache-layers 4,8,12"),
        (EmbedConfig, dict(cache_layers=(4, 4)), "repeats a layer"),
        (EmbedConfig, dict(device="tpu"), "use auto, cpu, cuda, cuda:N or mps"),
        (TrainConfig, dict(out=""), "pass --out"),
        (TrainConfig, dict(languages=("de zh",)), "must be codes without spaces or commas; list them as zh,de"),
        (EvalConfig, dict(languages=("de,zh",)), "must be non-empty codes without '/', ',' or spaces"),
        (TrainConfig, dict(languages=("zh", "zh")), "repeats a language"),
        (TrainConfig, dict(text_column_template="caption"), "must contain {lang}"),
        (TrainConfig, dict(schedule="step"), "choose one of linear, cosine, constant"),
        (TrainConfig, dict(temperature=0.001), "pass --fixed-temperature"),
        (TrainConfig, dict(betas=(0.9,)), "e.g. 0.9,0.999"),
        (TrainConfig, dict(max_steps=0), "max_steps=0 must be >= 1"),
        (EvalConfig, dict(languages=()), "pass --languages"),
        (EvalConfig, dict(ks=(5, 1)), "increasing without repeats"),
        (EvalConfig, dict(languages=("de/x",)), "without '/'"),
        (EncodeConfig, dict(data="d"), "exactly one of --input"),
        (EncodeConfig, dict(shard_size=0), "shard_size=0 must be >= 1"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_the_fix(cls, changes, says):
    with pytest.raises(ConfigError) as error:
        cls(**{**MINIMAL[cls], **changes})
    message = str(error.value)
    assert says in message and "\n" not in message, message
    assert isinstance(error.value, UserError) and isinstance(
        error.value, ValueError
    )  # one line from the CLI; a ValueError to callers


@pytest.mark.parametrize("cls", STAGES)
def test_json_round_trip(cls, tmp_path):
    made = cls(**MINIMAL[cls])
    assert config.from_dict(cls, config.to_dict(made)) == made  # lists in JSON come back as the tuples the fields hold
    config.save_json(made, tmp_path / "config.json")
    assert config.load_json(cls, tmp_path / "config.json") == made
    assert all(not isinstance(v, tuple) for v in config.to_dict(made).values())


def test_unknown_keys_name_the_closest_one_and_wrong_types_are_one_line():
    with pytest.raises(ConfigError, match=r"unknown key 'warmup_step' in \[train\]; did you mean 'warmup_steps'\?"):
        config.from_dict(TrainConfig, {**MINIMAL[TrainConfig], "warmup_step": 10}, where="[train]")
    with pytest.raises(ConfigError, match="unknown key 'zzz' in config; valid keys: data, out, teacher"):
        config.from_dict(EmbedConfig, {**MINIMAL[EmbedConfig], "zzz": 1})
    with pytest.raises(
        ConfigError, match='^lr = "fast" in config is a string; lr takes a number, written e.g. lr = 1e-4$'
    ):
        config.from_dict(TrainConfig, {**MINIMAL[TrainConfig], "lr": "fast"})


@pytest.mark.parametrize(
    "key, value, says",
    [
        (
            "include_english",
            "false",
            'include_english = "false" in [train] is a string; include_english takes true or false',
        ),
        ("extend_vocab", "no", 'extend_vocab = "no" in [train] is a string; extend_vocab takes true or false'),
        ("lr", "1e-3", 'lr = "1e-3" in [train] is a string; lr takes a number, written e.g. lr = 1e-4'),
        ("epochs", 2.5, "epochs = 2.5 in [train] is a number; epochs takes an integer"),
        ("epochs", True, "epochs = true in [train] is a boolean; epochs takes an integer"),
        ("languages", "de,zh", 'languages = "de,zh" in [train] is a string; languages takes a list of strings'),
        ("betas", [0.9, "x"], "betas takes a list of numbers"),
        ("max_steps", "100", "max_steps takes an integer (or none)"),
    ],
)
def test_a_typed_value_of_another_type_is_refused_naming_the_key_and_its_type(key, value, says):
    """TOML and JSON have booleans, numbers and lists: a string is never read as one (a "false" was true before)."""
    with pytest.raises(ConfigError) as error:
        config.from_dict(TrainConfig, {**MINIMAL[TrainConfig], key: value}, where="[train]")
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_typed_values_of_the_field_type_are_taken():
    made = config.from_dict(
        TrainConfig, {**MINIMAL[TrainConfig], "lr": 1, "include_english": False, "betas": [0.8, 0.9], "max_steps": None}
    )
    assert made.lr == 1.0 and isinstance(made.lr, float) and made.include_english is False and made.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "key, text, value",
    [
        ("include_english", "False", False),
        ("include_english", "no", False),
        ("include_english", "0", False),
        ("include_english", "YES", True),
        ("extend_vocab", "on", True),
        ("lr", "1e-3", 1e-3),
        ("epochs", "3", 3),
        ("max_steps", "none", None),
        ("languages", "de zh", ("de", "zh")),
        ("languages", "de,zh", ("de", "zh")),
        ("languages", '["de", "zh"]', ("de", "zh")),
        ("betas", "0.9, 0.98", (0.9, 0.98)),
        ("student", '"../student"', "../student"),
    ],
)
def test_text_values_are_parsed_by_the_field_type(key, text, value):
    got = config.parse_text(TrainConfig, key, text, where=f"--set train.{key}={text}")
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "key, text, says",
    [
        ("include_english", "maybe", "include_english takes true or false (also yes/no, on/off, 1/0), not 'maybe'"),
        ("lr", "fast", "lr takes a number, not 'fast'"),
        ("epochs", "1.5", "epochs takes an integer, not '1.5'"),
        ("student_layers", "4,x", "student_layers takes a list of integers, not 'x'"),
    ],
)
def test_text_values_of_another_type_are_refused_naming_the_key_and_its_type(key, text, says):
    with pytest.raises(ConfigError) as error:
        config.parse_text(TrainConfig, key, text, where=f"--set train.{key}={text}")
    assert str(error.value) == f"--set train.{key}={text}: {says}"


def test_a_pipeline_needs_every_stage():
    stages = {
        name: cls(**MINIMAL[cls])
        for name, cls in (("embed", EmbedConfig), ("train", TrainConfig), ("eval", EvalConfig))
    }
    assert PipelineConfig(out="o", **stages).train == stages["train"]
    with pytest.raises(ConfigError, match=r"no \[eval\] table"):
        PipelineConfig(out="o", embed=stages["embed"], train=stages["train"])


@pytest.mark.parametrize("cls", STAGES)
def test_every_field_has_a_default_and_its_option_help(cls):
    for field in dataclasses.fields(cls):
        assert field.default is not dataclasses.MISSING, field.name
        assert set(field.metadata) == {"help", "runtime", "required", "argument"}, field.name
        assert field.metadata["help"].strip() and "\n" not in field.metadata["help"], field.name


@pytest.mark.parametrize("cls", STAGES)
def test_a_required_option_is_one_the_config_refuses_empty(cls):
    required = [f.name for f in dataclasses.fields(cls) if f.metadata["required"]]
    assert required, cls
    positional = {f.name for f in dataclasses.fields(cls) if f.metadata["argument"]}
    for name in required:
        says = (
            f"as {name.upper()}" if name in positional else f"pass --{name.replace('_', '-')}"
        )  # `mclip export MODEL`
        with pytest.raises(ConfigError, match=says):
            cls(**{**MINIMAL[cls], name: type(getattr(cls(**MINIMAL[cls]), name))()})


def test_runtime_fields_are_where_and_how_fast_never_what_is_learnt():
    assert config.runtime_fields(EmbedConfig) == {
        "out",
        "batch_tokens",
        "max_batch_size",
        "device",
        "precision",
        "num_threads",
        "overwrite",
        "progress",
    }
    train = config.runtime_fields(TrainConfig)
    assert {
        "data",
        "cache",
        "out",
        "val_data",
        "num_workers",
        "save_every",
        "eval_every",
        "resume",
        "overwrite",
    } <= train
    # epochs and max_steps set the length of the lr schedule: a resume that changed them would train another run
    assert not {"epochs", "max_steps", "lr", "seed", "batch_size", "languages", "student"} & train
    assert config.runtime_fields(EvalConfig) == {"overwrite", "progress"}
    assert config.runtime_fields(TrainConfig(**MINIMAL[TrainConfig])) == train  # an instance answers like its class


def test_request_is_the_json_of_the_fields_a_resume_must_repeat():
    made = EmbedConfig(data="d", out="o", cache_layers=(4, 8), batch_tokens=64)
    request = config.request(made)
    assert request["cache_layers"] == [4, 8] and request["data"] == "d"
    assert not {"out", "batch_tokens", "progress"} & request.keys()
    assert config.request(dataclasses.replace(made, out="elsewhere", batch_tokens=4096)) == request


def test_batch_tokens_help_names_the_defaults_the_stage_uses():
    from mclip.embed.run import default_batch_tokens

    help_text = {f.name: f for f in dataclasses.fields(EmbedConfig)}["batch_tokens"].metadata["help"]
    cpu, gpu = (
        default_batch_tokens(type("D", (), {"type": "cpu"})),
        default_batch_tokens(type("D", (), {"type": "cuda"})),
    )
    assert f"default {cpu} on CPU, {gpu} on GPU" in help_text
