"""mclip.evaluate.captions: each language's captions joined to the teacher cache by id, as row files on disk, against a
dict oracle, a few rows at a time; --limit; English from the cache when the data has none; a join of nothing refused."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mclip.config import EvalConfig
from mclip.errors import UserError
from mclip.evaluate import captions
from mclip.store import captions as store_captions
from mclip.store import join
from tests.store.test_shards import _write_cache


def _data(n: int = 23) -> list[dict]:
    """Ids r0..r{n-1} shuffled, some not in a 9-row cache (r9 and above), some captions empty."""
    rng = np.random.default_rng(0)
    rows = []
    for i in rng.permutation(n):
        rows.append(
            {
                "id": f"r{i}",
                "caption_de": "" if i % 5 == 1 else f"de {i}",
                "caption_fr": None if i % 4 == 3 else f"fr {i}",
            }
        )
    return rows


def _join(tmp_path, rows, languages=("de", "fr"), limit=None):
    cache = _write_cache(tmp_path / "cache", sizes=(5, 4))  # ids r0..r8, English text "caption 0".."caption 8"
    data = (
        tmp_path / "data.parquet"
    )  # row groups of 2: the data's Arrow file holds batches of 2 rows, read a few at a time
    pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=2)
    config = EvalConfig(
        model="m",
        cache=str(cache.path),
        data=str(data),
        split="train",  # the one split datasets names a local file
        out=str(tmp_path / "out"),
        languages=languages,
        limit=limit,
    )
    (tmp_path / "rows").mkdir()
    index = join.IdIndex.build(cache, tmp_path / "ids")
    return captions.join(config, cache, index, [*languages, "en"], tmp_path / "rows")


def _oracle(rows, lang):
    """(text, cache row) of each non-empty caption whose id is in the cache, in data order; and the ids not in it."""
    cache_row = {f"r{i}": i for i in range(9)}
    texts = [(r["id"], r[f"caption_{lang}"]) for r in rows if (r[f"caption_{lang}"] or "").strip()]
    return [(t, cache_row[i]) for i, t in texts if i in cache_row], sum(i not in cache_row for i, _ in texts)


@pytest.mark.parametrize("block", [3, 1 << 16])
def test_each_language_is_joined_as_a_dict_would_join_it(tmp_path, monkeypatch, block):
    monkeypatch.setattr(captions, "BLOCK", block)
    monkeypatch.setattr(store_captions, "CHUNK", block)
    rows = _data()
    joined, notes = _join(tmp_path, rows)
    assert list(joined) == ["de", "fr", "en"]
    for lang in ("de", "fr"):
        want, missing = _oracle(rows, lang)
        got = joined[lang]
        assert list(zip(got.texts(0, len(got)), np.asarray(got.rows).tolist())) == want
        assert got.missing == missing and missing > 0
        assert got.empty == sum(not (r[f"caption_{lang}"] or "").strip() for r in rows)
        assert any(note.startswith(f"{lang}: {missing:,} of ") for note in notes)
    # no English column in the data: the cache's own text of every id another language scored, once, first scored first
    scored = [row for lang in ("de", "fr") for _, row in _oracle(rows, lang)[0]]
    first = list(dict.fromkeys(scored))
    en = joined["en"]
    assert np.asarray(en.rows).tolist() == first and en.texts(0, len(en)) == [f"caption {r}" for r in first]


def test_limit_keeps_the_first_captions_of_each_language(tmp_path):
    rows = _data()
    joined, _ = _join(tmp_path, rows, limit=3)
    for lang in ("de", "fr"):
        got = joined[lang]
        assert list(zip(got.texts(0, len(got)), np.asarray(got.rows).tolist())) == _oracle(rows, lang)[0][:3]
    assert len(joined["en"]) == 3


def test_a_join_of_nothing_is_one_line(tmp_path):
    rows = [{"id": f"x{i}", "caption_de": f"de {i}", "caption_fr": f"fr {i}"} for i in range(4)]
    with pytest.raises(
        UserError, match=r"^none of the ids in .*data.parquet \(e.g. 'x0', " r"column 'id'\) are in cache .*"
    ):
        _join(tmp_path, rows)
