"""Stage 2's model and schedule: what trains (student + temperature + layer-kd projections, one module so DDP syncs all
of it), its optimizer groups, and the learning rate of each step."""

from __future__ import annotations

import math

import torch
from torch import nn

from mclip.config import MIN_TEMPERATURE, TrainConfig
from mclip.models.student import StudentEncoder, pool


class Distiller(nn.Module):
    """The student, the InfoNCE temperature (log-parametrised) and the layer-kd projections (student hidden -> teacher hidden)."""

    def __init__(
        self,
        student: StudentEncoder,
        temperature: float,
        learn_temperature: bool,
        student_layers: tuple[int, ...] = (),
        teacher_width: int = 0,
    ):
        super().__init__()
        self.student = student
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.student_layers = tuple(student_layers)
        self.layer_proj = nn.ModuleList(nn.Linear(student.hidden_size, teacher_width) for _ in self.student_layers)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Keep a learnt temperature at or above MIN_TEMPERATURE by clamping the parameter after each step, as open_clip
        clamps its logit scale: a clamp inside temperature() would have zero gradient below the floor, so a temperature
        that momentum carried past it could never come back."""
        if isinstance(self.log_temperature, nn.Parameter):
            self.log_temperature.clamp_(min=math.log(MIN_TEMPERATURE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """input_ids, attention_mask (B, T) -> embedding (B, D), K projected layer states (B, H_teacher), temperature ()."""
        emb, hidden = self.student(input_ids, attention_mask, output_hidden_states=bool(self.student_layers))
        states = [
            proj(pool(hidden[layer], attention_mask, "mean"))
            for layer, proj in zip(self.student_layers, self.layer_proj)
        ]
        return emb, states, self.temperature()


def param_groups(model: Distiller, weight_decay: float, embedding_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices only: biases, norm weights and the temperature are not pulled towards zero. The input-embedding
    matrix is a group of its own whose lr is `embedding_lr_scale` x lr (each row moves only on the steps its token is in
    a batch, so new tokens seen a handful of times learn little at the body's lr)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    emb = model.student.backbone.get_input_embeddings().weight
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2 and p is not emb], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p is emb], "weight_decay": weight_decay, "lr_scale": embedding_lr_scale},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then linear/cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    shape = 1 - progress if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (config.lr - floor) * shape
