"""The seed's two student families through every train-student path: a tiny XLM-R (SentencePiece Unigram vocabulary with
the ▁ marker, RoBERTa positions: 514 hold 512 tokens) and a tiny chinese-roberta-wwm-ext (a BERT with one WordPiece
token per Chinese character, 512 positions); both poolers, extend-vocab, frozen embeddings, layer-kd, an interrupted
run resumed, the export loaded three ways, the position limit."""

import json

import numpy as np
import pytest
import torch

from mclip.config import EmbedConfig, TrainConfig
from mclip.embed.run import run as embed_teacher
from mclip.models.student import build_student, load
from mclip.train import run as train_student
from mclip.train.checkpoint import checkpoints
from mclip.train.run import run
from tests import tiny
from tests.models.test_student import _plain_transformers
from tests.train.test_run import _max_diff, _records, _toy_rows, _weights

FAMILIES = {"xlmr": tiny.write_tiny_xlmr, "chinese_bert": tiny.write_tiny_chinese_bert}
LANGS = ("caption", "caption_de", "caption_zh")
LONG = "一只狗在草地上奔跑 ein Hund läuft " * 150  # far more than 512 tokens in either vocabulary


@pytest.fixture(scope="module")
def toy(tmp_path_factory, bert_teacher):
    """48 parallel emoji names (en, de, zh) and a teacher cache from the tiny BERT teacher with both layers cached."""
    root = tmp_path_factory.mktemp("families")
    rows = _toy_rows()
    data = tiny.write_captions(root / "parallel.jsonl", rows)
    cache = root / "cache"
    embed_teacher(
        EmbedConfig(
            data=str(data),
            out=str(cache),
            teacher=str(bert_teacher),
            id_column="id",
            cache_layers=(1, 2),
            progress=False,
        )
    )
    return {"root": root, "rows": rows, "data": data, "cache": cache, "texts": [r[k] for r in rows for k in LANGS]}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, toy):
    """A tiny student of one family whose vocabulary was learnt from the English and German captions and only every other
    Chinese one, so some training characters are unknown to it (what extend-vocab is for); dropout on, as in the real ones."""
    corpus = [r[k] for r in toy["rows"] for k in LANGS[:2]] + [r["caption_zh"] for r in toy["rows"][::2]]
    folder = FAMILIES[request.param](toy["root"] / request.param, hidden=32, layers=2, corpus=corpus, seed=3)
    return {"name": request.param, "student": folder}


def _config(toy, family, out, **changes) -> TrainConfig:
    base = dict(
        data=str(toy["data"]),
        cache=str(toy["cache"]),
        out=str(out),
        student=str(family["student"]),
        languages=("zh", "de"),
        batch_size=16,
        epochs=1,
        max_steps=4,
        warmup_steps=1,
        lr=2e-3,
        num_workers=0,
        eval_every=0,
        save_every=0,
        log_every=1,
        progress=False,
        num_threads=1,
    )
    return TrainConfig(**{**base, **changes})


def _unknown(tokenizer, texts) -> list[str]:
    return [t for t in texts if tokenizer.unk_token_id in tokenizer(t)["input_ids"]]


def test_the_tiny_students_are_built_like_the_real_ones(toy, family):
    from transformers import AutoConfig, AutoTokenizer

    config, tok = AutoConfig.from_pretrained(family["student"]), AutoTokenizer.from_pretrained(family["student"])
    if family["name"] == "xlmr":
        assert config.model_type == "xlm-roberta" and config.max_position_embeddings == 514 and config.pad_token_id == 1
        assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
        assert tok.mask_token_id == len(tok) - 1
        pieces = tok.convert_ids_to_tokens(tok("ein Hund")["input_ids"])
        assert (
            pieces[0] == "<s>"
            and pieces[-1] == "</s>"
            and pieces[1].startswith("▁")
            and any(p.startswith("▁") for p in pieces[2:-1])
        )
        assert "▁" in tok.convert_ids_to_tokens(tok("牌")["input_ids"])  # a word start with no ▁-piece: the bare marker
    else:
        assert config.model_type == "bert" and config.max_position_embeddings == 512
        assert tok.convert_ids_to_tokens(tok("金牌 medal")["input_ids"]) == [
            "[CLS]",
            "金",
            "牌",
            "m",
            "##e",
            "##d",
            "##a",
            "##l",
            "[SEP]",
        ]
    assert _unknown(tok, [r["caption_zh"] for r in toy["rows"][1::2]])  # characters only the held-out half has


