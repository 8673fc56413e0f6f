"""A sentence-transformers folder as a teacher: its modules.json (Transformer, Pooling, Dense, Normalize) read and
applied as sentence-transformers applies them, and the poolers they name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mclip.errors import UserError, first_line


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H): mean over real tokens (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H): the state at the last real token (CLIP's EOS), for right padding."""
    idx = mask.sum(1).long() - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H): the largest value per feature over real tokens (sentence-transformers' max)."""
    return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values


# sentence-transformers' pooling modes that mclip applies (collate pads on the right, so "cls" is token 0)
POOLERS = {"cls": lambda hidden, mask: hidden[:, 0], "mean": mean_pool, "max": max_pool, "lasttoken": last_token}
# Dense activations by the name modules.json stores (torch's own classes; nothing else is imported from a config)
ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": ("identity", torch.nn.Identity),
    "torch.nn.modules.activation.Tanh": ("tanh", torch.nn.Tanh),
    "torch.nn.modules.activation.ReLU": ("relu", torch.nn.ReLU),
    "torch.nn.modules.activation.GELU": ("gelu", torch.nn.GELU),
    "torch.nn.modules.activation.Sigmoid": ("sigmoid", torch.nn.Sigmoid),
}
MODULE_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")  # the sentence-transformers modules mclip applies


class SentenceHead(torch.nn.Module):
    """What a sentence-transformers folder applies after its Transformer, as its modules.json lists it: one Pooling, then
    Dense layers and Normalize in order. hidden (B, T, H), mask (B, T) -> (B, D)."""

    def __init__(self, pooling: str, steps: list[tuple[str, torch.nn.Module | None, str]]):
        """steps: (kind "dense" or "normalize", the Dense module (linear, activation) or None, its name in `describe`)."""
        super().__init__()
        assert pooling in POOLERS, pooling
        self.pooling, self.kinds, self.names = pooling, [k for k, _, _ in steps], [n for _, _, n in steps]
        self.layers = torch.nn.ModuleList([m if m is not None else torch.nn.Identity() for _, m, _ in steps])
        self.denses = [m[0] for k, m, _ in steps if k == "dense"]  # the linear layers, in order

    @property
    def dim(self) -> int | None:
        """The output width: the last Dense layer's, or None (the backbone's width) without one."""
        return int(self.denses[-1].out_features) if self.denses else None

    def describe(self) -> str:
        """What the manifest's pooling field records, e.g. "cls + dense(32->16, tanh) + normalize"."""
        return " + ".join([self.pooling, *self.names])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = POOLERS[self.pooling](hidden, mask)  # (B, H)
        for kind, layer in zip(self.kinds, self.layers):
            x = torch.nn.functional.normalize(x, dim=-1) if kind == "normalize" else layer(x)  # (B, D_i)
        return x


def weighted(*modules) -> list[torch.nn.Module]:
    """The modules that hold weights (a head of pooling and Normalize only adds nothing to a fingerprint)."""
    return [m for m in modules if m is not None and len(m.state_dict())]


@dataclass(frozen=True)
class SentenceModules:
    """What a sentence-transformers folder's modules.json says to apply (see `read_modules`)."""

    subfolder: str  # where the Transformer module's backbone lives ("" = the folder itself)
    head: SentenceHead
    max_seq_length: int | None  # the token limit sentence-transformers applies
    lowercase: bool  # its do_lower_case: texts are lowercased before tokenising


def _st_file(source: str, name: str) -> Path | None:
    """A file of a model folder or hub repo (downloaded when need be), or None when it has none."""
    local = Path(source).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
    )
    return Path(found) if found else None


def _st_json(source: str, name: str, teacher: str) -> dict:
    path = _st_file(source, name)
    if path is None:
        raise UserError(
            f"teacher {teacher!r} lists {name} in its modules.json but has no such file; "
            "restore it (save the model again with sentence-transformers)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"teacher {teacher!r}: {name} is not valid JSON ({first_line(exc, 120)}); restore the file"
        ) from None


