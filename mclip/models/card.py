"""The model card: README.md of a trained student (a run's final/) and of every export, as the Hugging Face Hub reads
it.

Metadata through huggingface_hub's ModelCardData (library, base model, languages, tags, pipeline tag), then what the
model is, the teacher whose space it reproduces (with its weights' fingerprint), the data and recipe it was trained
with, its last validation figures, stage 3's retrieval table when `mclip run` made it, and how to load it with each
library the folder works with. The license is left out of the metadata: it follows from the student's, the teacher's
and the captions' terms, which only the user can weigh.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mclip.config import TrainConfig, to_dict
from mclip.store.outputs import META, atomic_write_bytes, file_sha256
from mclip.store.verify import listed, update_checksum

CARD = "README.md"
TAGS = ("mclip", "clip", "multilingual", "knowledge-distillation", "sentence-similarity")
# A hub id: `name` or `org/name`; a value with a data-file suffix or that exists here is a local file, not an id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zst")


@dataclass(frozen=True)
class Kind:
    """What a folder is and what loads it."""

    library: str  # the Hub's library_name
    pipeline_tag: str
    tags: tuple[str, ...]  # beside TAGS
    title: str  # what the folder holds, after the model's name


KINDS = {
    # a run's final/: mclip, sentence-transformers (modules.json ...), and transformers + 2_Dense (all three tested)
    "student": Kind(
        "sentence-transformers", "sentence-similarity", ("sentence-transformers", "feature-extraction"), ""
    ),
    # `mclip export --format onnx`: onnxruntime through mclip.load; the layout of sentence-transformers' ONNX backend
    "onnx": Kind("sentence-transformers", "sentence-similarity", ("onnx", "feature-extraction"), " (ONNX)"),
    # `mclip export --format open_clip`: one CLIP, the student's text tower beside the teacher's vision tower
    "open_clip": Kind(
        "open_clip", "zero-shot-image-classification", ("open_clip", "zero-shot-image-classification"), ""
    ),
}
FORMATS = {
    "mclip-student": "student",
    "mclip-onnx": "onnx",
    "mclip-open-clip": "open_clip",
}  # mclip.json's format -> kind
DEFAULTS = to_dict(TrainConfig(data="-", cache="-", out="-"))


def write_card(
    folder: str | Path, meta: dict, *, kind: str | None = None, name: str | None = None, evaluation: str | None = None
) -> Path:
    """Write `folder`/README.md (atomically) and return its path.

    meta: the student's mclip.json (teacher, languages, train = the resolved TrainConfig, base_model, metrics = the last
      train and validation figures); an export adds its own keys over it (format, quantize, opset, verification).
    kind: "student", "onnx" or "open_clip" (default: from meta["format"]).
    name: the model's name in the title (default: the teacher's student).
    evaluation: markdown of stage 3's results (`mclip run` adds its table beside the teacher baseline).
    """
    kind = kind or FORMATS.get(str(meta.get("format")))
    assert kind in KINDS, f"no model card kind for format {meta.get('format')!r}; pass kind= one of {list(KINDS)}"
    path = Path(folder) / CARD
    atomic_write_bytes(path, str(card(meta, kind, name, evaluation)).encode("utf-8"))
    return path


def update_card(folder: str | Path, *, name: str | None = None, evaluation: str | None = None) -> str:
    """Write a student folder's card again from its own mclip.json, now with `name` and stage 3's `evaluation`, and its
    line in checksums.sha256 with it (only that line: damage to any other file is still found).

    Returns "written"; "unchanged" when the card already says this (its checksum line is set all the same, which mends a
    kill between the two writes); or "edited" when README.md is no longer what mclip wrote (its checksum differs): the
    user's edit is kept and nothing is written."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    text = str(card(meta, FORMATS[str(meta.get("format"))], name, evaluation)).encode("utf-8")
    path = folder / CARD
    if path.is_file() and path.read_bytes() == text:
        status = "unchanged"
    elif path.is_file() and file_sha256(path) != listed(folder).get(CARD):
        return "edited"
    else:
        atomic_write_bytes(path, text)
        status = "written"
    update_checksum(folder, CARD)
    return status


