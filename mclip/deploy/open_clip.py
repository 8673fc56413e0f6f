"""`mclip export --format open_clip`: a student and its teacher's image tower as one open_clip model folder, which
`open_clip.create_model_and_transforms("local-dir:DIR")` and `open_clip.get_tokenizer("local-dir:DIR")` load; checked
against mclip and the teacher before the folder appears.

The folder: open_clip_config.json (model_cfg: open_clip's HF text tower over the student's backbone and the teacher's
ViT as open_clip's VisionTransformer; preprocess_cfg from the teacher's image processor), open_clip_model.safetensors
(text.transformer.* and text.proj from the student; visual.* and logit_scale converted from the teacher's Hugging Face
CLIPModel), the backbone's config.json and the student's tokenizer (what open_clip's HFTextEncoder and HFTokenizer
read: `hf_model_name` is the folder's absolute path), mclip.json and checksums.sha256.

open_clip's HF text projection is a Linear without bias; mclip's has one. It is folded into the backbone's last
LayerNorm, whose output is every token's last hidden state: shifting those states by c with W c = b shifts the mean
(or CLS) vector by c, and W (h + c) = W h + b. Such a c exists iff b lies in W's column space, always when W (D x H) has
rank D; otherwise the export is refused. Token states (open_clip's output_tokens=True) carry the shift. The backbone's
dropout is 0 in the folder's config.json, so the model embeds exactly in train mode too (set it back to fine-tune).

Writing needs neither open_clip nor torchvision (open_clip imports torchvision, whose wheels load beside their own torch
build only). The check runs the written files through a plain torch forward that follows open_clip's HFTextEncoder and
VisionTransformer (tests hold it to open_clip's own), and through open_clip as well where open_clip imports.
"""

from __future__ import annotations

import copy
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mclip import __version__
from mclip.config import ExportConfig, to_dict
from mclip.deploy.probes import PROBES, RERUN, check_tokenizer, cosines, is_tokenizer_file
from mclip.errors import UserError, first_line
from mclip.models.card import CARD, write_card
from mclip.models.onnx import is_export
from mclip.models.student import OPEN_CLIP_FORMAT, StudentEncoder, load, model_folder
from mclip.models.teacher import fingerprint, load_teacher, resolve_source
from mclip.store import outputs
from mclip.store.outputs import META
from mclip.store.verify import write_checksums

CONFIG = "open_clip_config.json"  # the names open_clip's local-dir: loader looks for
WEIGHTS = "open_clip_model.safetensors"
TEXT_TYPES = ("bert", "roberta", "xlm-roberta")  # in open_clip's HF text tower (hf_configs) and ending in a LayerNorm
# mclip's poolers in open_clip's names (its cls_pooler would take BERT's tanh pooler output instead of the CLS state)
POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
QUICK_GELU = {"quick_gelu": True, "gelu": False}  # Hugging Face hidden_act -> open_clip's quick_gelu
INTERPOLATIONS = {2: "bilinear", 3: "bicubic"}  # PIL resample codes
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")  # BERT, RoBERTa, XLM-R
MIN_COSINE = 0.9999  # export vs mclip.load(model).encode, and vs the teacher's get_image_features
FOLD_TOLERANCE = 1e-6  # |W c - b| / |b| in float64: exact up to rounding, or the bias is outside W's column space
# open_clip's HFTokenizer runs ftfy before tokenising, which rewrites ligatures and fullwidth letters as NFKC does;
# the check uses the texts it leaves alone, so both sides tokenise the same string.
TEXTS = tuple(text for text in PROBES if unicodedata.normalize("NFKC", text) == text)


@dataclass
class OpenClipResult:
    out: Path
    teacher: str
    text_cosine: float  # least over TEXTS: encode_text of the export vs mclip.load(model).encode
    image_cosine: float  # least over the probe images: encode_image vs the teacher's get_image_features
    checked_with: tuple[str, ...]  # "torch" (open_clip's forward in plain torch), and "open_clip X" where it imports
    fold_residual: float  # |W c - b| / |b| of the folded projection bias
    seconds: float


