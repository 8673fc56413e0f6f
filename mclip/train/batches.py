"""Stage 2's batches: the epoch plan (seeded, length-grouped batches that every rank and a resumed run cut the same way),
the token lengths it groups by, and each step's tokenised micro-batches with their targets read from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mclip import distributed
from mclip.errors import UserError
from mclip.store.columns import RawArray
from mclip.train import losses
from mclip.train.pairs import CHUNK, Pairs


class Shuffle:
    """A seeded permutation of range(n) evaluated at any positions, holding nothing per element: shuffle(i) is element i
    of the shuffled order. A balanced Feistel network over the smallest even power of two >= n, walked back into
    range(n) ("cycle walking"; Black & Rogaway 2002, as TensorFlow's index_shuffle), so an epoch's order of billions of
    pairs costs a few keys, where a shuffled array costs 4-8 bytes a pair per rank."""

    ROUNDS = 6

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = int(n)
        self.half = max(1, (max(1, self.n - 1).bit_length() + 1) // 2)  # bits per half: 2 ** (2 * half) >= n
        self.keys = rng.integers(0, 2**63, size=self.ROUNDS, dtype=np.uint64)

    def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:  # splitmix64's finaliser of (x ^ key)
        x = x ^ key
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        bits, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> bits, x & mask
        for key in self.keys:
            left, right = right, left ^ (self._round(right, key) & mask)
        return (left << bits) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions),) int64: the elements at these positions of the shuffled order."""
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        while True:  # a value past n is mapped again until it lands in range (at most ~4 times on average)
            out_of_range = np.flatnonzero(out >= np.uint64(self.n))
            if not len(out_of_range):
                return out.astype(np.int64)
            out[out_of_range] = self._feistel(out[out_of_range])


UNGROUPED_BLOCK = 64  # with no length grouping, batches the plan computes at once


class EpochPlan:
    """plan[k] -> (batch_size,) pair indices of step k of one epoch, the same on every rank and on resume, computed a
    mega-batch at a time when a step of it is asked for: nothing per pair is held, so the plan's memory does not grow with
    the data (the previous whole-epoch array was 4 bytes a pair per rank). len(plan) = steps; the last partial batch is
    dropped.

    The epoch's order is a (seed, epoch) `Shuffle` of the pairs. Mega-batch m is the order's positions m*G*B ... (G =
    `group` batches of B): inside it pairs of alike token length are batched together (less padding), in a random
    batch order; with group 1 the batch is the order's slice. lengths, langs: (P,) per pair, read only for the
    mega-batch's pairs (`RawArray`s on disk are fine); lengths may be None with group 1.

    Length grouping must not make batches single-language: short captions are mostly ja/ko/zh, so one sort of all pairs
    by length gives batches of one script, with one-language negatives and gradients. A pair's sort key is instead its
    length's quantile *within its language* in the mega-batch, so a batch holds the k-th shortest slice of every
    language. Inside a batch pairs are sorted by length, so ranks taking every world-th position get alike lengths."""

    def __init__(self, lengths, langs, batch_size: int, seed: int, epoch: int, group: int):
        assert group == 1 or lengths is not None, "length grouping needs the lengths"
        self.lengths, self.langs, self.batch_size, self.group = lengths, langs, batch_size, group
        self.seed, self.epoch = seed, epoch
        self.steps = len(langs) // batch_size
        self.shuffle = Shuffle(len(langs), np.random.default_rng([seed, epoch]))
        self._held: tuple[int, np.ndarray] | None = None  # the mega-batch last built: (m, (g, B) pair indices)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.steps:
            raise IndexError(f"step {k} out of range for an epoch of {self.steps} steps")
        block = self.group if self.group > 1 else UNGROUPED_BLOCK  # batches built at once (one shuffle call for many)
        m = k // block
        if self._held is None or self._held[0] != m:
            self._held = (m, self._mega_batch(m, block))
        return self._held[1][k - m * block]

    def _mega_batch(self, m: int, block: int) -> np.ndarray:
        """(g, B) pair indices of mega-batch m's g batches, in their (seeded) order; with group 1, `block` batches as
        the shuffled order has them."""
        first = m * block
        g = min(block, self.steps - first)
        part = self.shuffle(np.arange(first * self.batch_size, (first + g) * self.batch_size))
        if self.group == 1:
            batches = part.reshape(g, -1)
            if self.lengths is not None:
                batches = np.take_along_axis(
                    batches, np.argsort(-np.asarray(self.lengths[batches]), axis=1, kind="stable"), axis=1
                )
            return batches
        part_langs, part_lengths = np.asarray(self.langs[part]), np.asarray(self.lengths[part])
        key = np.empty(len(part))
        for lang in np.unique(part_langs):
            where = np.flatnonzero(part_langs == lang)
            rank = np.empty(len(where))
            rank[np.argsort(part_lengths[where], kind="stable")] = np.arange(len(where))  # ties keep the shuffled order
            key[where] = (rank + 0.5) / len(where)
        by_key = np.argsort(-key, kind="stable")
        part, part_lengths = part[by_key].reshape(g, -1), part_lengths[by_key].reshape(g, -1)
        inside = np.argsort(-part_lengths, axis=1, kind="stable")  # longest first inside each batch
        batch_order = np.random.default_rng([self.seed, self.epoch, m]).permutation(g)
        return np.take_along_axis(part, inside, axis=1)[batch_order]


def token_lengths(tokenizer, pairs: Pairs, max_length: int, path: Path, rank: int = 0, world_size: int = 1) -> None:
    """Write the (P,) int16 token counts of the pairs' captions as the student reads them (special tokens included, cut
    at max_length) to `path`: rank r of `world_size` counts its own slice, a chunk at a time, so the pass takes 1/world
    of the time; after a barrier every rank reads the file (`open_lengths`)."""
    n = len(pairs)
    if max_length >= 2**15:
        raise UserError(
            f"--max-length {max_length} is over the 32767 tokens length grouping counts to; lower it or pass --group-batches 1"
        )
    bounds = np.linspace(0, n, world_size + 1).astype(np.int64)
    if rank == 0:
        with open(path, "wb") as handle:
            handle.truncate(2 * n)

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
    lengths = RawArray(path, "<i2")
    assert len(lengths) == n, f"{path} holds {len(lengths)} lengths for {n} pairs"
    return lengths


class EpochSteps(torch.utils.data.Dataset):
    """Step k of an epoch -> this rank's micro-batches (tokenised, padded to their longest) and the global batch's targets.

    Rank r takes positions r, r + world, ... of the length-sorted global batch, so ranks get alike lengths; every rank gets
    all B targets because they are the InfoNCE negatives (fixed teacher vectors: the same as all_gathering them, minus the
    communication, and it covers accumulation micro-batches too). Targets are gathered from the cache's memory map
    (`Column`), B rows a step: no rank holds a copy of the cache.
    """

    def __init__(
        self,
        plan: np.ndarray,
        pairs: Pairs,
        targets,
        layer_targets: list,
        tokenizer,
        max_length: int,
        rank: int,
        world_size: int,
        grad_accum: int,
    ):
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
            enc = self.tokenizer(
                [texts[i] for i in pos], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            micro.append(
                {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pos": torch.from_numpy(pos)}
            )
        targets = torch.from_numpy(self.targets.gather(rows))  # (B, D)
        same = losses.same_target(
            targets, torch.from_numpy(self.pairs.groups(index))
        )  # (B, B): never each other's negatives
        return {
            "rows": torch.from_numpy(rows),
            "targets": targets,
            "same": same,
            "layers": [torch.from_numpy(t.gather(rows)) for t in self.layer_targets],
            "micro": micro,
        }
