"""Texts in length-sorted batches: the order in which both encoders (the torch student and its ONNX export) read them."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def length_sorted(texts: Sequence[str], batch_size: int, show_progress: bool = False) -> Iterator[np.ndarray]:
    """Index arrays into `texts`, longest first (the first batch shows the peak memory), `batch_size` at a time."""
    order = np.argsort([len(t) for t in texts], kind="stable")[::-1]
    starts = range(0, len(texts), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="encode", unit="batch")
    for start in starts:
        yield order[start : start + batch_size]
