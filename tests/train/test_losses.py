"""Losses against hand-computed numpy values on seeded data: mse, cosine, InfoNCE (with duplicate ids), cl, layer-kd."""

import numpy as np
import pytest
import torch

from mclip.train import losses


def _data(b=6, n=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _np_info_nce(s, t, positive, same, temperature):
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(s)):
        keep = [j for j in range(len(t)) if j == positive[i] or not same[i, j]]
        logits = np.array([s[i] @ t[j] / temperature for j in keep])
        own = keep.index(positive[i])
        total += -(logits[own] - np.log(np.exp(logits).sum()))
    return total / len(s)


def test_mse_and_cosine_match_numpy():
    s, t = _data()
    assert losses.mse(_t(s), _t(t))["mse"].item() == pytest.approx(((s - t) ** 2).mean(), rel=1e-5)
    cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
    assert losses.cosine(_t(s), _t(t))["cosine"].item() == pytest.approx((1 - cos).mean(), rel=1e-5)


def test_info_nce_matches_numpy_with_distinct_ids():
    s, t = _data(b=4, n=6)
    positive = np.array([0, 1, 2, 3])
    same = np.zeros((4, 6), dtype=bool)
    got = losses.info_nce(_t(s), _t(t), _t(positive), _t(same), 0.07)["infonce"].item()
    assert got == pytest.approx(_np_info_nce(s, t, positive, same, 0.07), rel=1e-5)


def test_info_nce_masks_rows_sharing_an_id():
    # rows 0 and 1 are the en and zh captions of one id: their targets are one vector, never a negative for each other
    s, t = _data(b=4, n=4)
    t[1] = t[0]
    rows = np.array([7, 7, 8, 9])
    same = rows[:, None] == rows[None, :]
    positive = np.arange(4)
    got = losses.info_nce(_t(s), _t(t), _t(positive), _t(same), 0.05)["infonce"].item()
    assert got == pytest.approx(_np_info_nce(s, t, positive, same, 0.05), rel=1e-5)
    unmasked = losses.info_nce(_t(s), _t(t), _t(positive), _t(np.zeros_like(same)), 0.05)["infonce"].item()
    assert got < unmasked  # the duplicate, as good as the positive, no longer counts against it
    # a masked target can change without changing the loss of the rows that mask it
    t2 = t.copy()
    t2[1] = -t2[1]
    row0 = losses.info_nce(_t(s[:1]), _t(t2), _t(positive[:1]), _t(same[:1]), 0.05)["infonce"].item()
    assert row0 == pytest.approx(
        losses.info_nce(_t(s[:1]), _t(t), _t(positive[:1]), _t(same[:1]), 0.05)["infonce"].item(), rel=1e-6
    )


def test_cl_is_the_weighted_sum_and_cl_base_swaps_the_pointwise_part():
    s, t = _data(b=4, n=4)
    positive, same = np.arange(4), np.eye(4, dtype=bool)
    alpha, temperature = 0.1, 0.05
    nce = _np_info_nce(s, t, positive, same, temperature)
    parts = losses.distillation(_t(s), _t(t), _t(positive), _t(same), "cl", alpha, "mse", temperature, normalized=False)
    assert set(parts) == {"mse", "infonce"}
    assert parts["mse"].item() == pytest.approx((1 - alpha) * ((s - t) ** 2).mean(), rel=1e-5)
    assert parts["infonce"].item() == pytest.approx(alpha * nce, rel=1e-5)
    assert losses.total(parts).item() == pytest.approx((1 - alpha) * ((s - t) ** 2).mean() + alpha * nce, rel=1e-5)
    cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
    parts = losses.distillation(_t(s), _t(t), _t(positive), _t(same), "cl", alpha, "cosine", temperature)
    assert parts["cosine"].item() == pytest.approx((1 - alpha) * (1 - cos).mean(), rel=1e-5)
    # mse and cosine read each row's own target through `positive`
    shuffled = np.array([2, 0, 3, 1])
    got = losses.distillation(_t(s), _t(t), _t(shuffled), _t(same), "mse", normalized=False)["mse"].item()
    assert got == pytest.approx(((s - t[shuffled]) ** 2).mean(), rel=1e-5)


