"""Distillation losses: MSE, cosine, in-batch InfoNCE against fixed teacher targets, their `cl` mixture, and layer-kd.

Each returns a dict of named, already weighted parts; the training loss is their sum (`total`), and each part is logged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(student: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """student (B, D), target (B, D) -> {"mse": mean over all B*D elements of (student - target)^2}."""
    assert student.shape == target.shape, f"student {tuple(student.shape)} vs target {tuple(target.shape)}"
    return {"mse": F.mse_loss(student.float(), target.float())}


def cosine(student: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """student (B, D), target (B, D) -> {"cosine": mean over rows of 1 - cos(student, target)}."""
    assert student.shape == target.shape, f"student {tuple(student.shape)} vs target {tuple(target.shape)}"
    return {"cosine": (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).mean()}


def info_nce(
    student: torch.Tensor,
    targets: torch.Tensor,
    positive: torch.Tensor,
    same: torch.Tensor,
    temperature: torch.Tensor | float,
) -> dict[str, torch.Tensor]:
    """In-batch contrastive loss of student rows against fixed teacher vectors (van den Oord et al. 2018, InfoNCE).

    student (B, D); targets (N, D) the teacher vectors of the whole global batch (the negatives); positive (B,) long,
    the index of each row's own target in `targets`; same (B, N) bool, True where a target carries the row's id (the en
    and zh captions of one id): those are never negatives, the positive itself is kept; temperature () > 0.
    logits = normalize(student) @ normalize(targets).T / temperature -> {"infonce": cross-entropy(logits, positive)}.
    """
    assert student.shape[1] == targets.shape[1], f"student {tuple(student.shape)} vs targets {tuple(targets.shape)}"
    assert same.shape == (student.shape[0], targets.shape[0]), f"same {tuple(same.shape)} is not (B, N)"
    logits = F.normalize(student.float(), dim=-1) @ F.normalize(targets.float(), dim=-1).T / temperature  # (B, N)
    rows = torch.arange(student.shape[0], device=student.device)
    not_negative = same.clone()
    not_negative[rows, positive] = False
    logits = logits.masked_fill(not_negative, float("-inf"))
    return {"infonce": F.cross_entropy(logits, positive)}


def same_target(targets: torch.Tensor, texts_group: torch.Tensor | None = None, tol: float = 1e-6) -> torch.Tensor:
    """targets (N, D) -> (N, N) bool, True where two rows carry the same teacher target: bit-identical vectors (stage 1
    embeds identical captions once, and captions cut to the same tokens come out identical) or, within `tol` of cosine 1,
    the same caption embedded in another shard; texts_group (N,) long, optional, also joins rows whose English caption is
    the same string (stage 3's rule: identical English captions are one target)."""
    unit = F.normalize(targets.float(), dim=-1)
    same = unit @ unit.T >= 1 - tol  # (N, N)
    if texts_group is not None:
        assert texts_group.shape == (targets.shape[0],), (
            f"texts_group {tuple(texts_group.shape)} vs targets {tuple(targets.shape)}"
        )
        same |= texts_group[:, None] == texts_group[None, :]
    return same


def distillation(
    student: torch.Tensor,
    targets: torch.Tensor,
    positive: torch.Tensor,
    same: torch.Tensor,
    loss: str,
    alpha: float = 0.1,
    cl_base: str = "mse",
    temperature: torch.Tensor | float = 0.05,
    normalized: bool = True,
) -> dict[str, torch.Tensor]:
    """The student-to-teacher loss chosen by `--loss`; shapes as in `info_nce`.

    mse: MSE(s, t); cosine: 1 - cos(s, t); cl: (1 - alpha) * base(s, t) + alpha * InfoNCE, base = mse or cosine,
    where t = targets[positive] is each row's own teacher vector. normalized: the targets are unit vectors (the cache was
    L2-normalised), so MSE compares the L2-normalised student with them: retrieval ignores the norm, and an unnormalised
    student whose pooled norm is 6 (all-MiniLM-L6-v2) would first have to shrink every output 6x, wrecking a student that
    starts as the teacher. MSE of unit vectors is 2 (1 - cos) / D, so it ranks like cosine; its scale matches
    sentence-transformers' MSELoss behind a Normalize module.
    """
    own = targets[positive]  # (B, D)
    pointwise = F.normalize(student.float(), dim=-1) if normalized else student
    if loss == "mse":
        return mse(pointwise, own)
    if loss == "cosine":
        return cosine(student, own)
    assert loss == "cl", f"unknown loss {loss!r}"
    base = (mse if cl_base == "mse" else cosine)(pointwise, own)
    parts = {name: (1 - alpha) * value for name, value in base.items()}
    parts.update(
        {name: alpha * value for name, value in info_nce(student, targets, positive, same, temperature).items()}
    )
    return parts


def layer_kd(
    predicted: list[torch.Tensor], targets: list[torch.Tensor], weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """K projected student layer states (B, H_teacher) and the cached teacher layer states (B, H_teacher) ->
    {"layer_kd": weight * mean over the K layers of MSE(predicted_k, target_k)}."""
    assert len(predicted) == len(targets) > 0, f"{len(predicted)} predicted layers vs {len(targets)} targets"
    for p, t in zip(predicted, targets):
        assert p.shape == t.shape, f"layer prediction {tuple(p.shape)} vs target {tuple(t.shape)}"
    per_layer = torch.stack([F.mse_loss(p.float(), t.float()) for p, t in zip(predicted, targets)])
    return {"layer_kd": weight * per_layer.mean()}


def total(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(parts.values())).sum()