def _owned(name: str) -> bool:
    """What a previous open_clip export wrote (what --overwrite may replace)."""
    return name in (CONFIG, WEIGHTS, META, CARD, "config.json", "checksums.sha256") or is_tokenizer_file(name)


# ---- the text tower: the student's backbone, its pooler and its projection with the bias folded in ----


def fold_bias(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, float]:
    """weight (D, H), bias (D,) -> c (H,) with weight @ c == bias (least squares in float64), and the residual
    |weight c - bias| / |bias|. Exact iff bias lies in weight's column space, as it always does when weight has rank D
    (D <= H)."""
    w, b = weight.detach().double(), bias.detach().double()
    c = torch.linalg.pinv(w) @ b  # (H,)
    residual = float((w @ c - b).norm() / b.norm().clamp(min=1e-30)) if b.any() else 0.0
    return c.float(), residual


def last_layer_norm(student: StudentEncoder) -> str:
    """The backbone's last LayerNorm bias: BERT, RoBERTa and XLM-R end every layer with one over all tokens, and the
    last one's output is last_hidden_state."""
    return f"encoder.layer.{student.num_layers - 1}.output.LayerNorm.bias"


def check_student(student: StudentEncoder, folder: Path) -> None:
    """Refuse a student open_clip's HF text tower cannot run exactly."""
    kind = student.backbone.config.model_type
    if kind not in TEXT_TYPES:
        raise UserError(
            f"student {folder} is a {kind} model; open_clip's HF text tower runs {', '.join(TEXT_TYPES)} backbones "
            "(with mclip's pooling and projection), so export it with --format onnx instead"
        )
    pad, masked = student.tokenizer.pad_token_id, student.backbone.config.pad_token_id
    if pad is None or pad != masked:
        raise UserError(
            f"student {folder}: open_clip masks the tokens equal to config.json's pad_token_id ({masked}) but the "
            f"tokenizer pads with {pad}; set pad_token_id in {folder}/config.json to the tokenizer's pad token id"
        )


def text_weights(student: StudentEncoder, folder: Path) -> tuple[dict[str, torch.Tensor], float]:
    """open_clip's names for the student: text.transformer.* = the backbone without its pooler (open_clip builds it with
    add_pooling_layer=False), the projection's bias folded into the last LayerNorm, text.proj.weight = the projection's
    weight. Refuses a bias that cannot be folded exactly. Returns the weights and the fold's residual."""
    weight, bias = student.projection.weight, student.projection.bias
    shift, residual = fold_bias(weight, bias)
    if not residual <= FOLD_TOLERANCE:
        rank = int(torch.linalg.matrix_rank(weight.detach().double()))
        raise UserError(
            f"student {folder}: its projection's bias cannot be folded into the backbone (open_clip's HF text "
            f"projection has none): the {student.dim}x{student.hidden_size} weight has rank {rank} < {student.dim} and "
            f"the bias lies outside its span (residual {residual:.2g}); export with --format onnx, or train a student "
            f"at least {student.dim} wide"
        )
    state = {k: v for k, v in student.backbone.state_dict().items() if not k.startswith("pooler.")}
    last = last_layer_norm(student)
    assert last in state, f"{last} is not in the {student.backbone.config.model_type} backbone"
    state[last] = state[last] + shift.to(state[last].dtype)  # every token's last hidden state moves by c
    weights = {f"text.transformer.{k}": v for k, v in state.items()}
    weights["text.proj.weight"] = weight
    return {k: v.detach().float().contiguous() for k, v in weights.items()}, residual


def text_cfg(student: StudentEncoder, where: Path) -> dict:
    """open_clip's text_cfg: its HF text tower over the backbone config.json in `where`, the student's pooler, a linear
    projection without bias, the student's token limit."""
    location = str(Path(where).resolve())
    return {
        "hf_model_name": location,
        "hf_tokenizer_name": location,
        "hf_pooler_type": POOLERS[student.pooler],
        "hf_proj_type": "linear",
        "context_length": student.max_length,
    }


