"""What every `mclip export` format shares: the texts an export is checked on before it appears and the cosine it is
checked with, the tokenizer files its folder must carry (and --overwrite may replace), and what to do after a failed
write. No torch: `mclip encode` and `mclip.load` run an ONNX export without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mclip.errors import UserError

RERUN = "rerun the same command"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What an export's check encodes with both the student and the export: several scripts, emoji, a text past any
# token limit.
PROBES = (
    "a photo of a dog running on the beach",
    "Zwei Kinder spielen Fußball im Park",
    "une tasse de café sur la table",
    "niño con un globo rojo",
    "İstanbul'da güneşli bir gün",
    "一只狗在草地上奔跑",
    "東京の夜景と桜の花",
    "바닷가에서 뛰는 개",
    "Собака бежит по пляжу",
    "قطة تجلس على الأريكة",
    "گربه روی مبل نشسته است",
    "🐶🏖️ dog at the beach 🎉",
    "👩‍👩‍👧‍👦",
    "x",
    "Ünïcödé ẞ ﬁ ｆｕｌｌｗｉｄｔｈ",
    " ".join(["woman standing next to a red car"] * 80),
)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def check_tokenizer(folder: Path) -> None:
    """Refuse a student folder without its tokenizer files: an export must carry the tokenizer it was trained with."""
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"{folder} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}); the export must carry the tokenizer "
            "the student was trained with: copy them from the run's final/ folder (or save the student again)"
        )


def is_tokenizer_file(name: str) -> bool:
    """Whether a name in an export folder is one of the files `tokenizer.save_pretrained` writes."""
    return name in ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja") or name.startswith(
        ("tokenizer", "vocab", "merges", "sentencepiece", "spiece")
    )
