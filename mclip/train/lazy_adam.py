"""`--sparse-embeddings`: the word-embedding matrix gets a sparse gradient and lazy AdamW updates, so a step reads and
writes only the rows of its own tokens, not all of a 250k-token vocabulary.

Why: with dense AdamW every step allocates the whole matrix's gradient, takes its norm and moves every row with the
optimizer (96M parameters for multilingual-e5-small, 192M for xlm-roberta-base), although a batch of 64 captions holds
a few hundred distinct tokens. On a CPU that is a large share of each step; on a GPU it is not.

What changes (as TensorFlow's LazyAdam and torch's SparseAdam): a row absent from a step is left exactly as it is (no
momentum carried over, no weight decay), where dense AdamW keeps moving it by its decaying momentum. A row present in
every step gets exactly AdamW's update (tested). The rest of the model steps as before (one fused AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def sparse_embeddings(student: nn.Module) -> None:
    """Make the student's input-embedding lookup return a sparse (row) gradient, as nn.Embedding(sparse=True) does."""
    embedding = student.backbone.get_input_embeddings()
    assert isinstance(embedding, nn.Embedding), f"--sparse-embeddings needs an nn.Embedding, not {type(embedding)}"
    embedding.sparse = True


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) that also takes sparse gradients (coalesced in place: duplicate rows summed).

    Without sparse gradients it is torch's own function, so a dense run's numbers do not change."""
    params = [p for p in parameters if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in sparse:
        p.grad = p.grad.coalesce()
    dense = [p.grad for p in params if not p.grad.is_sparse]
    norms = [torch.linalg.vector_norm(g) for g in dense] + [torch.linalg.vector_norm(p.grad._values()) for p in sparse]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch: scale only when above max_norm
    for g in dense:
        g.mul_(coef)
    for p in sparse:
        p.grad._values().mul_(coef)
    return total


class LazyAdamW(torch.optim.AdamW):
    """AdamW whose parameters with a sparse gradient get lazy row updates; every other parameter steps through
    torch's AdamW (fused or not, as asked). Same state keys (step, exp_avg, exp_avg_sq), so checkpoints load alike."""

    @torch.no_grad()
    def step(self, closure=None):
        held = [
            (group, p, p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p.grad.is_sparse
        ]
        for _, p, _ in held:  # torch's AdamW refuses sparse gradients: hide them from it
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for _, p, grad in held:
                p.grad = grad
        found_inf = getattr(self, "found_inf", None)  # fp16 with a fused step: GradScaler skips no step, the kernels do
        if found_inf is None or not float(found_inf):
            for group, p, grad in held:
                self._rows(group, p, grad.coalesce())
        return loss

    def _rows(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW (torch's formula, decoupled decay) on the rows `grad` holds; grad: coalesced sparse (V, H)."""
        assert not group["amsgrad"] and not group["maximize"], "--sparse-embeddings supports plain AdamW only"
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        lr, wd, eps, (beta1, beta2) = group["lr"], group["weight_decay"], group["eps"], group["betas"]
        rows, values = grad._indices()[0], grad._values().to(p.dtype)  # (U,), (U, H)
        param = p.index_select(0, rows)  # (U, H)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        param.mul_(1 - lr * wd)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        p.index_copy_(0, rows, param)
