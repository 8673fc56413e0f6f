"""mclip.embed.dedup: stage 1's plan (caption groups, distinct-caption units, slots) and the sort-based id check, against a
dict oracle, through several partitions, row buckets and input chunks, and under forced hash collisions."""

import json
from pathlib import Path

import numpy as np
import pytest

from mclip.config import EmbedConfig
from mclip.embed import dedup, inputs
from mclip.errors import UserError
from mclip.store import spill
from mclip.store.captions import load_dataset
from tests import tiny


@pytest.fixture
def small_parts(monkeypatch):
    """Partitions of ~4 records, row buckets of 8 rows and input chunks of 5 rows: every multi-part path runs."""
    monkeypatch.setattr(spill, "PARTITION_ROWS", 4)
    monkeypatch.setattr(dedup, "BUCKET_ROWS", 8)
    monkeypatch.setattr(inputs, "CHUNK_ROWS", 5)


def _rows(tmp_path, captions, ids=None):
    rows = [{"id": ids[i] if ids else f"k{i}", "caption": c} for i, c in enumerate(captions)]
    config = EmbedConfig(
        data=str(tiny.write_captions(tmp_path / "rows.jsonl", rows)),
        out=str(tmp_path / "out"),
        teacher="t",
        id_column="id",
        shard_size=3,
    )
    ds = load_dataset(config.data)
    return inputs.Rows(ds), len(ds), config


def _captions(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    pool = [
        "red apple",
        "green tree",
        "a dog",
        "a photo of a dog",
        "red apple ",
        "",
        None,
        "  ",
        "blue car",
        "Red apple",
    ]
    return [pool[i] for i in rng.integers(0, len(pool), n)]


def _oracle(captions: list) -> list[int]:
    first: dict[str, int] = {}
    return [-1 if c is None or not c.strip() else first.setdefault(c, i) for i, c in enumerate(captions)]


def test_caption_groups_units_and_slots_match_a_dict(tmp_path, small_parts):
    captions = _captions(41)
    rows, n, config = _rows(tmp_path, captions)
    plan = dedup.build(rows, n, config, tmp_path / "out", "fp")
    groups = plan.groups(0, n)
    assert groups.tolist() == _oracle(captions)
    assert plan.groups(7, 20).tolist() == groups[7:20].tolist()  # a shard's range, read on its own
    kept = groups >= 0
    assert plan.distinct == len(set(groups[kept].tolist())) == 7  # "red apple " and "Red apple" are other captions
    slots = plan.slots(0, n)
    assert (slots[~kept] == -1).all() and sorted(set(slots[kept].tolist())) == list(range(plan.distinct))
    for i in np.flatnonzero(kept):  # same slot exactly when same caption
        assert ((slots == slots[i]) == (groups == groups[i])).all()
    units, positions = plan.locate(slots[kept])
    texts = {u: plan.unit_texts(u).to_pylist() for u in range(plan.units)}
    assert all(len(t) <= config.shard_size for t in texts.values()) and sum(map(len, texts.values())) == plan.distinct
    assert [texts[u][p] for u, p in zip(units, positions)] == [c for c, k in zip(captions, kept) if k]
    assert plan.needed_units([(0, 3)]) == sorted(set(plan.locate(slots[:3][kept[:3]])[0].tolist()))
    assert sorted(p.name for p in (tmp_path / "out" / dedup.PLAN).iterdir()) == sorted(
        ["plan.json", "group.bin", "slot.bin", *(f"distinct-{p:05d}.arrow" for p in range(len(plan.meta["base"]) - 1))]
    )


def test_a_hash_collision_never_merges_captions_or_invents_a_duplicate_id(tmp_path, small_parts, monkeypatch):
    monkeypatch.setattr(dedup, "hash64", lambda strings: np.full(len(strings), 7, np.uint64))  # every string collides
    captions = _captions(23, seed=1)
    rows, n, config = _rows(tmp_path, captions)
    plan = dedup.build(rows, n, config, tmp_path / "out", "fp")  # 23 distinct ids: no duplicate found
    assert plan.groups(0, n).tolist() == _oracle(captions)
    rows, n, config = _rows(tmp_path, captions[:6], ids=["a", "b", "c", "d", "b", "e"])
    with pytest.raises(
        UserError, match=r"^id 'b' appears more than once in column 'id' \(rows 1 and 4\); ids must be unique"
    ):
        dedup.build(rows, n, config, tmp_path / "out", "fp")


def test_duplicate_and_empty_ids_are_one_line_and_leave_no_plan(tmp_path, small_parts):
    captions = _captions(30, seed=2)
    ids = [f"id{i}" for i in range(30)]
    ids[27] = "id3"
    rows, n, config = _rows(tmp_path, captions, ids)
    with pytest.raises(UserError, match=r"^id 'id3' appears more than once in column 'id' \(rows 3 and 27\)") as err:
        dedup.build(rows, n, config, tmp_path / "out", "fp")
    assert "\n" not in str(err.value) and not (tmp_path / "out" / dedup.PLAN).exists()
    ids[27] = None
    rows, n, config = _rows(tmp_path, captions, ids)
    with pytest.raises(UserError, match=r"^id column 'id' is empty at row 27; fill every id"):
        dedup.build(rows, n, config, tmp_path / "out", "fp")


def test_a_finished_plan_is_reused_only_for_the_same_request(tmp_path, small_parts):
    captions = _captions(17, seed=3)
    rows, n, config = _rows(tmp_path, captions)
    plan = dedup.build(rows, n, config, tmp_path / "out", "fp")
    stamp = (plan.folder / "plan.json").stat().st_mtime_ns
    assert dedup.build(rows, n, config, tmp_path / "out", "fp").meta == plan.meta
    assert (plan.folder / "plan.json").stat().st_mtime_ns == stamp
    (plan.folder / "parts").mkdir()
    (plan.folder / "parts" / "shard-00000.arrow").write_bytes(b"a part of another request")
    other = dedup.build(rows, n, config, tmp_path / "out", "other weights")  # another teacher: plan and parts rebuilt
    assert json.loads((plan.folder / "plan.json").read_text())["key"]["teacher"] == "other weights"
    assert not (plan.folder / "parts").exists() and other.groups(0, n).tolist() == plan.groups(0, n).tolist()
    (plan.folder / "plan.json").unlink()  # a plan killed before its last write is rebuilt
    assert dedup.build(rows, n, config, tmp_path / "out", "fp").groups(0, n).tolist() == _oracle(captions)


@pytest.mark.parametrize("damage", ["group.bin", "slot.bin", "distinct"])
def test_a_damaged_plan_is_rebuilt_not_trusted(tmp_path, small_parts, damage):
    """A full disk once left plan.json beside an empty group.bin; every rerun then failed an assertion on it."""
    captions = _captions(17, seed=4)
    rows, n, config = _rows(tmp_path, captions)
    plan = dedup.build(rows, n, config, tmp_path / "out", "fp")
    stamp = (plan.folder / "plan.json").stat().st_mtime_ns
    if damage == "distinct":
        next(plan.folder.glob("distinct-*.arrow")).unlink()
    else:
        (plan.folder / damage).write_bytes(b"")
    again = dedup.build(rows, n, config, tmp_path / "out", "fp")
    assert (plan.folder / "plan.json").stat().st_mtime_ns != stamp  # made again, not reused
    assert again.groups(0, n).tolist() == _oracle(captions) and again.meta == plan.meta


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
