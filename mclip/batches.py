"""Stage 2's batches: the epoch plan (seeded, length-grouped batches that every rank and a resumed run cut the same way),
the token lengths it groups by, and each step's tokenised micro-batches with their targets from the cache's memory map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mclip import losses
from mclip.pairs import CHUNK, Pairs


def plan_epoch(lengths: np.ndarray, langs: np.ndarray, batch_size: int, seed: int, epoch: int, group: int) -> np.ndarray:
    """(steps, batch_size) pair indices of one epoch, the same on every rank and on resume: a (seed, epoch) shuffle, then
    inside mega-batches of `group` batches pairs of alike token length are batched together (less padding), batch order
    shuffled again; the last partial batch is dropped. lengths, langs: (P,) per pair (memory-mapped is fine: read one
    mega-batch at a time).

    Length grouping must not make batches single-language: short captions are mostly ja/ko/zh, so one sort of all pairs
    by length gives batches of one script, with one-language negatives and gradients. A pair's sort key is instead its
    length's quantile *within its language*, so a batch holds the k-th shortest slice of every language. Inside a batch
    pairs are sorted by length, so ranks taking every world-th position get alike lengths.

    Memory: the plan is the one array per pair a run holds (int32, 4 bytes a pair), built and shuffled in place; while it
    is built the lengths (int16) and languages (int8) are read in too, 3 bytes a pair, then dropped."""
    if group > 1:  # random gathers, a mega-batch at a time: from memory (a pread each would take a minute per 2M pairs)
        lengths, langs = np.asarray(lengths), np.asarray(langs)
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    steps = n // batch_size
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)  # the same draws, and so the same order, as rng.permutation(n)
    order = order[: steps * batch_size]
    batch_order = rng.permutation(steps)
    chunk = group * batch_size
    for start in range(0, len(order) if group > 1 else 0, chunk):
        part = order[start : start + chunk]
        part_langs, part_lengths = np.asarray(langs[part]), np.asarray(lengths[part])
        key = np.empty(len(part))
        for lang in np.unique(part_langs):
            where = np.flatnonzero(part_langs == lang)
            rank = np.empty(len(where))
            rank[np.argsort(part_lengths[where], kind="stable")] = np.arange(len(where))  # ties keep the shuffled order
            key[where] = (rank + 0.5) / len(where)
        part[:] = part[np.argsort(-key, kind="stable")]
    plan = order.reshape(steps, batch_size)
    for start in range(0, steps, 4096):  # sorted inside each batch, a block of batches at a time
        block = plan[start : start + 4096]
        block[:] = np.take_along_axis(block, np.argsort(-np.asarray(lengths[block]), axis=1, kind="stable"), axis=1)
    _permute_rows(plan, batch_order)
    return plan


def _permute_rows(plan: np.ndarray, perm: np.ndarray) -> None:
    """plan[:] = plan[perm], in place (cycle by cycle, one row of scratch): no second copy of the epoch's plan."""
    done = np.zeros(len(perm), dtype=bool)
    for first in range(len(perm)):
        if done[first] or perm[first] == first:
            continue
        held, k = plan[first].copy(), first
        while True:
            done[k] = True
            source = perm[k]
            if source == first:
                plan[k] = held
                break
            plan[k] = plan[source]
            k = source


def token_lengths(tokenizer, pairs: Pairs, max_length: int, path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Write the (P,) int16 token counts of the pairs' captions as the student reads them (special tokens included, cut
    at max_length) to `path`: rank r of `world_size` counts its own slice, a chunk at a time, so the pass takes 1/world
    of the time; after a barrier every rank reads the file (`open_lengths`)."""
    n = len(pairs)
    if max_length >= 2**15:
        from mclip.errors import UserError

        raise UserError(f"--max-length {max_length} is over the 32767 tokens length grouping counts to; lower it or pass --group-batches 1")
    bounds = np.linspace(0, n, world_size + 1).astype(np.int64)
    if rank == 0:
        with open(path, "wb") as handle:
            handle.truncate(2 * n)
    from mclip import distributed

    distributed.barrier()
    # the tokenizer's own call, as the batches are cut: its Rust core alone counts 2x faster but reads a vocabulary that
    # extend-vocab grew in this process differently from the same vocabulary reloaded on resume
    with open(path, "r+b") as handle:
        for start in range(int(bounds[rank]), int(bounds[rank + 1]), CHUNK):
            texts = pairs.texts(np.arange(start, min(int(bounds[rank + 1]), start + CHUNK)))
            counts = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
            handle.seek(2 * start)
            handle.write(np.asarray(counts, dtype="<i2").tobytes())
    distributed.barrier()


def open_lengths(path: Path, n: int):
    from mclip.shards import RawArray

    lengths = RawArray(path, "<i2")
    assert len(lengths) == n, f"{path} holds {len(lengths)} lengths for {n} pairs"
    return lengths


class EpochSteps(torch.utils.data.Dataset):
    """Step k of an epoch -> this rank's micro-batches (tokenised, padded to their longest) and the global batch's targets.

    Rank r takes positions r, r + world, ... of the length-sorted global batch, so ranks get alike lengths; every rank gets
    all B targets because they are the InfoNCE negatives (fixed teacher vectors: the same as all_gathering them, minus the
    communication, and it covers accumulation micro-batches too). Targets are gathered from the cache's memory map
    (`shards.Column`), B rows a step: no rank holds a copy of the cache.
    """

    def __init__(self, plan: np.ndarray, pairs: Pairs, targets, layer_targets: list, tokenizer,
                 max_length: int, rank: int, world_size: int, grad_accum: int):
        self.plan, self.pairs, self.targets, self.layer_targets = plan, pairs, targets, layer_targets
        self.tokenizer, self.max_length = tokenizer, max_length
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        index = np.asarray(self.plan[k], dtype=np.int64)  # (B,) pair indices
        rows = np.asarray(self.pairs.rows[index])  # (B,)
        texts = self.pairs.texts(index)
        micro = []
        for pos in np.array_split(np.arange(self.rank, len(index), self.world_size), self.grad_accum):
            enc = self.tokenizer([texts[i] for i in pos], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            micro.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pos": torch.from_numpy(pos)})
        targets = torch.from_numpy(self.targets.gather(rows))  # (B, D)
        same = losses.same_target(targets, torch.from_numpy(self.pairs.groups(index)))  # (B, B): never each other's negatives
        return {"rows": torch.from_numpy(rows), "targets": targets, "same": same,
                "layers": [torch.from_numpy(t.gather(rows)) for t in self.layer_targets], "micro": micro}
