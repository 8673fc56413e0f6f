"""The bundled out-of-domain test sets in data/ood: loadable, well-formed, apart from data/emoji, CLDR part rebuilt byte for byte."""

import json
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "data" / "ood"
SCRIPT = ROOT / "data" / "build_ood.py"
EMOJI = ROOT / "data" / "emoji"
ALL = ("en", "es", "ja", "ko", "pt", "it", "fr", "de", "fa", "id", "zh", "ru", "tr", "ar")
EXPECTED = {
    "cldr_languages.jsonl": ALL,
    "cldr_units.jsonl": ALL,  # ddtp.jsonl is optional (its licence is not settled)
    "ddtp.jsonl": ("en", "es", "ja", "ko", "pt", "it", "fr", "de", "zh", "ru"),
}
CLDR = ("cldr_languages.jsonl", "cldr_units.jsonl")


@pytest.fixture(scope="module")
def meta():
    return json.loads((BUNDLE / "meta.json").read_text(encoding="utf-8"))


def _files():
    return [name for name in EXPECTED if name in CLDR or (BUNDLE / name).exists()]


def _rows(name):
    return [json.loads(line) for line in (BUNDLE / name).read_text(encoding="utf-8").splitlines()]


def _column(lang):
    return "caption" if lang == "en" else f"caption_{lang}"


@pytest.mark.parametrize("name", _files())
def test_file_has_its_languages_and_matches_meta(name, meta):
    rows = _rows(name)
    columns = ["id"] + [_column(lang) for lang in EXPECTED[name]]
    assert all(list(row) == columns for row in rows), f"{name}: every row has exactly {columns}, in that order"
    info = meta["files"][name]
    assert info["languages"] == list(EXPECTED[name]) and info["rows"] == len(rows) and info["licence"]
    for lang in EXPECTED[name]:
        texts = [row[_column(lang)] for row in rows if row[_column(lang)] is not None]
        assert len(texts) == info["captions"][lang], f"{name} {lang}"
        assert len(texts) >= 0.5 * len(rows), f"{name} {lang}: only {len(texts)} of {len(rows)} captions"
        assert all(isinstance(t, str) and t and t.strip() == t for t in texts), f"{name} {lang}"
        assert len({t.casefold() for t in texts}) == len(texts), f"{name} {lang}: two rows share a caption"
    assert all(row["caption"] for row in rows), f"{name}: every row has its English"


@pytest.mark.parametrize("name", _files())
def test_ids_are_unique_sorted_and_apart_from_emoji(name):
    ids = [row["id"] for row in _rows(name)]
    emoji_ids = {
        json.loads(line)["id"]
        for split in ("train", "validation", "test")
        for line in (EMOJI / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    }
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert not set(ids) & emoji_ids
    prefix = {"cldr_languages.jsonl": "cldr-lang-", "cldr_units.jsonl": "cldr-unit-", "ddtp.jsonl": "ddtp-"}[name]
    assert all(i.startswith(prefix) for i in ids)


def test_no_caption_occurs_inside_a_training_caption(meta):
    """The build's leak rule, in every language: no kept caption is a case-folded substring of an emoji training caption."""
    train = [json.loads(line) for line in (EMOJI / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    for name in _files():
        rows = _rows(name)
        for lang in EXPECTED[name]:
            joined = "\n".join(row[_column(lang)].casefold() for row in train)
            leaked = [
                row[_column(lang)] for row in rows if row[_column(lang)] and row[_column(lang)].casefold() in joined
            ]
            assert not leaked, f"{name} {lang}: {leaked[:5]} occur in data/emoji/train.jsonl"
            assert meta["files"][name]["overlap_with_training"][lang]["inside_a_training_caption"] == 0


def test_files_load_with_the_mclip_loader():
    from mclip.store.captions import CaptionFile

    for name in _files():
        captions = CaptionFile(
            str(BUNDLE / name),
            "train",
            EXPECTED[name],
            id_column="id",
            template="caption_{lang}",
            english_column="caption",
        )
        rows = _rows(name)
        for lang in EXPECTED[name]:
            assert len(captions.texts(lang)[0]) == sum(row[_column(lang)] is not None for row in rows), f"{name} {lang}"


def test_cldr_part_rebuilds_byte_identical_without_torch(tmp_path, meta):
    babel = pytest.importorskip("babel", reason="the rebuild needs babel (pip install babel)")
    if babel.__version__ != meta["babel_version"]:
        pytest.skip(
            f"installed babel {babel.__version__} differs from the {meta['babel_version']} the bundle was built from"
        )
    done = tiny.run_script_without_torch(SCRIPT, "--skip-ddtp", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    rebuilt = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    for name in CLDR:
        assert (tmp_path / name).read_bytes() == (BUNDLE / name).read_bytes(), f"{name} differs from the bundled file"
        assert rebuilt["files"][name] == meta["files"][name], f"meta.json's {name} entry differs"
    assert not (tmp_path / "ddtp.jsonl").exists()
