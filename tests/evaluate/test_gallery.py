"""mclip.evaluate.gallery's grouping of English targets against np.unique, the oracle it replaces (no Python object per row)."""

import numpy as np
import pyarrow as pa

from mclip.evaluate.gallery import groups


def test_groups_of_arrow_strings_equal_np_unique_on_python_strings():
    rng = np.random.default_rng(0)
    pool = ["a", "b", "ab", "é", "z", "", " a", "B", "日本", "a\x00b", "😀", "ａ"]
    for n in [0, 1, 2, *rng.integers(3, 60, size=60).tolist()]:
        values = [pool[i] for i in rng.integers(0, len(pool), size=n)]
        first, labels = groups(
            pa.chunked_array([pa.array(values[: n // 2], pa.string()), pa.array(values[n // 2 :], pa.string())])
        )
        if n:
            _, first_np, labels_np = np.unique(np.array(values, dtype=object), return_index=True, return_inverse=True)
        else:
            first_np = labels_np = np.zeros(0, np.int64)
        np.testing.assert_array_equal(first, first_np)
        np.testing.assert_array_equal(labels, labels_np.reshape(-1))


def test_groups_of_int64_caption_groups_equal_np_unique():
    values = np.array([7, 3, 7, 7, 1, 3, 9], np.int64)
    first, labels = groups(values)
    np.testing.assert_array_equal(first, [4, 1, 0, 6])
    np.testing.assert_array_equal(labels, [2, 1, 2, 2, 0, 1, 3])


def test_targets_on_disk_equal_np_unique_over_the_captions(tmp_path, monkeypatch):
    """Labels in the order of the values, each target's first caption's cache row, the most captions of one target:
    np.unique's answer, from blocks of 5 captions and partitions of 3 targets."""
    from mclip.evaluate import gallery as eval_gallery
    from mclip.store.columns import RawArray

    monkeypatch.setattr(eval_gallery, "BLOCK", 5)
    monkeypatch.setattr(eval_gallery, "PART", 3)
    rng = np.random.default_rng(1)
    n_cache = 40
    per_row = rng.integers(0, 25, n_cache)  # a value per cache row: 25 possible targets, some absent
    np.asarray(per_row, "<i8").tofile(tmp_path / "values")
    for case, n in enumerate((1, 7, 60)):
        rows = rng.integers(0, n_cache, n)  # captions' cache rows, repeats allowed
        rows.astype("<i8").tofile(tmp_path / f"rows{case}")
        got = eval_gallery.targets(
            RawArray(tmp_path / f"rows{case}", "<i8"),
            eval_gallery.Values(RawArray(tmp_path / "values", "<i8"), 25),
            tmp_path / f"t{case}",
        )
        first, labels = groups(per_row[rows])
        np.testing.assert_array_equal(np.asarray(got.labels), labels)
        np.testing.assert_array_equal(np.asarray(got.rows), rows[first])
        assert got.most == np.bincount(labels).max()
        assert sorted(p.name for p in tmp_path.glob(f"t{case}*")) == [f"t{case}.labels", f"t{case}.rows"]
