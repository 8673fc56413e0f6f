"""The exported student: one folder, three ways to load it (mclip.load, plain transformers, sentence-transformers), same vectors."""

import json

import numpy as np
import pytest
import torch

from mclip.errors import UserError
from mclip.models.student import build_student, load, pool
from mclip.train.vocab import extend_vocabulary
from tests import tiny

TEXTS = tiny.CORPUS + ["a much longer caption " * 20, "x"]


def _plain_transformers(path, texts):
    """The README's recipe: AutoModel + AutoTokenizer, the pooling named in mclip.json, the 2_Dense projection, L2 norm."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    meta = json.loads((path / "mclip.json").read_text())
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    dense = load_file(str(path / "2_Dense" / "model.safetensors"))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=meta["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    if meta["pooler"] == "cls":
        pooled = hidden[:, 0]
    else:
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    emb = pooled @ dense["linear.weight"].T + dense["linear.bias"]
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


@pytest.mark.parametrize("pooler", ["mean", "cls"])
def test_three_loading_ways_agree(bert_student, tmp_path, pooler):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    path = build_student(str(bert_student), dim=12, pooler=pooler, meta={"languages": ["zh"]}).save(tmp_path / "final")
    ours = load(path).encode(TEXTS, batch_size=3, device="cpu", normalize=True)
    plain = _plain_transformers(path, TEXTS)
    st = SentenceTransformer(str(path), device="cpu").encode(TEXTS, batch_size=5, convert_to_numpy=True)
    assert ours.shape == plain.shape == st.shape == (len(TEXTS), 12)
    assert np.min((ours * plain).sum(1)) >= 0.9999
    assert np.min((ours * st).sum(1)) >= 0.9999
    meta = json.loads((path / "mclip.json").read_text())
    assert meta["pooler"] == pooler and meta["dim"] == 12 and meta["languages"] == ["zh"]
    assert (path / "model.safetensors").exists() and (path / "2_Dense" / "model.safetensors").exists()


def test_encode_batches_truncates_and_keeps_order(bert_student, tmp_path):
    torch.manual_seed(0)
    student = build_student(str(bert_student), dim=8, max_length=16)
    one_by_one = np.stack([student.encode(t) for t in TEXTS])  # a str gives one (D,) vector
    batched = student.encode(TEXTS, batch_size=4, normalize=True)
    assert np.allclose(one_by_one, batched, atol=1e-5)  # length-sorted batches come back in input order
    assert np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    raw = student.encode(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    assert student.tokenize([TEXTS[-2]])["input_ids"].shape[1] == 16  # truncated to max_length, no error
    assert student.encode([], batch_size=4).shape == (0, 8)


def test_max_length_is_capped_by_the_model(bert_student):
    student = build_student(str(bert_student), dim=8, max_length=10_000)
    assert student.max_length == 64  # the tiny BERT's max_position_embeddings


def test_saving_a_loaded_student_keeps_its_meta_current(bert_student, tmp_path):
    first = build_student(str(bert_student), dim=8, meta={"teacher": {"name": "t"}, "mclip_version": "0.0.0"}).save(
        tmp_path / "a"
    )
    second = load(first).save(tmp_path / "b")
    meta = json.loads((second / "mclip.json").read_text())
    assert meta["teacher"] == {"name": "t"} and meta["mclip_version"] != "0.0.0"


def test_pool_mean_ignores_padding_and_cls_takes_the_first_token():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(pool(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_load_refuses_a_folder_that_is_not_an_export(bert_student):
    with pytest.raises(UserError, match="not an exported mclip student"):
        load(bert_student)


def test_build_refuses_a_missing_model(tmp_path):
    with pytest.raises(UserError, match="cannot load student"):
        build_student(str(tmp_path / "nope"), dim=8)


def test_identity_projection_reproduces_the_teacher_when_the_student_is_the_teacher(bert_teacher):
    """A student built from the teacher's own weights starts equal to the (mean-pooled) teacher: projection = identity."""
    from mclip.models.teacher import load_teacher

    teacher = load_teacher(str(bert_teacher))
    student = build_student(str(bert_teacher), teacher.dim, pooler="mean")
    texts = ["a dog", "woman standing", "red apple on a table"]
    assert np.abs(student.encode(texts) - teacher.encode(texts)).max() < 1e-5
    assert not torch.equal(
        build_student(str(bert_teacher), teacher.dim, projection_init="random").projection.weight,
        torch.eye(teacher.dim),
    )
    with pytest.raises(UserError, match="identity needs"):
        build_student(str(bert_teacher), teacher.dim + 1, projection_init="identity")


def test_extend_vocabulary_adds_only_unknown_characters_and_survives_save(tmp_path):
    folder = tiny.write_tiny_bert(tmp_path / "s", corpus=["a dog", "ein hund"])  # no CJK in the vocabulary
    student = build_student(str(folder), 16)
    unk = student.tokenizer.unk_token_id
    assert unk in student.tokenizer("站立的女人")["input_ids"]
    added = extend_vocabulary(student, ["站立的女人", "a dog", "一只狗"])
    assert added == sorted(set("站立的女人一只狗")) and extend_vocabulary(student, ["站立的女人"]) == []
    assert unk not in student.tokenizer("站立的女人 a dog")["input_ids"]
    assert student.backbone.get_input_embeddings().weight.shape[0] == len(student.tokenizer)
    before = student.encode(["站立的女人", "一只狗"])
    student.save(tmp_path / "out")
    assert np.abs(load(tmp_path / "out").encode(["站立的女人", "一只狗"]) - before).max() < 1e-5