def card(meta: dict, kind: str, name: str | None = None, evaluation: str | None = None):
    """The model card (huggingface_hub.ModelCard) of a folder of `kind` described by `meta` (see write_card)."""
    from huggingface_hub import ModelCard, ModelCardData

    what = KINDS[kind]
    train = meta.get("train") or {}
    base = hub_id(meta.get("base_model") or train.get("student"))
    data = hub_id(train.get("data"))
    data_card = ModelCardData(
        library_name=what.library,
        pipeline_tag=what.pipeline_tag,
        base_model=base,
        language=list(meta.get("languages") or []) or None,
        datasets=[data] if data else None,
        tags=[*TAGS, *what.tags],
    )
    teacher = (meta.get("teacher") or {}).get("name", "the teacher")
    title = f"{name or f'Multilingual student of {teacher}'}{what.title}"
    sections = [
        f"# {title}\n\n{_intro(meta, kind)}",
        _model(meta),
        _training(meta),
        _validation(meta.get("metrics") or {}),
        f"## Retrieval on held-out captions\n\n{evaluation.strip()}" if evaluation else "",
        _export(meta) if kind == "onnx" else "",
        "## Usage\n\n" + USAGE[kind](meta),
        _license(meta, base),
    ]
    return ModelCard(f"---\n{data_card.to_yaml()}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n")


def hub_id(value) -> str | None:
    """`value` when it reads as a Hugging Face Hub id (name or org/name), else None: a local folder or file, a glob or
    a `package:` source is not one (the Hub would refuse it as base_model)."""
    if not isinstance(value, str) or not HUB_ID.fullmatch(value):
        return None
    if value.lower().endswith(FILE_SUFFIXES) or Path(value).exists():
        return None
    return value


# ---- the sections ----


def _languages(meta: dict) -> str:
    return ", ".join(f"`{lang}`" for lang in meta.get("languages") or []) or "the trained languages"


def _intro(meta: dict, kind: str) -> str:
    teacher = meta.get("teacher") or {}
    images = (
        " Its vectors compare with the teacher's image embeddings (`CLIPModel.get_image_features`, L2-normalised), so a"
        " query in any of these languages searches the images the teacher indexed."
        if teacher.get("kind") == "clip"
        else ""
    )
    if kind == "open_clip":
        return (
            f"One multilingual CLIP for open_clip: the text tower is a student distilled with mclip into the space of "
            f"`{teacher.get('name')}`, whose own vision tower sits beside it, so `encode_text` in {_languages(meta)} "
            f"and `encode_image` meet in one space."
        )
    return (
        f"A text encoder distilled with mclip from the English teacher `{teacher.get('name')}`: a caption in "
        f"{_languages(meta)} maps to the vector the teacher gives its English original (L2-normalised, "
        f"{meta.get('dim', '?')} dimensions).{images}"
    )


