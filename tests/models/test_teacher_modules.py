"""mclip.models.teacher_modules: a sentence-transformers folder's modules.json (Transformer, Pooling, Dense, Normalize)
applied as sentence-transformers applies it, its poolers against a per-row oracle, and what it refuses."""

import numpy as np
import pytest
import torch

from mclip.errors import UserError
from mclip.models.teacher import load_teacher
from mclip.models.teacher_modules import POOLERS
from tests import tiny
from tests.models.test_teacher import TEXTS


def _st_folder(folder, base, pooling: str, dense: bool = True, activation=None):
    """A sentence-transformers model saved by sentence-transformers itself: Transformer + Pooling(pooling) [+ Dense] +
    Normalize."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(3)
    transformer = models.Transformer(str(base), max_seq_length=24)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        modules.append(
            models.Dense(
                modules[-1].get_sentence_embedding_dimension(),
                12,
                **({"activation_function": activation} if activation else {}),
            )
        )
    SentenceTransformer(modules=[*modules, models.Normalize()], device="cpu").save(str(folder))
    return folder


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "lasttoken"])
def test_a_sentence_transformers_teacher_cache_equals_its_own_encode(pooling, bert_teacher, captions, tmp_path):
    """BGE-style CLS pooling + Dense + Normalize (and the other modes): the cache equals
    SentenceTransformer(path).encode, and the manifest records what was applied."""
    from sentence_transformers import SentenceTransformer

    from mclip.config import EmbedConfig
    from mclip.embed.run import run
    from mclip.store import shards

    folder = _st_folder(tmp_path / "st", bert_teacher, pooling)
    result = run(
        EmbedConfig(
            data=str(captions),
            out=str(tmp_path / "cache"),
            teacher=str(folder),
            id_column="id",
            dtype="float32",
            progress=False,
        )
    )
    cache = shards.open_cache(result.out)
    texts = cache.table(["text"])["text"].to_pylist()
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(cache.embeddings(), ref, atol=2e-6)
    manifest = cache.manifest
    assert (manifest["pooling"], manifest["dim"], manifest["max_length"]) == (
        f"{pooling} + dense(24->12, tanh) + normalize",
        12,
        24,
    )
    assert manifest["teacher"]["pooling"] == manifest["pooling"]


def test_a_legacy_pooling_config_and_an_identity_dense_are_read(bert_teacher, tmp_path):
    """Older sentence-transformers wrote one boolean per pooling mode; an Identity Dense (mclip's own 2_Dense) is
    linear."""
    import json

    from sentence_transformers import SentenceTransformer

    folder = _st_folder(tmp_path / "st", bert_teacher, "max", activation=torch.nn.Identity())
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 24,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": False,
                "pooling_mode_max_tokens": True,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    teacher = load_teacher(str(folder))
    assert teacher.pooling == "max + dense(24->12) + normalize"
    ref = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(teacher.encode(TEXTS), ref, atol=2e-6)


def test_an_mclip_student_is_a_teacher_in_its_own_space(bert_student, tmp_path):
    """Chained distillation: a final/ folder as --teacher gives exactly what mclip.load(final).encode gives (CLS pooling
    and the 2_Dense projection applied; mean pooling over the backbone would be another space)."""
    import mclip
    from mclip.models.student import build_student

    final = build_student(str(bert_student), dim=16, pooler="cls").save(tmp_path / "final")
    teacher = load_teacher(str(final))
    assert (teacher.kind, teacher.pooling, teacher.dim) == ("encoder", "cls + dense(32->16) + normalize", 16)
    np.testing.assert_allclose(teacher.encode(TEXTS), mclip.load(final).encode(TEXTS), atol=2e-6)


@pytest.mark.parametrize(
    "change, says",
    [
        (
            lambda m: m.insert(2, {"idx": 9, "name": "9", "path": "9_X", "type": "my_package.CustomLayer"}),
            "lists 'my_package.CustomLayer'",
        ),
        (
            lambda m: m.insert(
                2, {"idx": 9, "name": "9", "path": "9_X", "type": "sentence_transformers.models.LayerNorm"}
            ),
            "LayerNorm",
        ),
        (lambda m: m.reverse(), "applies Transformer -> Pooling"),
    ],
)
def test_an_unknown_module_is_refused_in_one_line(change, says, bert_teacher, captions, tmp_path, cli_error):
    import json

    folder = _st_folder(tmp_path / "st", bert_teacher, "cls", dense=False)
    modules = json.loads((folder / "modules.json").read_text())
    change(modules)
    (folder / "modules.json").write_text(json.dumps(modules))
    err = cli_error(
        [
            "embed-teacher",
            "--data",
            str(captions),
            "--id-column",
            "id",
            "--teacher",
            str(folder),
            "--out",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )
    assert says in err and "modules.json" in err, err
    assert not (tmp_path / "c").exists()


def test_an_unsupported_pooling_mode_is_refused(bert_teacher, tmp_path):
    import json

    folder = _st_folder(tmp_path / "st", bert_teacher, "cls", dense=False)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 24, "pooling_mode": "weightedmean"})
    )
    with pytest.raises(UserError, match="pooling mode 'weightedmean'"):
        load_teacher(str(folder))
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 24, "pooling_mode": ["cls", "mean"]})
    )
    with pytest.raises(UserError, match="combines pooling modes"):
        load_teacher(str(folder))


def test_a_lowercasing_sentence_transformers_teacher_lowercases(tmp_path):
    """An older sentence-transformers folder's sentence_bert_config.json (max_seq_length, do_lower_case): it lowercases
    the text before its (here case-sensitive SentencePiece) tokenizer; so does the teacher. (Version 6 folds both into
    the saved tokenizer instead, which the teacher loads as it is.)"""
    import json

    from sentence_transformers import SentenceTransformer, models

    base = tiny.write_tiny_xlmr(tmp_path / "xlmr", dropout=0.0)
    transformer = models.Transformer(str(base))
    folder = tmp_path / "st"
    SentenceTransformer(modules=[transformer, models.Pooling(32, pooling_mode="mean")], device="cpu").save(str(folder))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": True}))
    assert load_teacher(str(folder)).max_length == 6
    texts = ["A PHOTO OF A DOG", "Woman Standing", "a photo of a dog"]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    got = load_teacher(str(folder)).encode(texts, normalize=False)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    np.testing.assert_allclose(got[0], got[2], atol=1e-6)


def test_poolers_equal_a_per_row_oracle_over_the_real_tokens():
    rng = np.random.default_rng(0)
    lengths = np.array([1, 5, 3, 7, 2])
    hidden = rng.standard_normal((5, 7, 4)).astype(np.float32)
    mask = (np.arange(7) < lengths[:, None]).astype(np.int64)  # right-padded, as collate pads
    hidden[mask == 0] = 100.0  # padding that leaks into any pooler shows
    real = [hidden[b, : lengths[b]] for b in range(5)]
    want = {
        "cls": np.stack([r[0] for r in real]),
        "mean": np.stack([r.mean(0) for r in real]),
        "max": np.stack([r.max(0) for r in real]),
        "lasttoken": np.stack([r[-1] for r in real]),
    }
    for name, pool in POOLERS.items():
        got = pool(torch.from_numpy(hidden), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(got, want[name], rtol=1e-6, atol=1e-6, err_msg=name)
