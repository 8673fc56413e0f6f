"""extend-vocab's word and stem choices, and the per-row learning rate of the embedding matrix."""

import torch

from mclip.train.vocab import RowLR, stem_candidates


def test_stem_candidates_keep_shared_prefixes_where_the_words_branch():
    words = ["клавиши", "клавишу", "клавиатура", "кот", "котик", "дом"]
    # "клави" holds 3 words and branches (ш / а); "клавиш" holds 2; "кот" is a word and a prefix of another; "дом" stands alone
    assert stem_candidates(words, 2) == ["клави", "клавиш", "кот"]
    assert stem_candidates(words, 3) == ["клави"]
    assert stem_candidates(words, 0) == []


def test_row_lr_scales_the_step_of_the_old_rows_only():
    weight = torch.nn.Parameter(torch.zeros(5, 2))
    weight.grad = torch.ones(5, 2)
    optimizer = torch.optim.SGD([weight], lr=1.0)
    with RowLR(weight, first_new=3, factor=0.1):
        optimizer.step()
    assert torch.allclose(weight[:3], torch.full((3, 2), -0.1)) and torch.equal(weight[3:], torch.full((2, 2), -1.0))
    with RowLR(weight, first_new=3, factor=0.0):  # frozen
        optimizer.step()
    assert torch.allclose(weight[:3], torch.full((3, 2), -0.1)) and torch.equal(weight[3:], torch.full((2, 2), -2.0))