def _pooling_mode(config: dict, where: str, teacher: str) -> str:
    """The one pooling mode of a Pooling module's config (sentence-transformers >= 6 `pooling_mode`, or the older
    pooling_mode_*_token booleans)."""
    mode = config.get("pooling_mode")
    if mode is None:  # the older layout: one boolean per mode
        legacy = {
            "pooling_mode_cls_token": "cls",
            "pooling_mode_max_tokens": "max",
            "pooling_mode_mean_tokens": "mean",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens": "weightedmean",
            "pooling_mode_lasttoken": "lasttoken",
        }
        mode = [m for key, m in legacy.items() if config.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise UserError(
            f"teacher {teacher!r}: {where} combines pooling modes {modes or 'none'}; mclip applies exactly one of "
            f"{', '.join(POOLERS)}: save a teacher with one pooling mode"
        )
    if modes[0] not in POOLERS:
        raise UserError(
            f"teacher {teacher!r}: {where} uses pooling mode {modes[0]!r}, which mclip does not apply; "
            f"supported: {', '.join(POOLERS)}"
        )
    return modes[0]


def _dense(source: str, path: str, teacher: str) -> tuple[torch.nn.Module, str]:
    """A Dense module (linear + activation) from its folder: config.json and safetensors (or a weights-only torch file)."""
    config = _st_json(source, f"{path}/config.json", teacher)
    if config.get("use_residual"):
        raise UserError(
            f"teacher {teacher!r}: {path} is a Dense layer with use_residual, which mclip does not apply; "
            "use a teacher without a residual Dense"
        )
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in ACTIVATIONS:
        raise UserError(
            f"teacher {teacher!r}: {path} uses activation {activation!r}, which mclip does not apply; "
            f"supported: {', '.join(name for name, _ in ACTIVATIONS.values())}"
        )
    name, act = ACTIVATIONS[activation]
    weights_file = _st_file(source, f"{path}/model.safetensors")
    if weights_file is not None:
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
    elif (weights_file := _st_file(source, f"{path}/pytorch_model.bin")) is not None:
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)  # weights only: no pickled code runs
    else:
        raise UserError(
            f"teacher {teacher!r}: {path} has no model.safetensors or pytorch_model.bin; restore the Dense weights"
        )
    bias = bool(config.get("bias", True))
    linear = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]), bias=bias)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    except RuntimeError as exc:
        raise UserError(
            f"teacher {teacher!r}: {path}'s weights do not fit its config ({first_line(exc, 160)}); restore the Dense folder"
        ) from None
    dims = f"{linear.in_features}->{linear.out_features}"
    return torch.nn.Sequential(linear, act()), f"dense({dims}, {name})" if name != "identity" else f"dense({dims})"


def read_modules(source: str, teacher: str) -> SentenceModules | None:
    """The embedding a sentence-transformers folder (or hub repo) defines in its modules.json, or None without one.

    sentence-transformers runs the listed modules in order; mclip does the same for Transformer, then one Pooling (cls,
    mean, max, lasttoken), then Dense and Normalize. Any other module would be silently skipped otherwise (a CLS-pooled
    BGE, or an mclip student's Dense projection, embedded mean-pooled in another space), so it is refused."""
    path = _st_file(source, "modules.json")
    if path is None:
        return None
    modules = _st_json(source, "modules.json", teacher)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise UserError(
            f"teacher {teacher!r}: modules.json is not a list of modules; restore it (save the model with sentence-transformers)"
        )
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    for module, kind in zip(modules, kinds):
        if kind not in MODULE_TYPES or not str(module["type"]).startswith("sentence_transformers."):
            raise UserError(
                f"teacher {teacher!r}: modules.json lists {module['type']!r}, which mclip cannot apply "
                f"(it applies {', '.join(MODULE_TYPES)}); use a teacher without it"
            )
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:].count("Pooling") or kinds[2:].count("Transformer"):
        raise UserError(
            f"teacher {teacher!r}: modules.json runs {' -> '.join(kinds)}; mclip applies Transformer -> Pooling -> "
            "Dense / Normalize in that order"
        )
    sub = str(modules[0].get("path") or "").strip("/")
    bert_name = f"{sub}/sentence_bert_config.json" if sub else "sentence_bert_config.json"
    bert_config = _st_json(source, bert_name, teacher) if _st_file(source, bert_name) is not None else {}
    pool_path = str(modules[1].get("path") or "")
    pooling = _pooling_mode(_st_json(source, f"{pool_path}/config.json", teacher), f"{pool_path}/config.json", teacher)
    steps = []
    for module, kind in zip(modules[2:], kinds[2:]):
        if kind == "Dense":
            layer, name = _dense(source, str(module.get("path") or ""), teacher)
            steps.append(("dense", layer, name))
        else:
            steps.append(("normalize", None, "normalize"))
    length = bert_config.get("max_seq_length")
    return SentenceModules(
        sub,
        SentenceHead(pooling, steps),
        int(length) if length else None,
        bool(bert_config.get("do_lower_case", False)),
    )
