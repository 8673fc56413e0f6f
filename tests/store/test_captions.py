"""mclip.store.captions: every input format loads to the same rows (bad inputs are one-line UserErrors), and
CaptionFile, the one reader of stage 2's and stage 3's caption files: formats, blanks, chunks, errors."""

import numpy as np
import pytest

from mclip.errors import UserError
from mclip.store.captions import CaptionFile, load_dataset, require_columns
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


# ---- loading with datasets ----

LOAD_ROWS = [{"id": f"c{i}", "caption": f"caption number {i}", "n": i} for i in range(6)]


@pytest.fixture(scope="module")
def hf_rows():
    import datasets

    return datasets.Dataset.from_list(LOAD_ROWS)


def _rows(ds):
    return [{k: r[k] for k in ("id", "caption")} for r in ds]


def _expected(rows=LOAD_ROWS):
    return [{"id": r["id"], "caption": r["caption"]} for r in rows]


def test_jsonl_csv_parquet_files(tmp_path, hf_rows):
    hf_rows.to_json(tmp_path / "rows.jsonl")
    hf_rows.to_csv(tmp_path / "rows.csv", index=False)
    hf_rows.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.tsv").write_text(
        "id\tcaption\n" + "".join(f"{r['id']}\t{r['caption']}\n" for r in LOAD_ROWS), encoding="utf-8"
    )
    for name in ("rows.jsonl", "rows.csv", "rows.parquet", "rows.tsv"):
        assert _rows(load_dataset(str(tmp_path / name))) == _expected(), name


@pytest.mark.parametrize("name, sep", [("ids.csv", ","), ("ids.tsv", "\t")])
def test_csv_ids_keep_their_string_form(tmp_path, name, sep):
    """Ids 000, 001 read from a CSV were the integers 0, 1 (pandas' inference), and a cache keyed '0' joined no caption
    file that wrote them as the strings they are."""
    path = tmp_path / name
    path.write_text(
        "id" + sep + "caption\n" + "".join(f"{i:03d}{sep}caption {i}\n" for i in range(12)), encoding="utf-8"
    )
    ds = load_dataset(str(path))
    assert ds["id"] == [f"{i:03d}" for i in range(12)] and ds["caption"][0] == "caption 0"


def test_a_split_other_than_train_is_refused_for_local_files(tmp_path, hf_rows):
    """A split names nothing in a local file: eval-retrieval's default 'test' read all of it and recorded 'test'."""
    hf_rows.to_json(tmp_path / "rows.jsonl")
    for data in (str(tmp_path / "rows.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path)):
        with pytest.raises(UserError, match=r"^split 'test' does not apply to .*; pass --split train"):
            load_dataset(data, split="test")
        assert _rows(load_dataset(data, split="train")) == _expected()


def test_save_to_disk_dataset_and_dataset_dict(tmp_path, hf_rows):
    import datasets

    hf_rows.save_to_disk(str(tmp_path / "plain"))
    assert _rows(load_dataset(str(tmp_path / "plain"))) == _expected()
    splits = {"train": hf_rows.select(range(2)), "validation": hf_rows.select(range(2, 6))}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    assert _rows(load_dataset(str(tmp_path / "dict"), split="validation")) == _expected(LOAD_ROWS[2:])
    assert _rows(load_dataset(str(tmp_path / "dict"))) == _expected(LOAD_ROWS[:2])
    with pytest.raises(UserError, match=r"split 'test' not in .*it has train, validation \(use --split\)"):
        load_dataset(str(tmp_path / "dict"), split="test")


def test_glob_and_folder_of_files(tmp_path, hf_rows):
    hf_rows.select(range(3)).to_json(tmp_path / "part-0.jsonl")
    hf_rows.select(range(3, 6)).to_json(tmp_path / "part-1.jsonl")
    assert _rows(load_dataset(str(tmp_path / "part-*.jsonl"))) == _expected()
    assert _rows(load_dataset(str(tmp_path))) == _expected()


def test_missing_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "nope-*.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no dataset files"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match="cannot tell the format"):
        load_dataset(str(tmp_path / "notes.md"))


def test_zero_row_inputs_are_one_line_errors(tmp_path, hf_rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.jsonl").write_bytes(b"")
    pq.write_table(pa.table({"caption": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "empty.parquet"):
        with pytest.raises(UserError, match="is empty \\(zero rows\\)"):
            load_dataset(str(tmp_path / name))
    empty = hf_rows.select([])
    empty.save_to_disk(str(tmp_path / "empty_ds"))
    with pytest.raises(UserError, match="has zero rows"):
        load_dataset(str(tmp_path / "empty_ds"))
    # an empty split beside a full one: the full one still loads
    datasets.DatasetDict({"train": hf_rows, "test": empty}).save_to_disk(str(tmp_path / "dict"))
    assert _rows(load_dataset(str(tmp_path / "dict"))) == _expected()
    with pytest.raises(UserError, match="split 'test'\\) has zero rows"):
        load_dataset(str(tmp_path / "dict"), split="test")


@pytest.mark.parametrize(
    "name,payload",
    [
        ("latin1.jsonl", '{"id": "a", "caption": "ok"}\n{"id": "b", "caption": "café au lait"}\n'),
        ("latin1.csv", "id,caption\na,ok\nb,café au lait\n"),
    ],
)
def test_non_utf8_text_is_refused(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload.encode("latin-1"))
    with pytest.raises(UserError, match="is not valid UTF-8 text.*re-encode the file as UTF-8") as err:
        load_dataset(str(path))
    assert "\n" not in str(err.value)
    if name.endswith(".jsonl"):
        assert "column 'caption', row 1" in str(err.value)


def test_utf8_check_names_the_row_slice_by_slice_and_gives_its_pages_back(tmp_path, monkeypatch):
    # the check goes a slice of rows at a time (dropping the mapped pages it touched after each): the bad row's number
    # is still the row of the file, here in the third slice of 4 rows
    from mclip.store import captions

    dropped = []
    monkeypatch.setattr(captions, "UTF8_ROWS", 4)
    monkeypatch.setattr("mclip.store.captions.drop_mapped_pages", lambda files: dropped.append(list(files)))
    rows = ['{"id": "%d", "caption": "ok %d"}' % (i, i) for i in range(11)]
    rows[9] = '{"id": "9", "caption": "café"}'  # é as one latin-1 byte: not UTF-8
    path = tmp_path / "rows.jsonl"
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(UserError, match="column 'caption', row 9"):
        load_dataset(str(path))
    assert len(dropped) >= 3 and all(dropped)  # once per slice checked, naming the dataset's Arrow files


def test_malformed_json_is_one_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"id": "a", "caption": "ok"}\n{"id": "b", "caption": \n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_dataset(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_require_columns_names_what_exists(hf_rows):
    require_columns(hf_rows, {"--caption-column": "caption", "--id-column": None}, "rows.jsonl")
    with pytest.raises(
        UserError, match=r"column 'text' not found in rows.jsonl; it has id, caption, n \(use --caption-column\)"
    ):
        require_columns(hf_rows, {"--caption-column": "text"}, "rows.jsonl")
