"""mclip.embed.batches: stage 1's forward batches (length-sorted, padded, within the token budget) and how many threads
tokenise."""

import os

import numpy as np
import torch

from mclip.embed.batches import _tokenize_threads, padded_batches
from mclip.models.teacher import load_teacher


def test_padded_batches_hold_every_sequence_once_within_the_budget(clip_text_teacher):
    teacher = load_teacher(str(clip_text_teacher))
    pad = teacher.tokenizer.pad_token_id
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, 400, n).tolist() for n in rng.integers(1, 30, 101)]
    batch_tokens, max_batch = 64, 5
    batches, count = padded_batches(tokens, teacher, batch_tokens, max_batch)
    assert count == sum(map(len, tokens))
    order = np.concatenate([idx for idx, _, _ in batches])
    assert sorted(order.tolist()) == list(range(len(tokens)))  # every sequence in exactly one batch
    lengths = np.array([len(tokens[i]) for i in order])
    assert (np.diff(lengths) >= 0).all()  # shortest first, across and within batches
    for idx, input_ids, mask in batches:
        width = max(len(tokens[i]) for i in idx)
        assert input_ids.shape == mask.shape == (len(idx), width) and input_ids.dtype == torch.int64
        assert len(idx) <= max_batch and (len(idx) == 1 or len(idx) * width <= batch_tokens)
        for row, i in enumerate(idx):
            n = len(tokens[i])
            assert input_ids[row].tolist() == tokens[i] + [pad] * (width - n)
            assert mask[row].tolist() == [1] * n + [0] * (width - n)
    for (a, _, _), (b, _, _) in zip(batches, batches[1:]):  # greedy: the next batch's first sequence did not fit
        assert len(a) == max_batch or (len(a) + 1) * len(tokens[b[0]]) > batch_tokens


def test_tokenizing_threads_leave_two_cores_to_the_forward_and_the_writer(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, want in [(16, 14), (128, 16), (3, 1), (1, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert _tokenize_threads(cuda) == want and _tokenize_threads(cpu) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun ranks on one machine share it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert _tokenize_threads(cuda) == 14