def _model(meta: dict) -> str:
    teacher = meta.get("teacher") or {}
    train = meta.get("train") or {}
    rows = [
        ("student backbone", f"`{meta.get('base_model') or train.get('student', '?')}`"),
        (
            "pooling, projection",
            f"{meta.get('pooler', '?')} pooling, linear {meta.get('hidden_size', '?')} → "
            f"{meta.get('dim', '?')}, L2 normalisation",
        ),
        ("max tokens", str(meta.get("max_length", "?"))),
        (
            "teacher",
            f"`{teacher.get('name', '?')}` ({teacher.get('kind', '?')}, {teacher.get('pooling', '?')}, "
            f"{teacher.get('dim', '?')} dims)",
        ),
        (
            "teacher fingerprint",
            f"`{teacher.get('fingerprint', '?')}` (blake2b of its weights: which checkpoint it was)",
        ),
        ("languages", _languages(meta)),
        ("mclip version", str(meta.get("mclip_version", "?"))),
    ]
    return "## Model\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _training(meta: dict) -> str:
    if not meta.get("train"):
        return ""
    config = json.dumps(meta["train"], indent=2, ensure_ascii=False)
    train = {**DEFAULTS, **meta["train"]}  # a folder written before a setting existed had its default
    if train.get("loss") == "cl":
        temperature = "fixed" if train.get("fixed_temperature") else "learnt, starting at"
        loss = (
            f"cl: (1 − {train['alpha']:g}) × {train.get('cl_base')} + {train['alpha']:g} × InfoNCE (temperature "
            f"{temperature} {train.get('temperature'):g})"
        )
    else:
        loss = str(train.get("loss"))
    if train.get("layer_kd"):
        loss += f" + {train.get('layer_kd_weight', 1):g} × layer distillation"
    validation = (
        f"`{train['val_data']}`"
        if train.get("val_data")
        else f"{train['val_fraction']:g} of the ids held out"
        if train.get("val_fraction")
        else "none"
    )
    steps = (meta.get("metrics") or {}).get("step")
    rows = [
        ("captions", f"`{train.get('data')}` (split {train.get('split')}); English targets from the teacher's cache"),
        ("validation", validation),
        ("loss", loss),
        (
            "steps",
            f"{steps if steps is not None else '?'} (epochs {train.get('epochs')}, max steps {train.get('max_steps')})",
        ),
        ("batch", f"{train.get('batch_size')} pairs (grad accumulation {train.get('grad_accum')})"),
        (
            "optimiser",
            f"AdamW, lr {train.get('lr'):g}, {train.get('schedule')} decay after {train.get('warmup_steps')} "
            f"warmup steps, weight decay {train.get('weight_decay'):g}, clip {train.get('clip_grad'):g}",
        ),
        ("vocabulary", "extended with new tokens" if train.get("extend_vocab") else "the student's own"),
        (
            "WiSE-FT",
            f"{train.get('wise_ft'):g} × trained + {1 - train.get('wise_ft'):g} × step 0"
            if train.get("wise_ft", 1) < 1
            else "off",
        ),
        ("seed", str(train.get("seed"))),
    ]
    return (
        "## Training\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {k} | {v} |" for k, v in rows)
        + "\n\n<details><summary>The resolved configuration (mclip train-student)</summary>\n\n"
        + f"```json\n{config}\n```\n\n</details>"
    )


def _validation(metrics: dict) -> str:
    r1 = {k[len("val_r1_") :]: v for k, v in metrics.items() if k.startswith("val_r1_")}
    if "val_loss" not in metrics and not r1:
        return ""
    mixed = f" of the WiSE-FT mix ({metrics['wise_ft']:g})" if "wise_ft" in metrics else ""
    lines = [
        "## Validation",
        "",
        f"The last validation{mixed} at step {metrics.get('step', '?')}: "
        f"loss {metrics.get('val_loss', float('nan')):.4f} (the distillation loss); R@1 of student(caption) → "
        "teacher(English caption) over the validation ids.",
        "",
    ]
    if r1:
        lines += ["| language | R@1 |", "|---|---|", *(f"| {lang} | {value:.4f} |" for lang, value in r1.items())]
    return "\n".join(lines)


def _export(meta: dict) -> str:
    check = meta.get("verification") or {}
    figures = (
        f"; checked on {check['texts']} texts in many scripts against the torch student: cosine min "
        f"{check['min_cosine']:.6f}, mean {check['mean_cosine']:.6f}"
        if check
        else ""
    )
    return (
        f"## Export\n\nONNX opset {meta.get('opset')}, {meta.get('quantize') or 'fp32'} weights; the graph "
        f"`{meta.get('onnx', 'onnx/model.onnx')}` outputs `sentence_embedding` (B, {meta.get('dim')}: pooled, "
        f"projected and normalised) and `last_hidden_state`{figures}."
    )


