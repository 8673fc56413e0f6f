"""extend-vocab's choices beyond unknown characters: which training words (and word stems) become new tokens, and the
per-row learning rate that lets the new rows move fast while the student's own rows keep what they knew."""

from __future__ import annotations

from collections import Counter

import torch

STEM_MIN_CHARS = (
    3  # a stem (or a word matched inside words) has 3+ characters: 2-letter ones ("на", "of") are everywhere
)


def word_candidates(
    tok, normal: list[str], unknown: set[str], min_count: int, min_piece_rate: float = 0.0
) -> list[str]:
    """Whitespace words of the normalised texts seen `min_count`+ times (none holding an unknown character) that `tok`
    splits into 2+ pieces and into at least `min_piece_rate` pieces per character.

    Why the rate: an English vocabulary spells Cyrillic, Arabic, Hangul and kana letter by letter (1 piece a character),
    but reads a Latin-script word in a few known pieces (es "teclas" = te ##cl ##as, 0.5). A whole-word token for the
    latter replaces pieces the teacher already understood, and out of domain it captures words the teacher read well;
    0.75 keeps the former only (0 = every split word, as before)."""
    counts = Counter(w for text in normal for w in text.split() if not (set(w) & unknown))
    words = sorted(w for w, n in counts.items() if n >= min_count and len(w) > 1)
    pieces = tok(words, add_special_tokens=False)["input_ids"] if words else []
    vocab = tok.get_vocab()  # a SentencePiece word that is one piece after a bare ▁ ([▁, und]) is no new token
    return [
        w for w, seq in zip(words, pieces) if len(seq) >= 2 and len(seq) >= min_piece_rate * len(w) and w not in vocab
    ]


def stem_candidates(words: list[str], min_words: int) -> list[str]:
    """Prefixes of STEM_MIN_CHARS+ characters shared by at least `min_words` distinct `words`, each kept only where the
    words below it branch (a prefix whose words all continue with one longer prefix adds nothing the longer one lacks).

    Why: a whole-word token helps only a word seen in training; an unseen inflection or compound of it (ru "клавишами"
    beside "клавиши", ko "고양이가" beside "고양이") is spelled letter by letter again. Matched inside words, the stem
    gives it the row its training relatives taught."""
    if min_words <= 0:
        return []
    words = sorted(set(words))
    counts = Counter(w[:n] for w in words for n in range(STEM_MIN_CHARS, len(w) + 1))
    longest_child: dict[str, int] = {}  # the most words any one-character extension of a prefix holds
    for p, n in counts.items():
        if len(p) > STEM_MIN_CHARS:
            longest_child[p[:-1]] = max(longest_child.get(p[:-1], 0), n)
    return sorted(p for p, n in counts.items() if n >= min_words and longest_child.get(p, 0) < n)


class RowLR:
    """Wraps an optimizer step so that the rows `[:first_new]` of the input-embedding matrix (the student's own
    vocabulary) move by `factor` x the step the optimizer gave them; the rows after (extend-vocab's new tokens) move fully.

    Why: `embedding_lr_scale` speeds the whole matrix, since a new token's row moves only on the steps its token is in;
    but the old rows carry what the teacher knew, out of domain too. AdamW's update is proportional to its lr (moments
    do not depend on it), so scaling the step taken equals giving those rows lr x factor (0 = frozen)."""

    def __init__(self, weight: torch.nn.Parameter, first_new: int, factor: float):
        self.weight, self.first_new, self.factor = weight, int(first_new), float(factor)
        self.before: torch.Tensor | None = None
        self.active = factor != 1.0 and weight.requires_grad and self.first_new > 0

    @classmethod
    def of(cls, student, scale_old: float | None, scale: float) -> "RowLR":
        """The student's own rows (all but the `added_tokens` its meta counts) at scale_old / scale of the embedding
        group's step: lr x scale_old. None: the whole matrix at `scale`, as the optimizer already does."""
        first_new = len(student.tokenizer) - int(student.meta.get("added_tokens", 0))
        return cls(
            student.backbone.get_input_embeddings().weight, first_new, 1.0 if scale_old is None else scale_old / scale
        )

    def __enter__(self) -> "RowLR":
        if self.active:
            self.before = self.weight.detach()[: self.first_new].clone()  # (V_old, H)
        return self

    @torch.no_grad()
    def __exit__(self, *exc) -> None:
        if self.active and exc[0] is None:
            old = self.weight[: self.first_new]
            old.copy_(torch.lerp(self.before, old, self.factor))
        self.before = None
