"""The student: a Hugging Face encoder + pooler + linear projection into the teacher's space; saved as one folder that
loads through `mclip.load`, plain transformers (+ the documented pooling/projection), and sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mclip import __version__
from mclip.errors import UserError, first_line
from mclip.models import onnx, trust
from mclip.models.teacher import resolve_source
from mclip.models.texts import length_sorted
from mclip.store.outputs import META

POOLERS = ("mean", "cls")
DENSE_DIR = "2_Dense"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooler: str) -> torch.Tensor:
    """hidden (B, T, H), mask (B, T) -> (B, H): masked mean, or the first ([CLS] / <s>) token."""
    if pooler == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class StudentEncoder(nn.Module):
    """backbone (B, T) -> pooled (B, H) -> projection (B, D). Constructed from ready objects; `load`/`build_student` take names."""

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer,
        dim: int,
        pooler: str = "mean",
        max_length: int = 128,
        projection: nn.Linear | None = None,
        meta: dict | None = None,
    ):
        super().__init__()
        if pooler not in POOLERS:
            raise UserError(f"pooler={pooler!r} is not valid; choose one of {', '.join(POOLERS)}")
        self.backbone, self.tokenizer, self.pooler = backbone, tokenizer, pooler
        self.hidden_size = int(backbone.config.hidden_size)
        self.dim = int(dim)
        self.projection = projection if projection is not None else nn.Linear(self.hidden_size, self.dim)
        assert self.projection.in_features == self.hidden_size and self.projection.out_features == self.dim, (
            f"projection {self.projection} does not map {self.hidden_size} -> {self.dim}"
        )
        self.max_length = int(min(max_length, self.position_limit or max_length))
        self.meta = dict(meta or {})

    @property
    def position_limit(self) -> int | None:
        """The most tokens the backbone's position embeddings hold (None when its config does not say)."""
        limit = getattr(self.backbone.config, "max_position_embeddings", None)
        if not limit:
            return None
        if getattr(self.backbone.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2  # RoBERTa-family position ids start after the padding index
        return int(limit)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_layers(self) -> int:
        return int(self.backbone.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False):
        """input_ids, attention_mask (B, T) -> embedding (B, D) not normalised, and all hidden states (or None)."""
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states
        )
        emb = self.projection(pool(out.last_hidden_state, attention_mask, self.pooler))
        return emb, (out.hidden_states if output_hidden_states else None)

    def tokenize(self, texts: Sequence[str]) -> dict:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        normalize: bool = True,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Texts -> (N, D) float32 numpy: length-sorted batches, truncation to the model's limit, any device."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if device is not None:
            self.to(device)
        self.eval()
        dev = self.device

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx in length_sorted(texts, batch_size, show_progress):
            enc = self.tokenize([texts[i] for i in idx])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                emb, _ = self(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
            emb = emb.float()
            if normalize:
                emb = nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
        return out[0] if single else out

    def save(self, path: str | Path) -> Path:
        """One folder: HF backbone + tokenizer (safetensors), sentence-transformers modules, and mclip.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.save_modules(path)
        # what this object is wins over what a loaded folder's meta said (an older version, another max_length)
        _write_json(
            path / META,
            {
                **self.meta,
                "format": "mclip-student",
                "mclip_version": __version__,
                "pooler": self.pooler,
                "dim": self.dim,
                "hidden_size": self.hidden_size,
                "max_length": self.max_length,
                "projection": DENSE_DIR,
                "normalize": True,
            },
        )
        return path

    def save_modules(self, path: Path) -> None:
        """sentence-transformers' files after the backbone: modules.json, 1_Pooling, 2_Dense (the projection), 3_Normalize.
        An ONNX export writes them too, so sentence-transformers' ONNX backend pools and projects as mclip does."""
        from safetensors.torch import save_file

        _write_json(
            path / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": DENSE_DIR, "type": "sentence_transformers.models.Dense"},
                {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
        )
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
        _write_json(
            path / "config_sentence_transformers.json",
            {
                "__version__": {"mclip": __version__},
                "prompts": {},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )
        _write_json(
            path / "1_Pooling" / "config.json",
            {
                "word_embedding_dimension": self.hidden_size,
                "pooling_mode_cls_token": self.pooler == "cls",
                "pooling_mode_mean_tokens": self.pooler == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
        )
        _write_json(
            path / DENSE_DIR / "config.json",
            {
                "in_features": self.hidden_size,
                "out_features": self.dim,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        save_file(
            {
                "linear.weight": self.projection.weight.detach().cpu().contiguous(),
                "linear.bias": self.projection.bias.detach().cpu().contiguous(),
            },
            str(path / DENSE_DIR / "model.safetensors"),
        )
        (path / "3_Normalize").mkdir(exist_ok=True)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _backbone(name_or_path: str, trust_remote_code: bool, ours: bool = False):
    """The HF encoder and tokenizer; `ours`: a folder mclip wrote, so its weights must be safetensors (never a pickle)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    name_or_path = resolve_source(str(name_or_path))
    trust.check_folder(name_or_path, trust_remote_code, "student")
    if ours and not (Path(name_or_path) / "model.safetensors").is_file():
        raise UserError(
            f"{name_or_path} has no model.safetensors; mclip loads its own students from safetensors only "
            "(never pickled weights): point to a folder written by mclip"
        )
    try:
        config = AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        trust.check_config(config, str(name_or_path), trust_remote_code, "student")
        backbone = AutoModel.from_pretrained(
            str(name_or_path),
            config=config,
            trust_remote_code=trust_remote_code,
            use_safetensors=True if ours else None,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if trust.is_remote_code_error(exc):
            raise trust.refusal("student", str(name_or_path), "a model_type only its own code defines") from None
        first = first_line(exc, 200)
        raise UserError(
            f"cannot load student {str(name_or_path)!r}: {first}; pass a hub id or a folder with config.json"
        ) from None
    if hasattr(backbone, "text_model") and not hasattr(backbone.config, "hidden_size"):
        raise UserError(f"{name_or_path!r} is a two-tower model; pass a text encoder as --student")
    return backbone, tokenizer


PROJECTION_INITS = ("auto", "identity", "random")


def build_student(
    name_or_path: str,
    dim: int,
    pooler: str = "mean",
    max_length: int = 128,
    trust_remote_code: bool = False,
    meta: dict | None = None,
    projection_init: str = "auto",
) -> StudentEncoder:
    """A fresh student from any HF encoder (hub id or folder) with a new projection to `dim`.

    projection_init "identity" (what "auto" picks when the hidden size equals `dim`) starts the projection as the identity:
    a student initialised from the teacher's own weights then reproduces the teacher from step 0 (Reimers & Gurevych 2020).
    """
    backbone, tokenizer = _backbone(name_or_path, trust_remote_code)
    hidden = int(backbone.config.hidden_size)
    projection = None
    if projection_init == "identity" or (projection_init == "auto" and hidden == dim):
        if hidden != dim:
            raise UserError(
                f"projection_init=identity needs the student's hidden size ({hidden}) to equal the teacher's dim ({dim}); use random"
            )
        projection = nn.Linear(hidden, dim)
        with torch.no_grad():
            projection.weight.copy_(torch.eye(dim))
            projection.bias.zero_()
    return StudentEncoder(
        backbone, tokenizer, dim, pooler=pooler, max_length=max_length, projection=projection, meta=meta
    )


def load(path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False) -> StudentEncoder:
    """Load an exported student folder (a run's `final/`) written by `StudentEncoder.save`."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / META
    if not meta_path.exists():
        raise UserError(
            f"{path} is not an exported mclip student (no {META}); pass a run's final/ folder or a checkpoint folder"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if (
        meta.get("format") == onnx.FORMAT
    ):  # an `mclip export` folder: onnxruntime runs it (eval-retrieval can score it too)
        return onnx.load_onnx(path, device=None if device is None else str(device))
    backbone, tokenizer = _backbone(str(path), trust_remote_code, ours=True)
    weights = load_file(str(path / meta.get("projection", DENSE_DIR) / "model.safetensors"))
    projection = nn.Linear(weights["linear.weight"].shape[1], weights["linear.weight"].shape[0])
    projection.load_state_dict({"weight": weights["linear.weight"], "bias": weights["linear.bias"]})
    model = StudentEncoder(
        backbone,
        tokenizer,
        meta["dim"],
        pooler=meta["pooler"],
        max_length=meta["max_length"],
        projection=projection,
        meta=meta,
    ).eval()
    return model.to(device) if device is not None else model


def model_folder(path: str | Path) -> Path:
    """The student folder behind --model: an exported student or checkpoint (has mclip.json), or a run folder's final/."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model {path} does not exist; pass a run's final/ folder, a checkpoint folder or a run folder")
    if (path / META).is_file():
        return path
    if (path / "final" / META).is_file():
        return path / "final"
    steps = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / META).is_file())
    if steps:
        raise UserError(f"run {path} has no final/ student yet; pass a checkpoint such as --model {steps[-1]}")
    raise UserError(
        f"{path} is not an mclip student (no {META}, no final/{META}); pass a run's final/ folder or a checkpoint folder"
    )