def _license(meta: dict, base: str | None) -> str:
    teacher = (meta.get("teacher") or {}).get("name", "the teacher")
    sources = ", ".join(f"`{s}`" for s in (base or (meta.get("train") or {}).get("student"), teacher) if s)
    return (
        "## License\n\nNot set. These weights derive from the model the student started from, the teacher it learnt "
        f"from ({sources}) and the training captions: add a `license:` line that their terms allow to the metadata "
        "above before publishing (see docs/publish.md of mclip)."
    )


# ---- usage, per kind ----

TEXTS = '["一只狗在草地上奔跑", "Ein Hund rennt über die Wiese", "a dog running on the grass"]'


def _usage_student(meta: dict) -> str:
    pooled = (
        "pooled = hidden[:, 0]  # cls pooling"
        if meta.get("pooler") == "cls"
        else 'mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)\n'
        "pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling"
    )
    return f"""mclip (a local folder, e.g. after `hf download ORG/NAME --local-dir NAME`):

```python
import mclip

emb = mclip.load("NAME").encode({TEXTS})  # (3, {meta.get("dim")}) unit vectors in the teacher's space
```

sentence-transformers (the folder's modules.json: pooling, the projection `2_Dense`, normalisation):

```python
from sentence_transformers import SentenceTransformer

emb = SentenceTransformer("ORG/NAME").encode({TEXTS})
```

transformers (the pooling and projection mclip applies, written out):

```python
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

path = Path(snapshot_download("ORG/NAME"))  # or the local folder
model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
dense = load_file(str(path / "2_Dense" / "model.safetensors"))  # the projection into the teacher's space
enc = tokenizer({TEXTS}, padding=True, truncation=True, max_length={meta.get("max_length")}, return_tensors="pt")
with torch.no_grad():
    hidden = model(**enc).last_hidden_state  # (B, T, H)
{pooled}
emb = torch.nn.functional.normalize(pooled @ dense["linear.weight"].T + dense["linear.bias"], dim=-1)
```"""


def _usage_onnx(meta: dict) -> str:
    return f"""mclip runs the folder with onnxruntime and transformers' tokenizer, without torch:

```python
import mclip

emb = mclip.load("NAME").encode({TEXTS})  # (3, {meta.get("dim")}) unit vectors in the teacher's space
```

onnxruntime directly (the graph pools, projects and normalises):

```python
import onnxruntime as ort
from transformers import AutoTokenizer

session = ort.InferenceSession("NAME/{meta.get("onnx", "onnx/model.onnx")}")
tokenizer = AutoTokenizer.from_pretrained("NAME")
enc = tokenizer({TEXTS}, padding=True, truncation=True, max_length={meta.get("max_length")}, return_tensors="np")
(emb,) = session.run(["sentence_embedding"], {{k: enc[k] for k in ("input_ids", "attention_mask")}})
```

sentence-transformers reads the same folder with its ONNX backend (`pip install 'sentence-transformers[onnx]'`):
`SentenceTransformer("ORG/NAME", backend="onnx")`."""


def _usage_open_clip(meta: dict) -> str:
    return f"""open_clip (`hf-hub:ORG/NAME`, or `local-dir:NAME` for the folder):

```python
import open_clip
import torch
from PIL import Image

model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:ORG/NAME")
tokenizer = open_clip.get_tokenizer("hf-hub:ORG/NAME")
with torch.no_grad():
    text = model.encode_text(tokenizer({TEXTS}), normalize=True)
    image = model.encode_image(preprocess(Image.open("dog.jpg")).unsqueeze(0), normalize=True)
print((100 * image @ text.T).softmax(dim=-1))  # zero-shot: which caption fits the image
```"""


USAGE = {"student": _usage_student, "onnx": _usage_onnx, "open_clip": _usage_open_clip}