def test_mse_against_a_normalised_cache_ignores_the_students_norm():
    # all-MiniLM-L6-v2's pooled output has a norm of ~6: a student that points exactly at its unit target must cost nothing
    s, t = _data(b=4, n=4)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    positive, same = np.arange(4), np.eye(4, dtype=bool)
    assert losses.distillation(_t(6.5 * t), _t(t), _t(positive), _t(same), "mse")["mse"].item() == pytest.approx(
        0.0, abs=1e-7
    )
    unit = s / np.linalg.norm(s, axis=1, keepdims=True)
    got = losses.distillation(_t(s), _t(t), _t(positive), _t(same), "mse")["mse"].item()
    assert got == pytest.approx(((unit - t) ** 2).mean(), rel=1e-5)
    cos = (unit * t).sum(1)
    assert got == pytest.approx((2 * (1 - cos)).mean() / t.shape[1], rel=1e-4)  # ranks like cosine: 2 (1 - cos) / D
    parts = losses.distillation(_t(6.5 * t), _t(t), _t(positive), _t(same), "cl", 0.5, "mse", 0.05)
    assert parts["mse"].item() == pytest.approx(0.0, abs=1e-7)  # cl's pointwise part too
    # an unnormalised cache (stage 1 --no-normalize) keeps the plain MSE
    assert losses.distillation(_t(s), _t(t), _t(positive), _t(same), "mse", normalized=False)[
        "mse"
    ].item() == pytest.approx(((s - t) ** 2).mean(), rel=1e-5)


def test_identical_targets_of_different_ids_are_not_negatives():
    # stage 1 embeds identical captions once: ids 7 and 8 carry one bit-identical target. A perfect student must reach a
    # loss near 0, not log 2 (the twin counted as a negative as good as the positive).
    _, t = _data(b=4, n=4)
    t[1] = t[0]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    positive = np.arange(4)
    by_id = np.eye(4, dtype=bool)  # 4 distinct ids
    same = losses.same_target(_t(t))
    assert same.numpy().tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    perfect = _t(t * 3.0)
    masked = losses.info_nce(perfect, _t(t), _t(positive), same, 0.01)["infonce"].item()
    by_id_only = losses.info_nce(perfect, _t(t), _t(positive), _t(by_id), 0.01)["infonce"].item()
    assert masked < 1e-3 and by_id_only == pytest.approx(np.log(2) / 2, rel=1e-3)  # 2 of 4 rows stuck at log 2
    # identical English captions embedded apart (another shard) join through their text group as in stage 3
    t2 = t.copy()
    t2[1] = t2[1] + 1e-2
    groups = torch.tensor([5, 5, 6, 7])
    assert not losses.same_target(_t(t2))[0, 1] and losses.same_target(_t(t2), groups)[0, 1]


def test_learnable_temperature_gets_a_gradient():
    s, t = _data(b=4, n=4)
    log_t = torch.tensor(np.log(0.05), requires_grad=True)
    parts = losses.info_nce(_t(s), _t(t), torch.arange(4), torch.eye(4, dtype=torch.bool), log_t.exp())
    parts["infonce"].backward()
    assert log_t.grad is not None and torch.isfinite(log_t.grad) and log_t.grad.abs() > 0


def test_layer_kd_matches_numpy_and_checks_shapes():
    rng = np.random.default_rng(3)
    pred = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3)]
    target = [rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3)]
    want = 0.5 * np.mean([((p - t) ** 2).mean() for p, t in zip(pred, target)])
    got = losses.layer_kd([_t(p) for p in pred], [_t(t) for t in target], weight=0.5)["layer_kd"].item()
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(AssertionError, match="layer prediction"):
        losses.layer_kd([torch.zeros(5, 8)], [torch.zeros(5, 7)])