# ---- the image tower: the teacher's CLIPModel in open_clip's names ----


def vision_cfg(config, name: str) -> tuple[dict, bool]:
    """open_clip's vision_cfg and quick_gelu for a Hugging Face CLIPConfig; refuses what its ViT cannot express."""
    vision = config.vision_config
    width, heads, mlp = int(vision.hidden_size), int(vision.num_attention_heads), int(vision.intermediate_size)
    ratio = mlp / width
    problems = []
    if vision.hidden_act not in QUICK_GELU:
        problems.append(f"activation {vision.hidden_act} (open_clip's ViT has gelu and quick_gelu)")
    if int(getattr(vision, "num_channels", 3)) != 3:
        problems.append(f"{vision.num_channels} input channels (open_clip's ViT takes RGB)")
    if width % heads or int(width * ratio) != mlp:
        problems.append(f"width {width}, {heads} heads, MLP {mlp}")
    if problems:
        raise UserError(
            f"teacher {name}'s vision tower has {'; '.join(problems)}, which open_clip's VisionTransformer cannot "
            "express; export with --format onnx and pair it with the teacher yourself"
        )
    cfg = {
        "image_size": int(vision.image_size),
        "patch_size": int(vision.patch_size),
        "width": width,
        "layers": int(vision.num_hidden_layers),
        "head_width": width // heads,
        "mlp_ratio": ratio,
    }
    if float(vision.layer_norm_eps) != 1e-5:  # torch's default, open_clip's LayerNorm's
        cfg["norm_kwargs"] = {"eps": float(vision.layer_norm_eps)}
    return cfg, QUICK_GELU[vision.hidden_act]


