"""`mclip export --format open_clip`: the folder's config and weights, the projection bias folded exactly, the refusals;
and, where open_clip imports (the second environment of .ci/open_clip), open_clip loads it with text and image
embeddings equal to mclip's and the teacher's, and CLIP_benchmark's retrieval on it equals eval-retrieval's text->image.

Tiny random CLIPs and students of each pooler (BERT mean and CLS, XLM-R mean), saved and loaded by from_pretrained."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mclip
from mclip.config import EmbedConfig, EvalConfig, ExportConfig
from mclip.deploy import export
from mclip.deploy import open_clip as oc_export
from mclip.errors import UserError
from mclip.models.student import build_student
from mclip.models.teacher import load_teacher
from tests import tiny

OPEN_CLIP, WHY = oc_export.import_open_clip()
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is None, reason="open_clip not importable")
TEXTS = [  # other texts than the export's own check: several scripts, one past the token limit
    "a photo of a dog",
    "a cat sitting on a red sofa",
    "Zwei Kinder spielen Fußball im Park",
    "une tasse de café sur la table",
    "一只狗在草地上奔跑",
    "Собака бежит по пляжу",
    "قطة تجلس على الأريكة",
    "바닷가에서 뛰는 개",
    "🐶 dog at the beach",
    " ".join(["woman standing next to a red car"] * 40),
]
CORPUS = tiny.CORPUS + TEXTS + list(oc_export.TEXTS)
STUDENTS = [("bert", "mean"), ("bert", "cls"), ("xlmr", "mean")]

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run faster on one thread


def spread(folder, write, seed: int):
    """A tiny random backbone whose texts spread out: weights at 15x BERT's init range (as in tests/test_export.py),
    since at 0.02 every text gets nearly the same vector and a cosine check would say nothing."""
    from transformers import AutoConfig, AutoModel

    write(folder, hidden=32, corpus=CORPUS, seed=seed)
    config = AutoConfig.from_pretrained(folder)
    config.initializer_range = 0.3  # dropout stays at 0.1, as in the real backbones
    torch.manual_seed(seed)
    AutoModel.from_config(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(clip_teacher):
    return load_teacher(str(clip_teacher), need_images=True)


@pytest.fixture(scope="module")
def record(teacher):
    """What a student trained from a cache of the tiny CLIP with images records in mclip.json."""
    info = teacher.info()
    return {
        "name": info.name,
        "fingerprint": info.fingerprint,
        "dim": info.dim,
        "kind": "clip",
        "pooling": info.pooling,
    }


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        "bert": spread(root / "bert", tiny.write_tiny_bert, 5),
        "xlmr": spread(root / "xlmr", tiny.write_tiny_xlmr, 6),
    }


def make_student(folder, backbone, pooler: str, meta: dict, dim: int = 16):
    student = build_student(str(backbone), dim=dim, pooler=pooler, meta=meta)
    assert student.projection.bias.abs().min() > 0  # a bias to fold
    return student.save(folder)


@pytest.fixture(scope="module", params=STUDENTS, ids=["-".join(p) for p in STUDENTS])
def exported(request, tmp_path_factory, backbones, record):
    backbone, pooler = request.param
    root = tmp_path_factory.mktemp(f"{backbone}_{pooler}")
    student = make_student(root / "final", backbones[backbone], pooler, {"teacher": record})
    out = root / "open_clip"
    result = export.run(ExportConfig(model=str(student), out=str(out), format="open_clip", progress=False))
    return {"student": student, "out": out, "result": result, "pooler": pooler}


def read(out):
    from safetensors.torch import load_file

    return json.loads((out / "open_clip_config.json").read_text()), load_file(str(out / "open_clip_model.safetensors"))


# ---- the export itself (no open_clip needed) ----


def test_fold_bias_is_exact_with_full_row_rank_and_reports_a_residual_otherwise():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    shift, residual = oc_export.fold_bias(weight, bias)
    assert shift.shape == (32,) and residual < 1e-12
    torch.testing.assert_close(weight @ shift, bias, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(5, 32, generator=g)  # pooled states: shifting them by c is adding the bias after projecting
    torch.testing.assert_close((hidden + shift) @ weight.T, hidden @ weight.T + bias, atol=1e-5, rtol=1e-5)
    wide = torch.randn(16, 8, generator=g)  # D > H: rank 8, a random bias lies outside its span
    assert oc_export.fold_bias(wide, bias)[1] > 0.1
    in_span = wide @ torch.randn(8, generator=g)  # ...unless it is in it
    assert oc_export.fold_bias(wide, in_span)[1] < oc_export.FOLD_TOLERANCE  # up to float32 rounding
    zero, residual = oc_export.fold_bias(weight, torch.zeros(16))
    assert not zero.any() and residual == 0.0


def test_the_folder_holds_open_clip_config_weights_and_tokenizer(exported, teacher):
    from huggingface_hub import ModelCard

    out, result = exported["out"], exported["result"]
    config, weights = read(out)
    student = mclip.load(exported["student"])
    card = ModelCard.load(out / "README.md")  # the model card, as the hub reads it
    assert card.data.library_name == "open_clip" and "open_clip" in card.data.tags and "open_clip" in card.text
    assert config["model_cfg"]["embed_dim"] == 16 and config["model_cfg"]["quick_gelu"] is True
    assert config["model_cfg"]["text_cfg"] == {
        "hf_model_name": str(out.resolve()),  # open_clip reads the backbone's config.json from there
        "hf_tokenizer_name": str(out.resolve()),
        "hf_pooler_type": {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}[exported["pooler"]],
        "hf_proj_type": "linear",
        "context_length": student.max_length,
    }
    vision = teacher.model.config.vision_config
    assert config["model_cfg"]["vision_cfg"] == {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "width": vision.hidden_size,
        "layers": vision.num_hidden_layers,
        "head_width": vision.hidden_size // vision.num_attention_heads,
        "mlp_ratio": vision.intermediate_size / vision.hidden_size,
    }
    processor = teacher.image_processor
    assert config["preprocess_cfg"] == {
        "size": 32,
        "mode": "RGB",
        "mean": list(processor.image_mean),
        "std": list(processor.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    names = {p.name for p in out.iterdir()}
    assert {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "config.json",
        "tokenizer.json",
        "mclip.json",
    } <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # one weights file: the one open_clip loads
    backbone_config = json.loads((out / "config.json").read_text())
    assert student.backbone.config.hidden_dropout_prob == 0.1  # the student's, as trained
    assert backbone_config["hidden_dropout_prob"] == backbone_config["attention_probs_dropout_prob"] == 0.0
    # the text tower: the backbone without its pooler, the projection's weight, its bias folded into the last LayerNorm
    backbone = student.backbone.state_dict()
    text = {k.removeprefix("text.transformer."): v for k, v in weights.items() if k.startswith("text.transformer.")}
    assert set(text) == {k for k in backbone if not k.startswith("pooler.")}
    last = f"encoder.layer.{student.num_layers - 1}.output.LayerNorm.bias"
    assert all(torch.equal(text[k], backbone[k]) for k in text if k != last)
    shift = text[last] - backbone[last]
    torch.testing.assert_close(student.projection.weight @ shift, student.projection.bias, atol=1e-5, rtol=1e-4)
    assert torch.equal(weights["text.proj.weight"], student.projection.weight)
    # the image tower: the teacher's weights in open_clip's names
    hf = teacher.model.state_dict()
    layer = "vision_model.encoder.layers.1.self_attn."
    in_proj = torch.cat([hf[f"{layer}{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(weights["visual.transformer.resblocks.1.attn.in_proj_weight"], in_proj)
    assert torch.equal(weights["visual.proj"], hf["visual_projection.weight"].T)
    assert torch.equal(weights["logit_scale"], hf["logit_scale"])
    meta = json.loads((out / "mclip.json").read_text())
    assert meta["format"] == "mclip-open-clip" and meta["teacher"]["fingerprint"] == teacher.info().fingerprint
    checks = meta["verification"]["least_cosine"]
    assert "torch" in checks and all(v >= 0.9999 for check in checks.values() for v in check.values())
    assert result.text_cosine >= 0.9999 and result.image_cosine >= 0.9999 and result.fold_residual < 1e-9
    from mclip.store.verify import check_folder

    assert check_folder(out) == []  # checksums written last


def test_open_clips_forward_in_torch_equals_mclip_and_the_teacher(exported, teacher):
    """The check the export runs where open_clip does not import, on other texts and images than its own."""
    config, weights = read(exported["out"])
    cfg = config["model_cfg"]
    got = oc_export.torch_text(exported["out"], weights, cfg["text_cfg"], TEXTS).numpy()
    want = mclip.load(exported["student"]).encode(TEXTS)
    assert export.cosines(got, want).min() >= 0.9999
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert (unit @ unit.T)[np.triu_indices(len(TEXTS), 1)].max() < 0.999  # the texts differ: the check can fail
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    image = oc_export.torch_image(weights, cfg["vision_cfg"], cfg["quick_gelu"], pixels).numpy()
    with torch.no_grad():
        assert export.cosines(image, oc_export.image_features(teacher.model, pixels).numpy()).min() >= 0.9999


def test_a_dropped_bias_or_a_wrong_conversion_is_refused_and_nothing_written(backbones, record, tmp_path, monkeypatch):
    student = make_student(tmp_path / "final", backbones["bert"], "mean", {"teacher": record})
    config = ExportConfig(model=str(student), out=str(tmp_path / "oc"), format="open_clip", progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(oc_export, "fold_bias", lambda weight, bias: (torch.zeros(weight.shape[1]), 0.0))
        with pytest.raises(UserError, match=r"disagrees with mclip\.load\(model\)\.encode: cosine") as refused:
            export.run(config)
    assert "\n" not in str(refused.value) and not (tmp_path / "oc").exists()
    convert = oc_export.vision_weights

    def swap_q_and_k(model, name):
        weights = convert(model, name)
        q, k, v = weights["visual.transformer.resblocks.0.attn.in_proj_weight"].chunk(3)
        weights["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat([k, q, v])
        return weights

    monkeypatch.setattr(oc_export, "vision_weights", swap_q_and_k)
    with pytest.raises(UserError, match=r"disagrees with .*get_image_features: cosine"):
        export.run(config)
    assert not (tmp_path / "oc").exists() and not any(p.name.startswith(".oc") for p in tmp_path.iterdir())


def test_a_bias_outside_a_narrow_students_span_is_refused(record, tmp_path, cli_error):
    narrow = tiny.write_tiny_bert(tmp_path / "narrow", hidden=8, corpus=CORPUS, seed=3)  # 8 wide < 16 dims
    student = make_student(tmp_path / "final", narrow, "mean", {"teacher": record})
    err = cli_error(["export", str(student), "--format", "open_clip", "--out", str(tmp_path / "oc")])
    assert "bias cannot be folded" in err and "rank 8 < 16" in err and "--format onnx" in err
    assert not (tmp_path / "oc").exists()


def test_teachers_without_a_vision_tower_or_other_weights_are_refused(
    backbones, record, bert_teacher, clip_text_teacher, tmp_path, cli_error
):
    def refused(meta: dict, *args: str) -> str:
        student = make_student(tmp_path / "final", backbones["bert"], "mean", meta)
        return cli_error(["export", str(student), "--format", "open_clip", "--out", str(tmp_path / "oc"), *args])

    encoder = {"name": str(bert_teacher), "fingerprint": "0" * 32, "dim": 16, "kind": "encoder", "pooling": "mean"}
    assert "a text encoder (mean), not a CLIP" in refused({"teacher": encoder})
    assert "is a bert model without a vision tower" in refused({"teacher": record}, "--teacher", str(bert_teacher))
    assert "is a clip_text_model model without a vision tower" in refused(
        {"teacher": record}, "--teacher", str(clip_text_teacher)
    )
    other = tiny.write_tiny_clip(tmp_path / "other_clip", seed=1)
    assert "has other weights than" in refused({"teacher": record}, "--teacher", str(other))
    assert "records no teacher; pass --teacher" in refused({})
    assert not (tmp_path / "oc").exists()


def test_image_processors_and_vision_towers_open_clip_cannot_express_are_refused(teacher):
    import copy

    processor = type(teacher.image_processor)  # the PIL one: no torchvision here
    squash = processor(size={"height": 32, "width": 32}, do_center_crop=False)
    assert oc_export.preprocess_cfg(squash, 32, "tiny")["resize_mode"] == "squash"
    crop_after_resize = processor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    with pytest.raises(UserError, match=r"image processor \(resize \{'shortest_edge': 40\}"):
        oc_export.preprocess_cfg(crop_after_resize, 32, "tiny")
    config = copy.deepcopy(teacher.model.config)
    config.vision_config.hidden_act = "relu"
    with pytest.raises(UserError, match="activation relu"):
        oc_export.vision_cfg(config, "tiny")


def test_a_student_of_a_cache_without_images_exports_with_the_full_clip(backbones, clip_teacher, tmp_path):
    """A cache made without --image-column records the fingerprint of the text tower alone; the full CLIP matches it."""
    text_only = load_teacher(
        str(clip_teacher)
    ).info()  # CLIPTextModelWithProjection, as stage 1 without images loads it
    meta = {"teacher": {"name": str(clip_teacher), "fingerprint": text_only.fingerprint, "dim": 16, "kind": "clip"}}
    student = make_student(tmp_path / "final", backbones["bert"], "cls", meta)
    result = export.run(ExportConfig(model=str(student), out=str(tmp_path / "oc"), format="open_clip", progress=False))
    assert result.text_cosine >= 0.9999 and result.image_cosine >= 0.9999


def test_cli_export_open_clip_and_option_errors(exported, tmp_path, cli_error, capsys):
    from mclip.cli import main

    main(["export", str(exported["student"]), "--format", "open_clip", "--out", str(tmp_path / "oc")])
    err = capsys.readouterr().err
    assert (
        "(open_clip); least cosine to mclip.load(model).encode over" in err
        and (tmp_path / "oc" / "mclip.json").exists()
    )
    model = str(exported["student"])
    assert "applies to --format onnx only" in cli_error(
        ["export", model, "--format", "open_clip", "--quantize", "int8", "--out", str(tmp_path / "x")]
    )
    assert "teacher applies to --format open_clip only" in cli_error(
        ["export", model, "--teacher", "x", "--out", str(tmp_path / "x")]
    )
    (tmp_path / "t.txt").write_text("a dog\n", encoding="utf-8")
    assert "is an open_clip export: load it with open_clip" in cli_error(
        ["encode", "--model", str(exported["out"]), "--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "e")]
    )


# ---- open_clip itself (the second environment: .ci/open_clip) ----


@needs_open_clip
def test_open_clip_loads_the_export_with_mclips_text_and_the_teachers_image_embeddings(
    exported, teacher, tmp_path, monkeypatch
):
    from PIL import Image

    out = exported["out"]
    monkeypatch.chdir(tmp_path)  # hf_model_name is absolute: the folder loads from anywhere
    model, _, preprocess = OPEN_CLIP.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = OPEN_CLIP.get_tokenizer(f"local-dir:{out}")
    assert type(tokenizer).__name__ == "HFTokenizer" and type(model).__name__ == "CustomTextCLIP"
    model.eval()
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    pixels = teacher.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
        image = model.encode_image(pixels, normalize=True).numpy()
        want_image = oc_export.image_features(teacher.model, pixels).numpy()
    want_text = mclip.load(exported["student"]).encode(TEXTS)
    text_cos, image_cos = export.cosines(text, want_text), export.cosines(image, want_image)
    print(
        f"open_clip vs mclip / teacher, {exported['pooler']}: least cosine {text_cos.min():.7f} / {image_cos.min():.7f}"
    )
    assert text_cos.min() >= 0.9999 and image_cos.min() >= 0.9999
    assert model.logit_scale.item() == teacher.model.logit_scale.item()
    with torch.no_grad():  # open_clip hands the model over in train mode; without dropout that embeds the same
        np.testing.assert_allclose(model.train().encode_text(tokenizer(TEXTS), normalize=True).numpy(), text, atol=1e-6)
    model.eval()
    # open_clip's own transform gives the teacher processor's pixels (its resize, crop, mean and std)
    pixels_open_clip = torch.stack([preprocess(i) for i in images])
    torch.testing.assert_close(pixels_open_clip, pixels, atol=1e-5, rtol=1e-5)
    # the torch forward the export checks with where open_clip does not import is open_clip's forward
    config, weights = read(out)
    torch.testing.assert_close(
        oc_export.torch_text(out, weights, config["model_cfg"]["text_cfg"], TEXTS),
        model.encode_text(tokenizer(TEXTS)).detach(),
        atol=1e-5,
        rtol=1e-4,
    )
    # zero-shot classification as docs/open_clip.md writes it: the probabilities mclip and the teacher give
    labels = ["a photo of a dog", "ein Foto einer Katze", "一辆红色的汽车"]
    with torch.no_grad():
        one = model.encode_image(preprocess(images[0])[None], normalize=True)
        probs = (model.logit_scale.exp() * one @ model.encode_text(tokenizer(labels), normalize=True).T).softmax(-1)
        own = torch.from_numpy(mclip.load(exported["student"]).encode(labels))  # (3, D) unit vectors
        teacher_image = torch.nn.functional.normalize(torch.from_numpy(want_image[:1]), dim=-1)
        want_probs = (teacher.model.logit_scale.exp() * teacher_image @ own.T).softmax(-1)
    torch.testing.assert_close(probs, want_probs, atol=1e-4, rtol=1e-4)


@needs_open_clip
def test_clip_benchmarks_retrieval_on_the_export_equals_mclips_eval_retrieval(
    clip_teacher, backbones, tmp_path, monkeypatch
):
    """CLIP_benchmark's own zero-shot retrieval (its CLI, its multilingual_mscoco_captions layout) on the export, and
    stage 3's text->image recall of the student against the teacher's cached image embeddings: the same numbers."""
    from PIL import Image

    from mclip.embed import run as embed_teacher
    from mclip.evaluate import run as eval_retrieval

    rng = np.random.default_rng(3)
    n, languages = 24, ("de", "zh")
    rows = []
    for i in range(n):
        path = tmp_path / "images" / f"{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append(
            {
                "id": f"c{i:03d}",
                "caption": f"{tiny.CORPUS[i % len(tiny.CORPUS)]} {i}",
                "caption_de": f"{CORPUS[(i + 6) % len(CORPUS)]} {i}",
                "caption_zh": f"{tiny.CORPUS[(8 + i) % len(tiny.CORPUS)]} 第{i}",
                "image": str(path),
            }
        )
    data = tiny.write_captions(tmp_path / "data.jsonl", rows)
    cache = embed_teacher.run(
        EmbedConfig(
            data=str(data),
            out=str(tmp_path / "cache"),
            teacher=str(clip_teacher),
            id_column="id",
            image_column="image",
            dtype="float32",
            progress=False,
        )
    )
    student = make_student(tmp_path / "final", backbones["xlmr"], "mean", {"teacher": cache.manifest["teacher"]})
    out = tmp_path / "open_clip"
    export.run(ExportConfig(model=str(student), out=str(out), format="open_clip", progress=False))
    ks = (1, 3, 5, 10)
    ours = eval_retrieval.run(
        EvalConfig(
            model=str(student),
            cache=str(tmp_path / "cache"),
            data=str(data),
            out=str(tmp_path / "eval"),
            languages=languages,
            split="train",  # a local file is one split, named train
            ks=ks,
            progress=False,
        )
    ).metrics
    root = tmp_path / "clip_benchmark"
    root.mkdir()
    for (
        lang
    ) in languages:  # the annotation file CLIP_benchmark reads for multilingual_mscoco_captions, one per language
        annotations = {"image_paths": [r["image"] for r in rows], "annotations": [r[f"caption_{lang}"] for r in rows]}
        (root / f"multilingual_mscoco_captions-{lang}.json").write_text(json.dumps(annotations, ensure_ascii=False))
        result = tmp_path / f"clip_benchmark_{lang}.json"
        command = [
            *(sys.executable, "-m", "clip_benchmark.cli", "eval"),
            *("--dataset", "multilingual_mscoco_captions", "--language", lang, "--dataset_root", str(root)),
            *("--task", "zeroshot_retrieval", "--model_type", "open_clip", "--model", f"local-dir:{out}"),
            *("--recall_k", *map(str, ks), "--no_amp", "--num_workers", "0", "--batch_size", "8"),
            *("--output", str(result), "--quiet"),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        theirs = json.loads(result.read_text())["metrics"]
        got = [theirs[f"image_retrieval_recall@{k}"] for k in ks]
        want = [ours[f"{lang}/text_to_image/R@{k}"] for k in ks]
        print(f"{lang}: CLIP_benchmark text->image R@{ks} {got}, mclip eval-retrieval {want}")
        assert got == pytest.approx(want, abs=1e-6)
        assert 0 < got[-1] < 1  # neither every caption found nor none: the figures say something
