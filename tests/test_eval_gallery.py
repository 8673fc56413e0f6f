"""mclip.eval_gallery's grouping of English targets against np.unique, the oracle it replaces (no Python object per row)."""

import numpy as np
import pyarrow as pa

from mclip.eval_gallery import groups


def test_groups_of_arrow_strings_equal_np_unique_on_python_strings():
    rng = np.random.default_rng(0)
    pool = ["a", "b", "ab", "é", "z", "", " a", "B", "日本", "a\x00b", "😀", "ａ"]
    for n in [0, 1, 2, *rng.integers(3, 60, size=60).tolist()]:
        values = [pool[i] for i in rng.integers(0, len(pool), size=n)]
        first, labels = groups(pa.chunked_array([pa.array(values[: n // 2], pa.string()), pa.array(values[n // 2 :], pa.string())]))
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