def vision_weights(model, name: str) -> dict[str, torch.Tensor]:
    """open_clip's names for a Hugging Face CLIPModel's vision tower, visual projection and logit scale (both compute
    the same ViT; open_clip stacks q, k, v in nn.MultiheadAttention's in_proj and computes `pooled @ proj`)."""
    state = model.state_dict()
    hf = "vision_model."
    weights = {
        "visual.conv1.weight": state[hf + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": state[hf + "embeddings.class_embedding"],
        "visual.positional_embedding": state[hf + "embeddings.position_embedding.weight"],
        "visual.proj": state["visual_projection.weight"].T,  # (W, D)
        "logit_scale": state["logit_scale"],
    }
    used = {hf + "embeddings." + k for k in ("patch_embedding.weight", "class_embedding", "position_embedding.weight")}
    pairs = [("visual.ln_pre", hf + "pre_layrnorm"), ("visual.ln_post", hf + "post_layernorm")]
    for i in range(int(model.config.vision_config.num_hidden_layers)):
        ours, theirs = f"visual.transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [f"{theirs}self_attn.{x}_proj.{kind}" for x in "qkv"]
            weights[f"{ours}attn.in_proj_{kind}"] = torch.cat([state[k] for k in qkv])
            used.update(qkv)
        pairs += [
            (ours + "ln_1", theirs + "layer_norm1"),
            (ours + "ln_2", theirs + "layer_norm2"),
            (ours + "attn.out_proj", theirs + "self_attn.out_proj"),
            (ours + "mlp.c_fc", theirs + "mlp.fc1"),
            (ours + "mlp.c_proj", theirs + "mlp.fc2"),
        ]
    for ours, theirs in pairs:
        for kind in ("weight", "bias"):
            weights[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
            used.add(f"{theirs}.{kind}")
    left = sorted(k for k in state if k.startswith(hf) and k not in used and not k.endswith("position_ids"))
    if left:
        raise UserError(
            f"teacher {name}'s vision tower has weights open_clip's ViT has no place for ({', '.join(left[:3])}); "
            "export with --format onnx and pair it with the teacher yourself"
        )
    return {k: v.detach().float().contiguous() for k, v in weights.items()}


def _given(size) -> dict:
    """The sizes an image processor's size or crop_size sets (a dict, or transformers 5's SizeDict)."""
    return {k: size.get(k) for k in ("shortest_edge", "height", "width") if size.get(k) is not None}


def preprocess_cfg(processor, image_size: int, name: str) -> dict:
    """open_clip's preprocess_cfg for a CLIPImageProcessor: what open_clip's eval transform does the same way (resize
    the shortest side to the crop size and centre-crop it, or squash to a square); refuses the rest."""
    size, crop = processor.size, processor.crop_size
    square = {"height": image_size, "width": image_size}
    cropped = bool(processor.do_center_crop) and {k: crop.get(k) for k in square} == square
    if processor.do_resize and size.get("shortest_edge") == image_size and cropped:
        mode = "shortest"
    elif (
        processor.do_resize and {k: size.get(k) for k in square} == square and (cropped or not processor.do_center_crop)
    ):
        mode = "squash"
    else:
        mode = None
    resample = int(processor.resample)
    rescaled = bool(processor.do_rescale) and abs(float(processor.rescale_factor) - 1 / 255) < 1e-9
    if mode is None or resample not in INTERPOLATIONS or not rescaled or not processor.do_normalize:
        raise UserError(
            f"teacher {name}'s image processor (resize {_given(size)}, crop {_given(crop)}, resample {resample}) does "
            f"what open_clip's transform cannot (it resizes the shortest side to the {image_size}-pixel input and "
            "centre-crops, or squashes to it); export with --format onnx instead"
        )
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": [float(x) for x in processor.image_mean],
        "std": [float(x) for x in processor.image_std],
        "interpolation": INTERPOLATIONS[resample],
        "resize_mode": mode,
    }


class _Weights:
    """Some of a model's tensors, where `teacher.fingerprint` reads a module (its state_dict)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors


def load_clip_teacher(config: ExportConfig, student: StudentEncoder, folder: Path):
    """The student's teacher as a full CLIP (text + vision, fp32, CPU), checked by its fingerprint: the one the student
    records (text and vision, or its text tower alone, as a cache without images records it), or --teacher."""
    from transformers import AutoConfig

    recorded = student.meta.get("teacher") or {}
    name = config.teacher or recorded.get("name")
    if not name:
        raise UserError(
            f"student {folder} records no teacher; pass --teacher with the CLIP checkpoint it was distilled from"
        )
    if config.teacher is None and recorded.get("kind") not in (None, "clip"):
        raise UserError(
            f"student {folder} was distilled from {name!r}, a text encoder ({recorded.get('pooling')}), not a CLIP: "
            "no image tower shares its space, so there is no whole CLIP to export; use --format onnx"
        )
    try:
        # model_type needs no code: a config that does fails here, and load_teacher applies the trust rules
        kind = AutoConfig.from_pretrained(resolve_source(str(name)), trust_remote_code=False).model_type
    except (OSError, ValueError):
        kind = None  # load_teacher says what is wrong in its own words
    if kind is not None and kind != "clip":
        raise UserError(
            f"teacher {name!r} is a {kind} model without a vision tower; an open_clip export joins the student to "
            "its teacher's image tower: pass --teacher with the full CLIP checkpoint (text + vision) it was distilled "
            "from"
        )
    teacher = load_teacher(str(name), need_images=True, trust_remote_code=config.trust_remote_code)
    if not hasattr(teacher.model, "vision_model"):
        raise UserError(f"teacher {name!r} has no vision tower; pass --teacher with a full CLIP checkpoint")
    if int(teacher.dim) != student.dim:
        raise UserError(
            f"teacher {name!r} makes {teacher.dim}-d embeddings but student {folder} {student.dim}-d ones; "
            "pass --teacher with the CLIP it was distilled from"
        )
    want = recorded.get("fingerprint")
    if want:
        text = {
            k: v for k, v in teacher.model.state_dict().items() if k.startswith(("text_model.", "text_projection."))
        }
        if want not in (teacher.info().fingerprint, fingerprint(_Weights(text))):
            raise UserError(
                f"teacher {name!r} has other weights than {recorded.get('name')!r} ({want[:12]}), which student "
                f"{folder} was distilled from; pass --teacher with that checkpoint"
            )
    elif config.progress:
        print(
            f"mclip: warning: student {folder} records no teacher fingerprint, so {name!r} is taken on trust as the "
            "CLIP whose space it learnt",
            file=sys.stderr,
        )
    return teacher


def probe_images() -> list:
    """Synthetic RGB images (PIL) of several sizes and aspect ratios: noise, a gradient, stripes, a flat colour."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:80]
    arrays = [
        rng.integers(0, 256, (64, 64, 3)),
        np.stack([x * 3, y * 5, (x + y) * 2], -1) % 256,
        np.repeat(np.where((x // 6) % 2 == 0, 230, 20)[..., None], 3, -1),
        np.broadcast_to(np.array([200, 120, 40]), (40, 30, 3)),
        rng.integers(0, 256, (30, 90, 3)),
    ]
    return [Image.fromarray(np.ascontiguousarray(a).astype(np.uint8)) for a in arrays]


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """CLIPModel.get_image_features as a (B, D) tensor (transformers 5 returns it as the output's pooler_output)."""
    out = model.get_image_features(pixel_values=pixels)
    return getattr(out, "pooler_output", out)


# ---- open_clip's forward in plain torch, on the files as written ----


@torch.inference_mode()
def torch_text(folder: Path, weights: dict, text: dict, texts: list[str]) -> torch.Tensor:
    """(N, D): what open_clip's HFTokenizer and HFTextEncoder compute from the folder's config.json, tokenizer and
    weights: padding to context_length, a mask of the non-pad tokens, the backbone without pooler, the pooler, the
    bias-free projection. (HFTokenizer cleans the text with ftfy first; see TEXTS.)"""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)  # BERT, RoBERTa, XLM-R: no code
    backbone = AutoModel.from_config(config, add_pooling_layer=False).eval()
    prefix = "text.transformer."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    ids = tokenizer(
        texts, return_tensors="pt", max_length=text["context_length"], padding="max_length", truncation=True
    ).input_ids  # (N, T)
    mask = (ids != config.pad_token_id).long()
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, H)
    if text["hf_pooler_type"] == POOLERS["cls"]:
        pooled = hidden[:, 0]
    else:
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
    return pooled @ weights["text.proj.weight"].T  # (N, D)


@torch.inference_mode()
def torch_image(weights: dict, vision: dict, quick_gelu: bool, pixels: torch.Tensor) -> torch.Tensor:
    """(B, D): open_clip's VisionTransformer (class token pooled, ln_post before pooling, learnt positions) on the
    weights as written, for pixels (B, 3, S, S)."""
    F = torch.nn.functional
    eps = (vision.get("norm_kwargs") or {}).get("eps", 1e-5)
    heads = vision["width"] // vision["head_width"]

    def w(name: str) -> torch.Tensor:
        return weights[f"visual.{name}"]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w(f"{name}.weight"), w(f"{name}.bias"), eps)

    x = F.conv2d(pixels, w("conv1.weight"), stride=vision["patch_size"]).flatten(2).transpose(1, 2)  # (B, P, W)
    x = torch.cat([w("class_embedding").expand(x.shape[0], 1, -1), x], 1) + w("positional_embedding")
    x = norm(x, "ln_pre")
    for i in range(vision["layers"]):
        block = f"transformer.resblocks.{i}."
        qkv = F.linear(norm(x, block + "ln_1"), w(block + "attn.in_proj_weight"), w(block + "attn.in_proj_bias"))
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))  # (B, heads, P, W / heads)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, P, W)
        x = x + F.linear(attended, w(block + "attn.out_proj.weight"), w(block + "attn.out_proj.bias"))
        hidden = F.linear(norm(x, block + "ln_2"), w(block + "mlp.c_fc.weight"), w(block + "mlp.c_fc.bias"))
        hidden = hidden * torch.sigmoid(1.702 * hidden) if quick_gelu else F.gelu(hidden)
        x = x + F.linear(hidden, w(block + "mlp.c_proj.weight"), w(block + "mlp.c_proj.bias"))
    return norm(x, "ln_post")[:, 0] @ w("proj")  # (B, D)


