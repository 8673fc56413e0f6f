"""mclip.embed.inputs: stage 1's input rows (read by range, their pages given back), the unique-id check and --strict
chunk by chunk, caption strings and image keys."""

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pytest

from mclip.embed import inputs
from mclip.errors import UserError
from mclip.store.captions import load_dataset
from tests import tiny


def _rows(tmp_path, rows: list[dict]) -> inputs.Rows:
    return inputs.Rows(load_dataset(str(tiny.write_captions(tmp_path / "rows.jsonl", rows))))


def test_ids_are_checked_unique_and_non_empty_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 4)  # 30 rows: 8 chunks; a duplicate's two rows lie in different chunks
    ids = [f"id{i}" for i in range(30)]
    rows = _rows(tmp_path, [{"id": i, "caption": "c"} for i in ids])
    inputs.check_ids(rows, "id", 30, tmp_path / "work")  # unique: no error
    inputs.check_ids(rows, None, 30, tmp_path / "work")  # row numbers: nothing to check
    assert not (tmp_path / "work").exists()  # the spill goes afterwards
    ids[25] = "id2"
    rows = _rows(tmp_path / "dup", [{"id": i, "caption": "c"} for i in ids])
    with pytest.raises(UserError, match=r"^id 'id2' appears more than once in column 'id' \(rows 2 and 25\)"):
        inputs.check_ids(rows, "id", 30, tmp_path / "work")
    inputs.check_ids(rows, "id", 25, tmp_path / "work")  # only the first n rows count
    assert not (tmp_path / "work").exists()


def test_strict_names_the_first_blank_caption_by_id_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 3)
    captions = ["a dog", "red apple", "x", "y", "z", " \t", "w", None]
    rows = _rows(tmp_path, [{"id": f"k{i}", "caption": c} for i, c in enumerate(captions)])
    inputs.check_strict(rows, "caption", "id", 5)  # the first five are all text
    with pytest.raises(UserError, match=r"^caption of id 'k5' \(row 5\) is empty; fill it, or drop --strict"):
        inputs.check_strict(rows, "caption", "id", 8)
    with pytest.raises(UserError, match=r"^caption of id '5' \(row 5\)"):  # without an id column: the row number
        inputs.check_strict(rows, "caption", None, 8)


def test_caption_strings_refuse_numbers_naming_the_row():
    assert inputs.caption_strings(pa.array(["a", None]), "caption", 0).to_pylist() == ["a", None]
    assert inputs.caption_strings(pa.nulls(3), "caption", 0).to_pylist() == [None] * 3
    with pytest.raises(UserError, match=r"caption column 'n' holds int64 values \(row 12\)"):
        inputs.caption_strings(pa.array([None, None, 7, 8]), "n", 10)


def test_an_image_has_one_key_as_bytes_path_or_dataset_dict(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 10)).save(buffer, format="PNG")
    data = buffer.getvalue()
    (tmp_path / "red.png").write_bytes(data)
    keys = [inputs.image_key(x) for x in (data, str(tmp_path / "red.png"), {"bytes": data, "path": None})]
    assert {key for _, key in keys} == {hashlib.sha1(data).hexdigest()}
    assert all(image.size == (4, 3) and image.getpixel((0, 0)) == (200, 10, 10) for image, _ in keys)
    same, other = (inputs.image_key(Image.new("RGB", (4, 3), c))[1] for c in ((1, 2, 3), (1, 2, 4)))
    assert same != other
    with pytest.raises(UserError, match="cannot read image .*missing.png"):
        inputs.image_key(str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="image column holds int values"):
        inputs.image_key(3)


def _mapped_kb(path: str) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == path:
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_released_rows_leave_the_resident_set_and_stay_readable(tmp_path):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"caption number {i} " + "x" * (i % 50) for i in range(40_000)]
    pq.write_table(pa.table({"caption": texts}), tmp_path / "rows.parquet")
    rows = inputs.Rows(load_dataset(str(tmp_path / "rows.parquet")))
    (path,) = rows.files
    assert path == os.path.realpath(path)
    before = rows[0 : len(rows)]["caption"].to_pylist()
    assert _mapped_kb(path) > 1000  # the pages read are resident...
    rows.release()
    assert _mapped_kb(path) == 0  # ...until released
    assert rows[0 : len(rows)]["caption"].to_pylist() == before == texts  # and read again from the file
