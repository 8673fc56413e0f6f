"""mclip.models.texts: the order both encoders read texts in, longest first, `batch_size` at a time."""

import numpy as np
import pytest

from mclip.models.texts import length_sorted


@pytest.mark.parametrize("n, batch_size", [(0, 4), (1, 4), (10, 3), (12, 4), (7, 64)])
def test_length_sorted_batches_cover_every_text_once_longest_first(n, batch_size):
    rng = np.random.default_rng(n)
    texts = ["x" * int(k) for k in rng.integers(0, 6, n)]  # ties included
    batches = list(length_sorted(texts, batch_size))
    assert [len(b) for b in batches] == [min(batch_size, n - s) for s in range(0, n, batch_size)]
    order = np.concatenate(batches).tolist() if batches else []
    assert sorted(order) == list(range(n))
    # longest first, and the order a stable sort by length gives, reversed: the same on every call
    assert order == sorted(range(n), key=lambda i: (len(texts[i]), i), reverse=True)
