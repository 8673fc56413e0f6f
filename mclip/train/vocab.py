"""--extend-vocab: new tokens for the student (unknown characters, frequent training words, word stems), their rows
started from the English captions' tokens, and the per-row learning rate that lets the new rows move fast while the
student's own rows keep what they knew."""

from __future__ import annotations

import copy
from collections import Counter

import torch
from tokenizers import AddedToken

from mclip.models.student import StudentEncoder

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

    `min_piece_rate`: only words split into at least this many pieces per character (`word_candidates`).
    `stems` > 0: also the stems shared by that many of the words split into `stem_piece_rate`+ pieces per character (those
    spelt letter by letter: not Latin script, by default; `stem_candidates`); then those stems and words of 3+
    characters match inside words too, so an unseen inflection of a training word starts from its stem's row.
    """
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
        words = word_candidates(tok, normal, set(added), min_word_count, min_piece_rate)
        if stems > 0:
            spelt = word_candidates(tok, normal, set(added), min_word_count, max(min_piece_rate, stem_piece_rate))
            known = tok.get_vocab()
            inside = {t for t in stem_candidates(spelt, stems) if t not in known}
            inside |= {w for w in spelt if len(w) >= STEM_MIN_CHARS}
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