def import_open_clip():
    """open_clip where it imports here, else None and why (its torchvision loads beside its own torch build only)."""
    try:
        import open_clip
    except ImportError:
        return None, "open_clip is not installed here"
    except RuntimeError as exc:  # torchvision built for another torch: "operator torchvision::nms does not exist"
        return None, f"open_clip does not import beside this torch ({first_line(exc, 100)})"
    return open_clip, None


@torch.inference_mode()
def open_clip_features(
    open_clip, folder: Path, texts: list[str], pixels: torch.Tensor, out: Path
) -> tuple[np.ndarray, np.ndarray]:
    """encode_text (open_clip's own tokenizer) and encode_image of the folder as open_clip loads it."""
    try:
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except (RuntimeError, ValueError, KeyError, OSError) as exc:  # open_clip's own errors, whatever the version
        raise UserError(
            f"open_clip {open_clip.__version__} cannot load the export ({type(exc).__name__}: {first_line(exc, 160)}); "
            f"nothing was written to {out}; report this with the student's and the teacher's config.json"
        ) from exc
    model.eval()
    return model.encode_text(tokenizer(texts)).numpy(), model.encode_image(pixels).numpy()


def _agree(got: np.ndarray, want: np.ndarray, what: str, probes: list[str], checker: str, out: Path) -> float:
    """The least cosine of got vs want (N, D) row by row; one below MIN_COSINE (or NaN) is refused in one line."""
    cos = cosines(got, want)
    if not cos.min() >= MIN_COSINE:
        worst = probes[int(np.argmin(np.nan_to_num(cos, nan=-2.0)))]
        raise UserError(
            f"the open_clip export disagrees with {what}: cosine {cos.min():.6f} < {MIN_COSINE} on {worst[:40]!r} "
            f"({checker}); nothing was written to {out}; report this with the student's and the teacher's config.json"
        )
    return round(float(cos.min()), 7)


