"""The bundled emoji caption set in data/emoji: loadable, well-formed, split by concept, and rebuilt byte for byte."""

import json
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "data" / "emoji"
SCRIPT = ROOT / "data" / "build_emoji.py"
SPLITS = ("train", "validation", "test")
SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


@pytest.fixture(scope="module")
def meta():
    return json.loads((BUNDLE / "meta.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import datasets

    files = {split: str(BUNDLE / f"{split}.jsonl") for split in SPLITS}
    return datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


def test_splits_load_with_datasets_in_the_parallel_format(bundle, meta):
    expected = ["id", "caption"] + [f"caption_{lang}" for lang in meta["languages"] if lang != "en"]
    assert meta["languages"][0] == "en" and len(meta["languages"]) == 14
    for split in SPLITS:
        assert bundle[split].column_names == expected, split
        assert bundle[split].num_rows == meta["rows"][split], split
    assert bundle["test"].num_rows == 300


def test_ids_are_unique_and_splits_disjoint(bundle):
    ids = {split: bundle[split]["id"] for split in SPLITS}
    for split, values in ids.items():
        assert len(set(values)) == len(values), f"duplicate ids in {split}"
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])


def test_captions_are_plain_non_empty_phrases(bundle):
    for split in SPLITS:
        for row in bundle[split]:
            for column, text in row.items():
                assert isinstance(text, str) and text.strip() == text and text, (
                    f"{split} {row['id']} {column}: {text!r}"
                )
                if column != "id":
                    assert "_" not in text and not text.startswith(":"), (
                        f"slug left in {split} {row['id']} {column}: {text!r}"
                    )


def test_one_row_per_concept_without_skin_tones(bundle):
    for split in SPLITS:
        glyphs = ["".join(chr(int(h, 16)) for h in concept.split("-")) for concept in bundle[split]["id"]]
        assert not [g for g in glyphs if SKIN_TONES & set(g)], split
        captions = [c.casefold() for c in bundle[split]["caption"]]
        assert len(set(captions)) == len(captions), f"two concepts share an English caption in {split}"


def test_rebuild_gives_byte_identical_files_without_torch(tmp_path, meta):
    emoji = pytest.importorskip("emoji", reason="the rebuild needs the emoji package (pip install emoji)")
    if emoji.__version__ != meta["emoji_version"]:
        pytest.skip(
            f"installed emoji {emoji.__version__} differs from the {meta['emoji_version']} the bundle was built from"
        )
    # run the script as the README says, in a fresh interpreter, and check it never pulled in torch
    done = tiny.run_script_without_torch(SCRIPT, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "300 rows" in done.stdout
    for name in [f"{split}.jsonl" for split in SPLITS] + ["meta.json"]:
        assert (tmp_path / name).read_bytes() == (BUNDLE / name).read_bytes(), f"{name} differs from the bundled file"


def test_the_test_extra_pins_the_versions_the_bundles_were_built_with():
    """The rebuild tests skip unless emoji and babel are exactly the versions data/*/meta.json name: `[test]` pins
    them, so a CI install runs them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    built = {
        "emoji": json.loads((ROOT / "data" / "emoji" / "meta.json").read_text(encoding="utf-8"))["emoji_version"],
        "babel": json.loads((ROOT / "data" / "ood" / "meta.json").read_text(encoding="utf-8"))["babel_version"],
    }
    assert {f"{name}=={version}" for name, version in built.items()} <= set(extra["test"]), extra["test"]
