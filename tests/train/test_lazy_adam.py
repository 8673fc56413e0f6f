"""--sparse-embeddings: lazy AdamW on the rows a step touches, its gradient clipping, and a run end to end."""

import torch
from torch import nn

from mclip.train.lazy_adam import LazyAdamW, clip_grad_norm_


def _embedding_pair(weight_decay: float, rows: int = 6, width: int = 4):
    """The same embedding (sparse gradient) + linear head twice: one for LazyAdamW, one for torch's AdamW (dense)."""
    torch.manual_seed(0)
    models = []
    for sparse in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(rows, width, sparse=sparse), nn.Linear(width, 1))
        groups = [
            {"params": [model[0].weight], "weight_decay": weight_decay},
            {"params": list(model[1].parameters()), "weight_decay": 0.0},
        ]
        optimizer = (LazyAdamW if sparse else torch.optim.AdamW)(groups, lr=0.05, fused=False)
        models.append((model, optimizer))
    return models


def _step(model, optimizer, ids, clip=None):
    optimizer.zero_grad(set_to_none=True)
    model(ids).pow(2).sum().backward()
    norm = clip_grad_norm_(model.parameters(), clip) if clip else None
    optimizer.step()
    return norm


def test_a_row_in_every_step_gets_exactly_adamw_s_update():
    (lazy, lazy_opt), (dense, dense_opt) = _embedding_pair(weight_decay=0.1)
    every_row = torch.tensor([[0, 1, 2, 3, 4, 5, 2, 2]])  # duplicates: the sparse gradient sums them
    for step in range(5):
        for group in (*lazy_opt.param_groups, *dense_opt.param_groups):
            group["lr"] = 0.05 / (step + 1)  # the lr changes per step, as mclip's schedule sets it
        _step(lazy, lazy_opt, every_row)
        _step(dense, dense_opt, every_row)
    for a, b in zip(lazy.parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert lazy_opt.state[lazy[0].weight].keys() == dense_opt.state[dense[0].weight].keys()


def test_a_row_absent_from_a_step_keeps_its_value_where_adamw_moves_it():
    (lazy, lazy_opt), (dense, dense_opt) = _embedding_pair(weight_decay=0.0)
    for model, optimizer in ((lazy, lazy_opt), (dense, dense_opt)):
        _step(model, optimizer, torch.tensor([[0, 1]]))
    before_lazy, before_dense = lazy[0].weight.detach().clone(), dense[0].weight.detach().clone()
    for model, optimizer in ((lazy, lazy_opt), (dense, dense_opt)):
        _step(model, optimizer, torch.tensor([[1, 2]]))  # row 0 absent
    assert torch.equal(lazy[0].weight[0], before_lazy[0])  # lazy: untouched
    assert not torch.equal(dense[0].weight[0], before_dense[0])  # AdamW: carried on by its momentum
    assert torch.equal(lazy[0].weight[3:], before_lazy[3:])  # never-seen rows stay as they were in both
    assert not torch.equal(lazy[0].weight[2], before_lazy[2])  # the step's own rows move


def test_clipping_sparse_gradients_equals_clipping_their_dense_form():
    (lazy, _), (dense, _) = _embedding_pair(weight_decay=0.0)
    ids = torch.tensor([[0, 3, 3, 5]])
    for model in (lazy, dense):
        model(ids).pow(2).sum().backward()
    norm_lazy = clip_grad_norm_(lazy.parameters(), 0.01)
    norm_dense = torch.nn.utils.clip_grad_norm_(dense.parameters(), 0.01)
    torch.testing.assert_close(norm_lazy, norm_dense)
    assert norm_dense > 0.01  # clipping happened
    torch.testing.assert_close(lazy[0].weight.grad.to_dense(), dense[0].weight.grad)
    torch.testing.assert_close(lazy[1].weight.grad, dense[1].weight.grad)


def _train(small_run, out, **changes):
    from mclip.config import TrainConfig
    from mclip.train.run import run

    base = dict(
        data=str(small_run["data"]),
        cache=str(small_run["cache"]),
        out=str(out),
        student=str(small_run["student"]),
        languages=("de", "zh"),
        batch_size=16,
        max_steps=4,
        save_every=2,
        warmup_steps=1,
        lr=2e-3,
        weight_decay=0.01,
        num_workers=0,
        progress=False,
        num_threads=1,
    )
    return run(TrainConfig(**{**base, **changes}))


def _embedding(folder):
    from safetensors.numpy import load_file

    weights = load_file(str(folder / "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("word_embeddings.weight"))


def test_sparse_embeddings_leave_the_rows_of_unseen_tokens_as_they_were_and_resume_exactly(small_run, tmp_path):
    import shutil

    import numpy as np

    from mclip.train.checkpoint import checkpoints

    start = _embedding(small_run["student"])
    dense = _embedding(_train(small_run, tmp_path / "dense").final)
    sparse = _embedding(_train(small_run, tmp_path / "sparse", sparse_embeddings=True).final)
    unseen = np.abs(sparse - start).max(1) == 0
    assert unseen.any() and not unseen.all()  # the tiny vocabulary has tokens the training captions never use
    assert not np.array_equal(dense[unseen], start[unseen])  # AdamW's weight decay moves them

    # a run killed after step 2 resumes from the lazy optimizer's state to the same weights
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "sparse", out)
    for step, folder in checkpoints(out):
        if step > 2:
            shutil.rmtree(folder)
    shutil.rmtree(out / "final")
    resumed = _embedding(_train(small_run, out, sparse_embeddings=True, resume=True).final)
    np.testing.assert_allclose(resumed, sparse, atol=1e-6)


def test_sparse_embeddings_refuse_frozen_embeddings(small_run, tmp_path):
    import pytest

    from mclip.errors import ConfigError

    with pytest.raises(ConfigError, match="either --freeze-embeddings or --sparse-embeddings"):
        _train(small_run, tmp_path / "run", sparse_embeddings=True, freeze_embeddings=True)