def run(config: ExportConfig) -> OpenClipResult:
    """Convert, write beside --out, check the written folder against the student and the teacher, and only then rename
    it onto --out."""
    start = time.perf_counter()
    from safetensors.torch import save_file

    out = Path(config.out)
    folder = model_folder(config.model)
    if is_export(folder):
        raise UserError(f"{folder} is an ONNX export; pass the student it came from (a run's final/ folder)")
    check_tokenizer(folder)
    outputs.check(out, config.overwrite, owned=_owned, command="export")
    student = load(folder, device="cpu", trust_remote_code=config.trust_remote_code).eval()
    check_student(student, folder)
    teacher = load_clip_teacher(config, student, folder)
    vision, quick_gelu = vision_cfg(teacher.model.config, teacher.name)
    preprocess = preprocess_cfg(teacher.image_processor, vision["image_size"], teacher.name)
    text_part, residual = text_weights(student, folder)
    weights = text_part | vision_weights(teacher.model, teacher.name)

    texts = list(TEXTS)
    want_text = student.encode(texts, batch_size=8)  # (N, D): mclip.load(model).encode
    pixels = teacher.image_processor(images=probe_images(), return_tensors="pt")["pixel_values"]  # (B, 3, S, S)
    with torch.inference_mode():
        want_image = image_features(teacher.model, pixels).numpy()  # (B, D)
    report: dict = {}

    def model_cfg(where: Path) -> dict:
        return {
            "embed_dim": student.dim,
            "quick_gelu": quick_gelu,
            "vision_cfg": vision,
            "text_cfg": text_cfg(student, where),
        }

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        # config.json: what open_clip's HFTextEncoder builds the backbone from (its weights are in WEIGHTS), without
        # dropout: open_clip returns models in train mode, and loaders that never call eval() (all_clip, which
        # clip-retrieval uses) would otherwise embed each text differently every time
        backbone = copy.deepcopy(student.backbone.config)
        for name in DROPOUTS:
            if getattr(backbone, name, None):
                setattr(backbone, name, 0.0)
        backbone.save_pretrained(tmp)
        student.tokenizer.save_pretrained(tmp)
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg = model_cfg(tmp)  # open_clip finds the backbone's config.json here while the check loads it from tmp
        outputs.write_json(tmp / CONFIG, {"model_cfg": cfg, "preprocess_cfg": preprocess})
        checks = {
            "torch": (
                torch_text(tmp, weights, cfg["text_cfg"], texts).numpy(),
                torch_image(weights, vision, quick_gelu, pixels).numpy(),
            )
        }
        open_clip, why = import_open_clip()
        if open_clip is not None:
            checks[f"open_clip {open_clip.__version__}"] = open_clip_features(open_clip, tmp, texts, pixels, out)
        images = [f"probe image {i}" for i in range(len(pixels))]
        verification = {
            name: {
                "text": _agree(got_text, want_text, "mclip.load(model).encode", texts, name, out),
                "image": _agree(got_image, want_image, f"{teacher.name}'s get_image_features", images, name, out),
            }
            for name, (got_text, got_image) in checks.items()
        }
        report.update(checks=tuple(checks), why=why)
        report.update({part: min(v[part] for v in verification.values()) for part in ("text", "image")})
        # where the folder will be: open_clip reads the backbone's config.json from hf_model_name
        outputs.write_json(tmp / CONFIG, {"model_cfg": model_cfg(out), "preprocess_cfg": preprocess})
        meta = {
            "format": OPEN_CLIP_FORMAT,
            "mclip_version": __version__,
            "pooler": student.pooler,
            "dim": student.dim,
            "hidden_size": student.hidden_size,
            "max_length": student.max_length,
            "teacher": student.meta.get("teacher"),
            "image_tower": {"from": teacher.name, "fingerprint": teacher.info().fingerprint},
            "languages": student.meta.get("languages"),
            "source": str(folder),
            "projection_bias": {"folded_into": f"text.transformer.{last_layer_norm(student)}", "residual": residual},
            "verification": {
                "texts": len(texts),
                "images": len(pixels),
                "min_cosine": MIN_COSINE,
                "least_cosine": verification,
                "against": ["mclip.load(source).encode", "the teacher's CLIPModel.get_image_features"],
                **({"open_clip": f"not run: {why}"} if why else {}),
            },
            "config": to_dict(config),
        }
        outputs.write_json(tmp / META, meta)
        write_card(
            tmp, {**student.meta, **meta}, kind="open_clip"
        )  # the student's recipe and figures, this folder's use
        write_checksums(tmp)  # last: `mclip verify DIR` (and sha256sum -c) check the export

    workspace = out.with_name(f".{out.name}.export")  # beside --out: the rename onto it stays on one filesystem
    with outputs.hold(workspace, "export"):
        outputs.write_folder(out, workspace / "folder", fill, RERUN)
    result = OpenClipResult(
        out, teacher.name, report["text"], report["image"], report["checks"], residual, time.perf_counter() - start
    )
    if config.progress:
        note = f"; open_clip itself not run: {report['why']}" if report["why"] else ""
        print(
            f"export: {folder} + the vision tower of {teacher.name} -> {out} (open_clip); least cosine to "
            f"mclip.load(model).encode over {len(texts)} texts {result.text_cosine:.6f}, to the teacher's image "
            f"features over {len(pixels)} images {result.image_cosine:.6f} "
            f"(checked with {', '.join(result.checked_with)}{note}) ({result.seconds:.1f}s)",
            file=sys.stderr,
        )
    return result
