"""Tiny random models and tokenizers built from configs, saved to a folder and loaded back through `from_pretrained`.

Nothing here downloads. The CLIP tokenizer is the real CLIP byte-level BPE format (vocab.json + merges.txt): with no
merges it tokenises byte by byte; `real_clip_merges()` returns the real 48,894 merges when `open-clip-torch` is
installed. The seed's two student families are here in miniature: `write_tiny_xlmr` (xlm-roberta-base: a SentencePiece
Unigram vocabulary with the ▁ word-start marker, RoBERTa position ids, 514 positions) and `write_tiny_chinese_bert`
(hfl/chinese-roberta-wwm-ext: a BERT whose WordPiece vocabulary holds one token per Chinese character, 512 positions).
"""

from __future__ import annotations

import gzip
import inspect
import json
from functools import lru_cache
from pathlib import Path

CORPUS = [
    "a photo of a dog",
    "a cat sitting on a red sofa",
    "woman standing",
    "man running on the beach",
    "two children playing football",
    "a bowl of noodles",
    "stehende Frau",
    "ein Hund im Park",
    "站立的女人",
    "一只狗",
    "red apple",
    "green tree",
    "blue car on the street",
    "the sun over the sea",
]


@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def real_clip_merges() -> list[tuple[str, str]] | None:
    """The real CLIP BPE merges from the open-clip-torch wheel, or None when it is not installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        return None
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]] | None = None):
    """Write a CLIPTokenizerFast in the exact vocabulary layout OpenAI/open_clip use, and return it loaded."""
    from transformers import CLIPTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = list(merges or [])
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    try:  # transformers >= 5 takes the vocabulary itself
        tok = CLIPTokenizerFast(
            vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m) for m in merges], model_max_length=77
        )
    except TypeError:
        tok = CLIPTokenizerFast(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=77
        )
    tok.save_pretrained(folder)
    return CLIPTokenizerFast.from_pretrained(folder)


def write_tiny_clip(
    folder: Path,
    with_vision: bool = True,
    projection_dim: int = 16,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    merges: list[tuple[str, str]] | None = None,
) -> Path:
    """A tiny random CLIPModel (or text-only CLIPTextModelWithProjection) + tokenizer (+ image processor) in
    `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

    tok = write_clip_tokenizer(folder, merges)
    text = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=len(tok),
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    if with_vision:
        vision = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=projection_dim,
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        model = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    model.eval().save_pretrained(folder)
    return Path(folder)


def write_bert_tokenizer(folder: Path, corpus: list[str] | None = None, pieces: tuple[str, ...] = ()):
    """A character-level WordPiece tokenizer (BERT format) covering the corpus, returned loaded; `pieces` adds longer
    WordPiece entries ("te", "##cl"), as an English vocabulary reads Latin-script words in a few known pieces."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(
        {c for text in (corpus or CORPUS) for c in text.lower() if not c.isspace()}
        | set("abcdefghijklmnopqrstuvwxyz0123456789")
    )
    return _wordpiece(
        folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + list(pieces), 64
    )


def _wordpiece(folder: Path, vocab: list[str], max_length: int):
    """Save a BertTokenizerFast over `vocab` (WordPiece, BERT's vocab.txt) in `folder` and return it loaded back."""
    from transformers import BertTokenizerFast

    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5 ignores vocab_file
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=max_length)
    else:
        tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return BertTokenizerFast.from_pretrained(folder)


def write_tiny_bert(
    folder: Path,
    hidden: int = 32,
    layers: int = 2,
    corpus: list[str] | None = None,
    seed: int = 0,
    pieces: tuple[str, ...] = (),
) -> Path:
    """A tiny random BertModel (an 'encoder' teacher or a student) + tokenizer in `folder` (`pieces`:
    write_bert_tokenizer)."""
    import torch
    from transformers import BertConfig, BertModel

    tok = write_bert_tokenizer(folder, corpus, pieces)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).eval().save_pretrained(folder)
    return Path(folder)


def write_xlmr_tokenizer(folder: Path, corpus: list[str] | None = None, vocab_size: int = 400):
    """A SentencePiece-style Unigram tokenizer trained on the corpus (Metaspace pre-tokenizer with the ▁ marker), in
    XLM-R's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, the pieces, <mask> last; returned loaded. Characters the corpus lacks
    are <unk>, as scripts outside a SentencePiece vocabulary are."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm = Tokenizer(models.Unigram())
    spm.normalizer = normalizers.NFKC()  # what XLM-R's precompiled charsmap amounts to on these texts
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    spm.train_from_iterator(
        corpus or CORPUS,
        trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
            unk_token="<unk>",
            max_piece_length=8,
        ),
    )
    vocab = [tuple(v) for v in json.loads(spm.to_str())["model"]["vocab"]] + [("<mask>", 0.0)]
    assert [t for t, _ in vocab[:4]] == ["<s>", "<pad>", "</s>", "<unk>"], vocab[:4]
    if (
        "vocab" in inspect.signature(XLMRobertaTokenizerFast.__init__).parameters
    ):  # transformers >= 5 builds it from the pieces
        tok = XLMRobertaTokenizerFast(vocab=vocab, model_max_length=512)
    else:
        from tokenizers import decoders, processors

        spm.model = models.Unigram(vocab, unk_id=3)
        spm.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        spm.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
        tok = XLMRobertaTokenizerFast(tokenizer_object=spm, model_max_length=512)
    tok.save_pretrained(folder)
    return XLMRobertaTokenizerFast.from_pretrained(folder)


def write_tiny_xlmr(
    folder: Path,
    hidden: int = 32,
    layers: int = 2,
    corpus: list[str] | None = None,
    seed: int = 0,
    max_position_embeddings: int = 514,
    dropout: float = 0.1,
) -> Path:
    """A tiny random XLMRobertaModel + Unigram tokenizer in `folder`, with xlm-roberta-base's position layout:
    padding_idx 1, position ids from 2, so 514 positions hold 512 tokens."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = write_xlmr_tokenizer(folder, corpus)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3), tok
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_position_embeddings,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    XLMRobertaModel(config).eval().save_pretrained(folder)
    return Path(folder)


def write_chinese_bert_tokenizer(
    folder: Path, corpus: list[str] | None = None, latin: tuple[str, ...] = ("the", "on", "of", "red")
):
    """A WordPiece vocabulary in bert-base-chinese's manner, returned loaded: one token per CJK character of the corpus,
    the special tokens, Latin letters and digits with their ## continuations, and a few whole Latin words."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cjk = sorted({c for text in (corpus or CORPUS) for c in text if "\u4e00" <= c <= "\u9fff"})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *cjk,
        *letters,
        *latin,
        *("##" + c for c in letters),
        "##s",
        "##ing",
    ]
    return _wordpiece(folder, list(dict.fromkeys(vocab)), 512)


def write_tiny_chinese_bert(
    folder: Path,
    hidden: int = 32,
    layers: int = 2,
    corpus: list[str] | None = None,
    seed: int = 0,
    max_position_embeddings: int = 512,
    dropout: float = 0.1,
) -> Path:
    """A tiny random BertModel with a Chinese-character WordPiece vocabulary and 512 positions, as
    chinese-roberta-wwm-ext (model_type bert despite its name)."""
    import torch
    from transformers import BertConfig, BertModel

    tok = write_chinese_bert_tokenizer(folder, corpus)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).eval().save_pretrained(folder)
    return Path(folder)


def write_tiny_gpt2(folder: Path) -> Path:
    """A tiny decoder-only model: neither CLIP nor an encoder, for the refusal test."""
    from transformers import GPT2Config, GPT2LMHeadModel

    write_bert_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=4, n_positions=64)).save_pretrained(folder)
    return Path(folder)


def write_captions(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines (a format `datasets` loads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def parallel_rows(n: int = 32) -> list[dict]:
    """Wide-format parallel captions (id, caption, caption_de, caption_zh) from the corpus; ids p000, p001, ..."""
    k = len(CORPUS)
    return [
        {
            "id": f"p{i:03d}",
            "caption": f"{CORPUS[i % k]} {i}",
            "caption_de": f"{CORPUS[(i + 6) % k]} {i}",
            "caption_zh": f"{CORPUS[(i + 8) % k]} {i}",
        }
        for i in range(n)
    ]


def run_script_without_torch(script: Path, *args: str):
    """Run a data build script as its README says (`python SCRIPT ARGS`) in a fresh interpreter, failing if it imports
    torch; returns the finished process (stdout, stderr, returncode)."""
    import subprocess
    import sys

    code = (
        "import runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); assert 'torch' not in sys.modules, 'imported torch'"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(script), *map(str, args)], capture_output=True, text=True, timeout=120
    )