@pytest.mark.parametrize("pooler", ["cls", "mean"])
def test_both_poolers_train_and_the_export_loads_three_ways_alike(toy, family, tmp_path, pooler):
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    result = run(
        _config(toy, family, tmp_path / "run", pooler=pooler, loss="cl", alpha=0.5, max_steps=6, max_length=1024)
    )
    train = _records(result.out, "train")
    assert result.steps == len(train) == 6 and all(np.isfinite(r["loss"]) for r in train)
    start, final = (
        load_file(str(family["student"] / "model.safetensors")),
        load_file(str(result.final / "model.safetensors")),
    )
    assert final.keys() == start.keys() and _max_diff(final, start) > 1e-4  # it trained
    meta = json.loads((result.final / "mclip.json").read_text())
    assert (
        meta["pooler"] == pooler and meta["max_length"] == 512
    )  # 1024 asked; 514 RoBERTa positions hold 512 tokens, BERT's 512
    texts = [LONG, *toy["texts"][:23], "x"]
    ours = load(result.final).encode(texts, batch_size=5, normalize=True)
    plain = _plain_transformers(result.final, texts)
    model = SentenceTransformer(str(result.final), device="cpu")
    assert model.max_seq_length == 512
    st = model.encode(texts, batch_size=7, convert_to_numpy=True)
    assert ours.shape == plain.shape == st.shape == (len(texts), 24)
    assert np.min((ours * plain).sum(1)) >= 0.9999
    assert np.min((ours * st).sum(1)) >= 0.9999


def _unknown_characters(tokenizer, texts) -> set[str]:
    return {
        c
        for c in set("".join(texts)) - set(" ")
        if tokenizer.unk_token_id in tokenizer(c, add_special_tokens=False)["input_ids"]
    }


def _extend(toy, family, out, **changes):
    """A run with extend-vocab, and what to check it against: the tokenizer before, the exported student, the added tokens
    (token -> id), the non-English training captions and the English ones (the cache's text)."""
    before = build_student(str(family["student"]), dim=24).tokenizer
    result = run(_config(toy, family, out, extend_vocab=True, **changes))
    student = load(result.final)
    added = {t: i for t, i in student.tokenizer.get_added_vocab().items() if i >= len(before)}  # the new rows
    assert len(added) == len(student.tokenizer) - len(before) > 0
    assert student.backbone.get_input_embeddings().weight.shape[0] == len(student.tokenizer)
    other = [r[k] for r in toy["rows"] for k in LANGS[1:]]
    english = [r["caption"] for r in toy["rows"]]
    return result, before, student.tokenizer, added, other, english


@pytest.mark.parametrize("init", ["mean", "aligned"])
def test_extend_vocab_adds_words_the_student_then_reads_as_one_token(toy, family, tmp_path, init):
    result, before, tok, added, other, english = _extend(
        toy, family, tmp_path / "run", extend_vocab_words=1, extend_vocab_init=init, max_steps=2
    )
    normalize = getattr(tok.backend_tokenizer.normalizer, "normalize_str", lambda s: s)
    words = [w for w in added if len(w) > 1]
    assert words, added
    inside = 0  # words checked after a space: where SentencePiece's pieces carry the ▁ word-start marker
    for word in words:  # each added word, inside the training captions it came from, is read as its own new token
        captions = [t for t in other if word in normalize(t).split()]
        assert captions, word
        for caption in captions:
            ids = tok(caption)["input_ids"]
            assert added[word] in ids, (word, caption, tok.convert_ids_to_tokens(ids))
            inside += normalize(caption).split().index(word) > 0
    assert inside > 0
    # every caption whose unknown characters English does not share (English keeps its reading) now reads without <unk>
    shared = _unknown_characters(before, english)
    fixable = [
        t
        for t in other
        if before.unk_token_id in before(t)["input_ids"] and not _unknown_characters(before, [t]) & shared
    ]
    assert fixable and not _unknown(tok, fixable), _unknown(tok, fixable)[:5]
    assert tok(english)["input_ids"] == before(english)["input_ids"]
    # the exported tokenizer reads the training text as the one it trained with
    assert tok(other)["input_ids"] == type(tok).from_pretrained(result.final)(other)["input_ids"]
    assert np.isfinite(_records(result.out, "train")[-1]["loss"])


@pytest.mark.parametrize("family", ["xlmr", "chinese_bert"], indirect=True)
def test_extend_vocab_reports_exactly_the_rows_it_added(toy, family, tmp_path):
    result, before, tok, added, other, english = _extend(
        toy, family, tmp_path / "run", extend_vocab_words=1, max_steps=1
    )
    assert json.loads((result.final / "mclip.json").read_text())["added_tokens"] == len(added)
    assert set(tok.get_added_vocab()) - set(added) == set(
        before.get_added_vocab()
    )  # no old token turned into an added one


