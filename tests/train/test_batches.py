"""mclip.train.batches: the epoch plan (seeded, length-grouped, every language per batch) and the token lengths it
groups by."""

import numpy as np
import pytest

from mclip.train.batches import EpochPlan, Shuffle
from mclip.train.pairs import prepare_pairs
from tests import tiny
from tests.train.test_pairs import _cache, _config


def plan_epoch(lengths, langs, batch_size, seed, epoch, group):
    """The whole epoch's plan as one (steps, batch_size) array, from the per-step EpochPlan."""
    plan = EpochPlan(lengths, langs, batch_size, seed, epoch, group)
    return np.stack([plan[k] for k in range(len(plan))])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 17, 1000, 1024, 1025, 65_537])
def test_shuffle_is_a_seeded_permutation(n):
    shuffle = Shuffle(n, np.random.default_rng([3, 0]))
    order = shuffle(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))  # a bijection of range(n)
    assert np.array_equal(order, Shuffle(n, np.random.default_rng([3, 0]))(np.arange(n)))  # the same on every rank
    assert np.array_equal(shuffle(np.arange(n)[::-1]), order[::-1])  # any positions, in any order
    if n >= 1000:
        assert not np.array_equal(order, Shuffle(n, np.random.default_rng([3, 1]))(np.arange(n)))  # another epoch


def test_shuffle_looks_random():
    # where position 0 lands, over 2000 seeds, is uniform on range(n); neighbours in the order are uncorrelated
    n = 1000
    first = np.array([Shuffle(n, np.random.default_rng(s))(np.array([0]))[0] for s in range(2000)])
    counts = np.bincount(first * 10 // n, minlength=10)  # 10 bins of 200 expected
    assert ((counts - 200) ** 2 / 200).sum() < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    order = Shuffle(100_000, np.random.default_rng(0))(np.arange(100_000)).astype(float)
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.02
    assert abs(np.corrcoef(np.arange(100_000), order)[0, 1]) < 0.02


@pytest.mark.parametrize("group", [1, 3, 64])
def test_epoch_plan_is_a_partition_across_its_blocks(group):
    # 1003 pairs in batches of 4: 250 steps, several blocks of batches (64 ungrouped, `group` grouped), a partial last
    # one
    lengths = np.random.default_rng(0).integers(1, 50, 1003)
    plan = plan_epoch(lengths, np.zeros(1003, np.int8), 4, seed=5, epoch=2, group=group)
    assert plan.shape == (250, 4) and len(np.unique(plan)) == 1000
    assert all((np.diff(lengths[b]) <= 0).all() for b in plan)


def test_epoch_plan_holds_nothing_per_pair():
    class Langs:  # 10 billion pairs: an array per pair would not fit; the plan reads only len()
        def __len__(self):
            return 10**10

    plan = EpochPlan(None, Langs(), 512, seed=0, epoch=0, group=1)
    assert len(plan) == 10**10 // 512
    steps = [plan[k] for k in (0, 1, len(plan) - 1)]
    together = np.concatenate(steps)
    assert len(np.unique(together)) == 3 * 512 and together.min() >= 0 and together.max() < 10**10
    with pytest.raises(IndexError):
        plan[len(plan)]


def test_plan_epoch_is_a_seeded_length_grouped_partition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=103)
    langs = np.zeros(103, np.int64)
    plan = plan_epoch(lengths, langs, batch_size=8, seed=1, epoch=0, group=4)
    assert plan.shape == (12, 8)  # 103 // 8 batches; the partial one is dropped
    assert len(np.unique(plan)) == plan.size  # no pair twice in an epoch
    assert np.array_equal(plan, plan_epoch(lengths, langs, 8, 1, 0, 4))  # the same on every rank and on resume
    assert not np.array_equal(plan, plan_epoch(lengths, langs, 8, 1, 1, 4))  # reshuffled each epoch
    # inside a mega-batch of 4 batches lengths are sorted, so each batch's spread is far below a random batch's
    spread = np.mean([np.ptp(lengths[b]) for b in plan])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.random.default_rng(2).permutation(96).reshape(12, 8)])
    assert spread < random_spread / 2
    assert all((np.diff(lengths[b]) <= 0).all() for b in plan)  # sorted inside a batch: ranks take alike lengths


def test_length_grouping_keeps_every_language_in_every_batch():
    # 300 ids x 6 languages; languages 0-2 are short (like ja, ko, zh captions), 3-5 three times longer. One sort of all
    # pairs by length (the previous rule) gives batches of the short scripts only.
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(300), 6)
    langs = np.tile(np.arange(6), 300)
    lengths = np.where(langs < 3, 1, 3) * rng.integers(2, 30, size=300)[ids] + rng.integers(0, 3, size=ids.size)
    plan = plan_epoch(lengths, langs, batch_size=24, seed=0, epoch=0, group=16)
    assert len(np.unique(plan)) == plan.size == 1800
    assert min(len(np.unique(langs[b])) for b in plan) == 6  # every batch holds every language ...
    assert max(np.bincount(langs[b]).max() for b in plan) <= 6  # ... in about its share (4 of 24)
    # and the padding (batch size x its longest pair) stays well below a random batching's
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)  # noqa: E731
    assert padded(plan) < 0.7 * padded(plan_epoch(lengths, langs, 24, 0, 0, group=1))
    one_sort = np.argsort(-lengths, kind="stable").reshape(75, 24)
    assert min(len(np.unique(langs[b])) for b in one_sort) <= 3


def test_token_lengths_are_the_tokenizers_own_counts_cut_at_max_length(tmp_path, bert_student):
    from transformers import AutoTokenizer

    from mclip.train.batches import open_lengths, token_lengths

    texts = ["a red cat", "", "ein sehr langer Satz " * 20, "红色的猫", "🙂 emoji", "x"]
    ids = [f"i{k}" for k in range(len(texts))]
    cache = _cache(tmp_path / "cache", ids, texts)
    data = tiny.write_captions(
        tmp_path / "d.jsonl", [{"id": i, "caption_zh": t or "-", "caption_de": t or "-"} for i, t in zip(ids, texts)]
    )
    train, _, _ = prepare_pairs(_config(tmp_path, data), cache)
    xlmr = tiny.write_tiny_xlmr(tmp_path / "xlmr", corpus=texts)
    for folder in (bert_student, xlmr):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        token_lengths(tokenizer, train, 16, tmp_path / "lengths")
        want = [len(x) for x in tokenizer(train.texts(), truncation=True, max_length=16)["input_ids"]]
        assert np.asarray(open_lengths(tmp_path / "lengths", len(train))).tolist() == want and max(want) == 16
