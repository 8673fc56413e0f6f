"""mclip.data: every input format loads to the same rows; bad inputs are one-line UserErrors."""

import pytest

from mclip.data import load_dataset, require_columns
from mclip.errors import UserError

ROWS = [{"id": f"c{i}", "caption": f"caption number {i}", "n": i} for i in range(6)]


@pytest.fixture(scope="module")
def hf_rows():
    import datasets

    return datasets.Dataset.from_list(ROWS)


def _rows(ds):
    return [{k: r[k] for k in ("id", "caption")} for r in ds]


def _expected(rows=ROWS):
    return [{"id": r["id"], "caption": r["caption"]} for r in rows]


def test_jsonl_csv_parquet_files(tmp_path, hf_rows):
    hf_rows.to_json(tmp_path / "rows.jsonl")
    hf_rows.to_csv(tmp_path / "rows.csv", index=False)
    hf_rows.to_parquet(tmp_path / "rows.parquet")
    (tmp_path / "rows.tsv").write_text(
        "id\tcaption\n" + "".join(f"{r['id']}\t{r['caption']}\n" for r in ROWS), encoding="utf-8"
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
    assert _rows(load_dataset(str(tmp_path / "dict"), split="validation")) == _expected(ROWS[2:])
    assert _rows(load_dataset(str(tmp_path / "dict"))) == _expected(ROWS[:2])
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
    from mclip import data

    dropped = []
    monkeypatch.setattr(data, "CHUNK_ROWS", 4)
    monkeypatch.setattr("mclip.columns.drop_mapped_pages", lambda files: dropped.append(list(files)))
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