def test_extend_vocabulary_with_words_adds_frequent_long_words_as_whole_tokens(tmp_path):
    folder = tiny.write_tiny_bert(tmp_path / "s", corpus=["флаг катар", "флаг франция", "флаг чили", "a dog"])
    student = build_student(str(folder), 16)
    texts = ["флаг Катар", "флаг Франция", "флаг Чили", "a dog", "a dog go", "go go"]
    assert student.tokenizer.tokenize("go") == ["g", "##o"]
    added = extend_vocabulary(student, texts, min_word_count=3)
    assert added == [
        "go",
        "флаг",
    ]  # seen 3 times and spelt in 2+ pieces; "dog" is 3 pieces but seen twice; "a" is one piece
    tokens = student.tokenizer.tokenize("Флаг Катар флагшток")
    assert tokens[0] == "флаг" and "флаг" not in tokens[1:]  # a whole word only, not inside another word


def test_extend_vocabulary_aligned_starts_new_rows_at_their_english_captions_tokens(tmp_path):
    folder = tiny.write_tiny_bert(tmp_path / "s", corpus=["a dog", "a red dog", "woman standing"])
    student = build_student(str(folder), 16)
    table = student.backbone.get_input_embeddings().weight
    old = table.shape[0]

    def centroid(english):  # the mean of the English caption's own (old) token rows, special tokens excluded
        ids = student.tokenizer(english, add_special_tokens=False)["input_ids"]
        return table.detach()[ids].mean(0)

    expected_dog, expected_woman = centroid("a dog"), centroid("woman standing")
    texts, english = ["一只狗", "红色的狗", "站立的女人"], ["a dog", "a red dog", "woman standing"]
    added = extend_vocabulary(student, texts, english=english)
    rows = student.backbone.get_input_embeddings().weight.detach()
    row = {t: rows[student.tokenizer.convert_tokens_to_ids(t)] for t in added}
    assert rows.shape[0] == old + len(added) and "狗" in added
    assert torch.allclose(row["女"], expected_woman, atol=1e-6)  # one caption contains 女: its English tokens' mean
    assert torch.allclose(row["狗"], (expected_dog + centroid("a red dog")) / 2, atol=1e-6)  # two captions: their mean
    assert not torch.allclose(row["狗"], row["女"])
    with pytest.raises(AssertionError, match="English captions"):
        extend_vocabulary(build_student(str(folder), 16), texts, english=english[:2])


def test_extend_vocabulary_min_piece_rate_adds_only_words_spelt_letter_by_letter(tmp_path):
    # "teclas" is te ##cl ##as (0.5 pieces a character): the vocabulary already reads it, so rate 0.75 leaves it alone
    folder = tiny.write_tiny_bert(
        tmp_path / "s", corpus=["teclas rojas", "флаг катар"], pieces=("te", "##cl", "##as", "ro", "##jas")
    )
    texts = ["teclas rojas", "флаг катар"]
    assert extend_vocabulary(build_student(str(folder), 16), texts, min_word_count=1) == [
        "rojas",
        "teclas",
        "катар",
        "флаг",
    ]
    student = build_student(str(folder), 16)
    assert extend_vocabulary(student, texts, min_word_count=1, min_piece_rate=0.75) == ["катар", "флаг"]
    assert student.tokenizer.tokenize("teclas флаг") == ["te", "##cl", "##as", "флаг"]


def test_extend_vocabulary_stems_give_an_unseen_inflection_its_training_words_row(tmp_path):
    folder = tiny.write_tiny_bert(
        tmp_path / "s",
        corpus=["клавиши клавишу клавишами", "teclas teclado", "a dog"],
        pieces=("te", "##cl", "##as", "##ado"),
    )
    texts, keep = ["клавиши 4", "клавишу", "teclas", "teclado"], ["a dog", "a keyboard"]
    plain = build_student(str(folder), 16)
    assert extend_vocabulary(plain, texts, min_word_count=1, keep=keep) == ["teclado", "teclas", "клавиши", "клавишу"]
    assert not set(plain.tokenizer.tokenize("клавишами")) & {
        "клавиши",
        "клавишу",
    }  # whole words only: spelt letter by letter
    student = build_student(str(folder), 16)
    english = student.tokenizer(keep)["input_ids"]
    added = extend_vocabulary(student, texts, min_word_count=1, keep=keep, stems=2)
    # the stem the two Cyrillic words share ("клав" adds nothing: it branches nowhere); the Latin pair, read in a few
    # pieces (under 0.5 a character < stem_piece_rate 0.75), gives no stem "tecla"
    assert added == ["teclado", "teclas", "клавиш", "клавиши", "клавишу"]
    assert student.tokenizer.tokenize("клавишами")[0] == "клавиш"  # unseen, yet it starts on the stem's row
    assert student.tokenizer.tokenize("клавиши клавишу") == ["клавиши", "клавишу"]  # training words keep their own rows
    assert student.tokenizer.tokenize("teclasx") == [
        "te",
        "##cl",
        "##as",
        "##x",
    ]  # a Latin word still matches whole words only
    assert student.tokenizer(keep)["input_ids"] == english
