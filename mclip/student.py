"""The student: a Hugging Face encoder + pooler + linear projection into the teacher's space; saved as one folder that
loads through `mclip.load`, plain transformers (+ the documented pooling/projection), and sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mclip import __version__, trust
from mclip.errors import UserError, first_line

POOLERS = ("mean", "cls")
META = "mclip.json"
DENSE_DIR = "2_Dense"
ONNX_FORMAT = "mclip-onnx"  # mclip.json's format in an `mclip export --format onnx` folder (mclip/export.py)
OPEN_CLIP_FORMAT = "mclip-open-clip"  # ... in an `mclip export --format open_clip` folder (mclip/deploy/open_clip.py)


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
        limit = int(getattr(backbone.config, "max_position_embeddings", max_length) or max_length)
        if getattr(backbone.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            limit -= 2  # RoBERTa-family position ids start after the padding index
        self.max_length = int(min(max_length, limit))
        self.meta = dict(meta or {})

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
        from mclip.texts import length_sorted

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

    from mclip.teacher import resolve_source

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


def extend_vocabulary(
    student: StudentEncoder,
    texts,
    min_word_count: int = 0,
    english=None,
    keep=(),
    min_piece_rate: float = 0.0,
    stems: int = 0,
    stem_piece_rate: float = 0.75,
) -> list[str]:
    """Add new tokens to the student for what its tokenizer reads badly in `texts`; returns the added tokens.

    Always: the characters it can only map to its unknown token (an English-vocabulary student reads most Chinese as
    [UNK]). With min_word_count > 0 also: whitespace-separated words seen at least that often that it splits into 2+
    pieces (a Latin vocabulary spells Cyrillic, Arabic or Hangul words letter by letter, and cuts "Großbuchstabe" into
    six), added as whole words. New rows start at the old embeddings' mean and covariance (transformers'
    resize_token_embeddings); with `english` (the English caption of each text, same order) they start aligned instead
    (`align_new_tokens`): with aligned rows, rare words are worth adding (min_word_count=1 lifted the demo most).

    `keep`: texts whose tokens must not change (the English training captions): a candidate the extended tokenizer would
    use in any of them is dropped, so a student initialised from the teacher still reads the teacher's English exactly
    as the teacher does, and equals it at step 0.

    `min_piece_rate`: only words split into at least this many pieces per character (`mclip.vocab.word_candidates`).
    `stems` > 0: also the stems shared by that many of the words split into `stem_piece_rate`+ pieces per character (those
    spelt letter by letter: not Latin script, by default; `mclip.vocab.stem_candidates`); then those stems and words of 3+
    characters match inside words too, so an unseen inflection of a training word starts from its stem's row.
    """
    import copy

    from tokenizers import AddedToken

    from mclip import vocab

    tok = student.tokenizer
    texts, keep = list(texts), sorted(set(keep))
    normalizer = getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)
    normal = [normalizer.normalize_str(t) for t in texts] if normalizer is not None else texts
    chars = sorted({c for text in normal for c in text if not c.isspace()})
    added: list = []
    if tok.unk_token_id is not None and chars:
        ids = tok(chars, add_special_tokens=False)["input_ids"]
        added += [c for c, seq in zip(chars, ids) if tok.unk_token_id in seq]  # SentencePiece reads one as [▁, <unk>]
    inside: set[str] = set()  # tokens that match inside words (stems, and words with them)
    if min_word_count > 0:
        words = vocab.word_candidates(tok, normal, set(added), min_word_count, min_piece_rate)
        if stems > 0:
            spelt = vocab.word_candidates(tok, normal, set(added), min_word_count, max(min_piece_rate, stem_piece_rate))
            known = tok.get_vocab()
            inside = {t for t in vocab.stem_candidates(spelt, stems) if t not in known}
            inside |= {w for w in spelt if len(w) >= vocab.STEM_MIN_CHARS}
        added += sorted(set(words) | inside)

    def token(
        t: str,
    ) -> AddedToken:  # single_word: a word matches whole words only; normalized: as the tokenizer normalises text
        return AddedToken(t, single_word=len(t) > 1 and t not in inside, normalized=True)

    while (
        added and keep
    ):  # drop what would change a kept text; again, since a dropped word can uncover a character inside it
        trial = copy.deepcopy(tok)
        trial.add_tokens([token(t) for t in added])
        first = len(tok)
        used = {i - first for seq in trial(keep, add_special_tokens=False)["input_ids"] for i in seq if i >= first}
        if not used:
            break
        new_ids = trial.convert_tokens_to_ids(added)
        added = [t for t, i in zip(added, new_ids) if i - first not in used]
    if not added:
        return []
    old_ids = None
    if english is not None:  # the English side in the old vocabulary, before any new token can claim its words
        english = list(english)
        unique = sorted(set(english))
        old_ids = dict(
            zip(
                unique,
                tok(unique, add_special_tokens=False, truncation=True, max_length=student.max_length)["input_ids"],
            )
        )
    first_new = len(tok)
    tok.add_tokens([token(t) for t in added])
    student.backbone.resize_token_embeddings(len(tok))
    if english is not None:
        align_new_tokens(student, texts, [old_ids[e] for e in english], first_new)
    return added


@torch.no_grad()
def align_new_tokens(student: StudentEncoder, texts: list[str], english_ids: list[list[int]], first_new: int) -> None:
    """Start each new token's input embedding at the mean, over the training texts that contain it, of their English
    captions' mean token embedding (the old vocabulary's own rows): "站" begins near the words its captions translate to,
    not at a random point. A one-step alignment from parallel text, in the spirit of WECHSEL / FOCUS initialisation.

    english_ids: each text's English caption tokenised with the vocabulary *before* the new tokens (so no English word
    vanishes into a new row); captions with no ordinary token (all special or unknown) add nothing, and a new token no
    such caption reaches keeps transformers' mean init."""
    assert len(texts) == len(english_ids), f"{len(texts)} texts but {len(english_ids)} English captions"
    table = student.backbone.get_input_embeddings().weight  # (V, H), the new rows at first_new:
    tok = student.tokenizer
    special = set(tok.all_special_ids)
    sums = torch.zeros(table.shape[0] - first_new, table.shape[1], dtype=torch.float64)
    counts = torch.zeros(table.shape[0] - first_new, dtype=torch.float64)
    centroids: dict[tuple, torch.Tensor | None] = {}  # mean old-token embedding per English caption
    for ids, en in zip(
        tok(texts, add_special_tokens=False, truncation=True, max_length=student.max_length)["input_ids"], english_ids
    ):
        new = sorted({t - first_new for t in ids if t >= first_new})
        if not new:
            continue
        key = tuple(en)
        if key not in centroids:
            old = [t for t in en if t < first_new and t not in special]
            centroids[key] = table[old].double().mean(0) if old else None
        if centroids[key] is not None:
            sums[new] += centroids[key]
            counts[new] += 1
    seen = counts > 0
    table[first_new:][seen] = (sums[seen] / counts[seen, None]).to(table.dtype)


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
        meta.get("format") == ONNX_FORMAT
    ):  # an `mclip export` folder: onnxruntime runs it (eval-retrieval can score it too)
        from mclip.export import load_onnx

        return load_onnx(path, device=None if device is None else str(device))
    if meta.get("format") == OPEN_CLIP_FORMAT:
        raise UserError(
            f"{path} is an open_clip export: load it with open_clip.create_model_and_transforms('local-dir:{path}'), "
            f"or pass the student it came from ({meta.get('source', 'a run final/ folder')})"
        )
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