@pytest.mark.parametrize("family", ["xlmr", "chinese_bert"], indirect=True)
def test_extend_vocab_characters_only_leaves_no_unknown_character_english_lacks(toy, family, tmp_path):
    result, before, tok, added, other, english = _extend(toy, family, tmp_path / "run", max_steps=1)
    assert all(len(t) == 1 for t in added), added  # characters only
    missing = _unknown_characters(before, other) - _unknown_characters(before, english)
    assert missing and not _unknown_characters(tok, missing), sorted(_unknown_characters(tok, missing))
    assert tok(english)["input_ids"] == before(english)["input_ids"]


def test_frozen_embeddings_stay_while_the_rest_trains(toy, family, tmp_path):
    from safetensors.numpy import load_file

    result = run(_config(toy, family, tmp_path / "run", freeze_embeddings=True, max_steps=3))
    start, final = (
        load_file(str(family["student"] / "model.safetensors")),
        load_file(str(result.final / "model.safetensors")),
    )
    emb = [k for k in start if k.endswith("word_embeddings.weight")]
    assert len(emb) == 1 and np.array_equal(final[emb[0]], start[emb[0]])
    # only the word matrix: the position rows beside it and the layers train
    for name in ("position_embeddings.weight", "encoder.layer.0.attention.self.query.weight"):
        key = next(k for k in start if k.endswith(name))
        assert not np.allclose(final[key], start[key]), key


def test_layer_kd_distils_both_cached_layers(toy, family, tmp_path):
    result = run(_config(toy, family, tmp_path / "run", layer_kd=True, loss="cl", alpha=0.5, max_steps=3, save_every=3))
    records = _records(result.out, "train")
    assert all(
        r["layer_kd"] > 0 and r["loss"] == pytest.approx(r["mse"] + r["infonce"] + r["layer_kd"], rel=1e-5)
        for r in records
    )
    assert json.loads((result.out / "config.json").read_text())["train"]["student_layers"] == [1, 2]
    state = torch.load(checkpoints(result.out)[-1][1] / "trainer.pt", weights_only=True)
    assert [state["extra"][f"layer_proj.{k}.weight"].shape for k in (0, 1)] == [
        (24, 32),
        (24, 32),
    ]  # student 32 -> teacher 24


class Interrupted(Exception):
    """Stands in for a kill: raised while fetching a batch, after some steps and a checkpoint."""


def test_an_interrupted_run_resumed_ends_with_the_uninterrupted_weights(toy, family, tmp_path, monkeypatch):
    # 9 steps an epoch: the kill falls in epoch 2, two steps after the checkpoint of step 8, so the resume crosses the epoch
    # boundary and drops the logged steps 9-10; the learnt temperature, layer-kd projections, added tokens and dropout RNG resume too
    changes = dict(
        epochs=2,
        max_steps=12,
        save_every=4,
        loss="cl",
        alpha=0.5,
        layer_kd=True,
        extend_vocab=True,
        extend_vocab_words=1,
    )
    reference = run(_config(toy, family, tmp_path / "reference", **changes))
    make, fetched = train_student.EpochSteps.__getitem__, []

    def killed_at_the_eleventh_batch(self, k):
        fetched.append(k)
        if len(fetched) == 11:
            raise Interrupted
        return make(self, k)

    monkeypatch.setattr(train_student.EpochSteps, "__getitem__", killed_at_the_eleventh_batch)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run(_config(toy, family, out, **changes))
    monkeypatch.undo()
    assert [s for s, _ in checkpoints(out)] == [4, 8] and not (out / "final").exists()
    assert [r["step"] for r in _records(out, "train")] == list(range(1, 11))
    resumed = run(_config(toy, family, out, resume=True, **changes))
    assert resumed.steps == reference.steps == 12
    assert [r["step"] for r in _records(out, "train")] == list(range(1, 13))
    assert [r["loss"] for r in _records(out, "train")] == pytest.approx(
        [r["loss"] for r in _records(reference.out, "train")], rel=1e-5
    )
    assert _max_diff(_weights(out / "final"), _weights(reference.final)) <= 1e-5


def test_the_position_limit_caps_max_length_and_long_texts_truncate(family):
    student = build_student(str(family["student"]), dim=24, max_length=1024)
    assert student.max_length == 512  # XLM-R: 514 positions - 2 (ids start after padding_idx 1); BERT: 512
    enc = student.tokenize([LONG, "x"])
    assert enc["input_ids"].shape == (2, 512)
    with torch.no_grad():  # the cap is the model's own limit: one token more runs off its position table
        student.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        longer = torch.cat([enc["input_ids"][:1], enc["input_ids"][:1, -1:]], dim=1)  # (1, 513)
        with pytest.raises((IndexError, RuntimeError)):
            student.backbone(input_ids=longer, attention_mask=torch.ones_like(longer))
    emb = student.encode([LONG, "x"], batch_size=2)
    assert emb.shape == (2, 24) and np.isfinite(emb).all()
    assert build_student(str(family["student"]), dim=24, max_length=64).tokenize([LONG])["input_ids"].shape == (1, 64)
