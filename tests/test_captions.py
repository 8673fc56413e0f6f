"""mclip.captions.CaptionFile, the one reader of stage 2's and stage 3's caption files: formats, blanks, chunks, errors."""

import numpy as np
import pytest

from mclip.captions import CaptionFile
from mclip.errors import UserError
from tests import tiny

ROWS = [
    {
        "id": f"i{k}",
        "caption": f"en {k}",
        "caption_de": ["de", " ", None, "de 3", "", "de 5", "de 6"][k],
        "caption_fr": f"fr {k}",
    }
    for k in range(7)
]


def _read(reader, lang, size):
    """(ids of the rows kept, rows of the language) over every chunk of `size` rows."""
    kept, in_lang = [], 0
    for first, ids, part in reader.chunks(size):
        keep, rows = reader.kept(part, lang)
        kept += ids.take(keep).to_pylist()
        in_lang += rows
    return kept, in_lang


def test_wide_and_long_files_give_the_same_captions_in_chunks_of_any_size(tmp_path):
    wide = CaptionFile(
        str(tiny.write_captions(tmp_path / "wide.jsonl", ROWS)),
        "train",
        ["de", "fr"],
        id_column="id",
        template="caption_{lang}",
    )
    long_rows = [{"id": r["id"], "lang": lang, "text": r[f"caption_{lang}"]} for lang in ("fr", "de") for r in ROWS]
    long = CaptionFile(
        str(tiny.write_captions(tmp_path / "long.jsonl", long_rows)),
        "train",
        ["de", "fr"],
        id_column="id",
        template="caption_{lang}",
    )
    assert not wide.long and wide.columns == {"de": "caption_de", "fr": "caption_fr"} and long.long
    for size in (1, 3, 100):
        assert _read(wide, "de", size) == (["i0", "i3", "i5", "i6"], 7)  # " ", None and "" are blank: left out, counted
        assert _read(long, "de", size) == (["i0", "i3", "i5", "i6"], 7)
        assert _read(long, "fr", size) == ([f"i{k}" for k in range(7)], 7)
    assert wide.source("de").take(np.array([5, 0])).to_pylist() == ["de 5", "de"]


def test_english_column_optional_languages_and_the_errors(tmp_path):
    data = str(tiny.write_captions(tmp_path / "wide.jsonl", ROWS))
    reader = CaptionFile(
        data,
        "train",
        ["de"],
        id_column="id",
        template="caption_{lang}",
        english_column="caption",
        optional=("en", "ja"),
    )
    assert reader.columns == {"de": "caption_de", "en": "caption"}  # ja has no column: optional, so left out
    with pytest.raises(
        UserError,
        match=r"column 'caption_ja' for language 'ja' not found in .*wide.jsonl; it has id, caption, "
        r"caption_de, caption_fr \(fix --languages or --text-column-template; or give the long format: columns id, "
        r"lang, text\)$",
    ):
        CaptionFile(data, "train", ["ja"], id_column="id", template="caption_{lang}")
    no_lang = tiny.write_captions(tmp_path / "no_lang.jsonl", [{"id": "a", "text": "x"}])  # long, but no lang column
    with pytest.raises(
        UserError,
        match=r"^column 'caption_de' for language 'de' not found in .*no_lang.jsonl; it has id, text \(fix --languages "
        r"or --text-column-template; the long format needs columns 'lang' and 'text' by the id: it has no 'lang'\)$",
    ):
        CaptionFile(str(no_lang), "train", ["de"], id_column="id", template="caption_{lang}")
    with pytest.raises(UserError, match=r"column 'key' not found in .*; it has id, .* \(use --id-column\)"):
        CaptionFile(data, "train", ["de"], id_column="key", template="caption_{lang}")
    long = tiny.write_captions(
        tmp_path / "long.jsonl", [{"id": "a", "lang": "de", "text": "x"}, {"id": "b", "lang": "zh", "text": "y"}]
    )
    reader = CaptionFile(str(long), "train", ["de", "ja"], id_column="id", template="caption_{lang}")
    with pytest.raises(
        UserError, match=r"language 'ja' has no rows in .*long.jsonl \(column 'lang' has de, zh\); fix --languages"
    ):
        list(reader.chunks())
