"""mclip.models.teacher: CLIP projection and mean pooling against the HF models' own outputs, truncation, fingerprints, refusals."""

import numpy as np
import pytest
import torch

from mclip.errors import UserError
from mclip.models.teacher import fingerprint, load_teacher, skip_second_regex
from tests import tiny

TEXTS = ["a photo of a dog", "x", "two children playing football on a sunny afternoon in the park", "站立的女人"]
LONG = " ".join(["woman standing"] * 60)  # far over 77 CLIP tokens and 64 BERT tokens


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory):
    return tiny.write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def _padded(path, texts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")


def test_clip_embedding_equals_get_text_features(clip_teacher):
    from transformers import CLIPModel

    teacher = load_teacher(str(clip_teacher))
    assert (teacher.kind, teacher.pooling, teacher.dim, teacher.max_length) == ("clip", "clip_projection", 16, 77)
    batch = _padded(clip_teacher, TEXTS)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(clip_teacher).eval().get_text_features(**batch).pooler_output.numpy()
    emb, states = teacher.embed(batch["input_ids"], batch["attention_mask"])
    assert states == {}
    np.testing.assert_allclose(emb.numpy(), ref, atol=1e-5)
    # encode() batches by length and pads to each batch's longest caption: same vectors
    np.testing.assert_allclose(teacher.encode(TEXTS, batch_size=2, normalize=False), ref, atol=1e-5)


def test_clip_text_model_with_projection_teacher(clip_text_teacher):
    from transformers import CLIPTextModelWithProjection

    teacher = load_teacher(str(clip_text_teacher))
    assert teacher.kind == "clip"
    batch = _padded(clip_text_teacher, TEXTS)
    with torch.no_grad():
        ref = CLIPTextModelWithProjection.from_pretrained(clip_text_teacher).eval()(**batch).text_embeds.numpy()
    np.testing.assert_allclose(teacher.encode(TEXTS, normalize=False), ref, atol=1e-5)


def test_bert_teacher_is_a_masked_mean_of_the_last_hidden_state(bert_teacher):
    from transformers import AutoModel

    teacher = load_teacher(str(bert_teacher))
    assert (teacher.kind, teacher.pooling, teacher.dim) == ("encoder", "mean", 24)
    batch = _padded(bert_teacher, TEXTS)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(bert_teacher).eval()(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy()
    assert (mask == 0).any(), "the batch must hold padding for the mask to matter"
    ref = np.stack([hidden[i, mask[i] == 1].mean(0) for i in range(len(TEXTS))])
    np.testing.assert_allclose(teacher.encode(TEXTS, normalize=False), ref, atol=1e-5)


@pytest.mark.parametrize("which", ["clip_teacher", "bert_teacher"])
def test_normalize_on_and_off(which, request):
    teacher = load_teacher(str(request.getfixturevalue(which)))
    raw = teacher.encode(TEXTS, normalize=False)
    unit = teacher.encode(TEXTS, normalize=True)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


def test_fingerprint_changes_with_the_weights_only(clip_text_teacher):
    a, b = load_teacher(str(clip_text_teacher)), load_teacher(str(clip_text_teacher))
    assert a.info().fingerprint == b.info().fingerprint
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert fingerprint(b.model) != a.info().fingerprint


def test_fingerprint_differs_between_seeds(tmp_path, clip_text_teacher):
    other = tiny.write_tiny_clip(tmp_path / "other", with_vision=False, seed=7)
    assert load_teacher(str(other)).info().fingerprint != load_teacher(str(clip_text_teacher)).info().fingerprint


@pytest.mark.parametrize(
    "which,max_length", [("clip_teacher", None), ("clip_teacher", 8), ("bert_teacher", None), ("bert_teacher", 10)]
)
def test_truncation_matches_the_tokenizer(which, max_length, request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(which)
    teacher = load_teacher(str(path), max_length=max_length)
    limit = max_length or {"clip_teacher": 77, "bert_teacher": 64}[which]
    assert teacher.max_length == limit
    texts = [LONG, "dog", LONG + " and more"]
    ids, truncated = teacher.tokenize(texts)
    ref = AutoTokenizer.from_pretrained(path)(texts, truncation=True, max_length=limit)["input_ids"]
    assert ids == ref
    end = teacher.tokenizer.eos_token_id if which == "clip_teacher" else teacher.tokenizer.sep_token_id
    assert len(ids[0]) == limit and ids[0][-1] == end  # the final special token survives the cut
    full = AutoTokenizer.from_pretrained(path)(texts)["input_ids"]
    assert truncated.tolist() == [len(x) > limit for x in full]
    assert truncated.tolist()[1] is False and truncated.tolist()[0] is True


def test_max_length_over_the_limit_is_refused(clip_teacher):
    with pytest.raises(UserError, match="exceeds the teacher's limit of 77"):
        load_teacher(str(clip_teacher), max_length=100)


def test_cached_layer_states(clip_teacher, bert_teacher):
    from transformers import AutoModel, CLIPModel

    clip = load_teacher(str(clip_teacher))
    batch = _padded(clip_teacher, TEXTS)
    _, states = clip.embed(batch["input_ids"], batch["attention_mask"], layers=(1, 2))
    with torch.no_grad():
        hs = CLIPModel.from_pretrained(clip_teacher).eval().text_model(**batch, output_hidden_states=True).hidden_states
    eos = (batch["input_ids"] == clip.tokenizer.eos_token_id).int().argmax(-1)  # first EOS, as CLIP pools
    for layer in (1, 2):
        np.testing.assert_allclose(states[layer].numpy(), hs[layer][torch.arange(len(TEXTS)), eos].numpy(), atol=1e-5)

    bert = load_teacher(str(bert_teacher))
    batch = _padded(bert_teacher, TEXTS)
    _, states = bert.embed(batch["input_ids"], batch["attention_mask"], layers=(1,))
    with torch.no_grad():
        hs = AutoModel.from_pretrained(bert_teacher).eval()(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].numpy() == 1
    ref = np.stack([hs[1][i].numpy()[mask[i]].mean(0) for i in range(len(TEXTS))])
    np.testing.assert_allclose(states[1].numpy(), ref, atol=1e-5)


def test_image_embedding_equals_get_image_features(clip_teacher):
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPModel

    teacher = load_teacher(str(clip_teacher), need_images=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = AutoImageProcessor.from_pretrained(clip_teacher)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = (
            CLIPModel.from_pretrained(clip_teacher).eval().get_image_features(pixel_values=pixels).pooler_output.numpy()
        )
    np.testing.assert_allclose(teacher.embed_images(images).numpy(), ref, atol=1e-5)


def test_refusals(clip_text_teacher, bert_teacher, gpt2_teacher, tmp_path):
    with pytest.raises(UserError, match="neither CLIP nor a text encoder"):
        load_teacher(str(gpt2_teacher))
    for path in (clip_text_teacher, bert_teacher):
        with pytest.raises(UserError, match="needs a full CLIP teacher"):
            load_teacher(str(path), need_images=True)
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load teacher"):
        load_teacher(str(tmp_path / "empty"))


@pytest.mark.parametrize("which", ["clip_teacher", "bert_teacher"])
def test_tokenize_in_threads_matches_the_transformers_call(which, request):
    """The Rust backend path, on one thread or chunks over several, gives the transformers call's ids and flags."""
    teacher = load_teacher(str(request.getfixturevalue(which)))
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(1000)] + [LONG, "", "  "]  # several chunks of 256
    ref = teacher.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    ref_cut = np.array([len(x) > teacher.max_length for x in ref])
    assert ref_cut.sum() == 1
    for threads in (1, 3):
        ids, truncated = teacher.tokenize(texts, threads=threads)
        np.testing.assert_array_equal(truncated, ref_cut)
        assert [x for x, cut in zip(ids, ref_cut) if not cut] == [x for x, cut in zip(ref, ref_cut) if not cut]
        assert (
            len(ids[-3]) == teacher.max_length and ids[-3][-1] == ref[-3][-1]
        )  # cut, keeping the closing special token


# Characters of every kind CLIP's two regexes tell apart: letters of several scripts, digits of several kinds (\p{N}
# includes ², Ⅷ, ٣), punctuation and symbols, emoji, combining marks, joiners, controls, many spaces, apostrophes.
FUZZ_PIECES = (
    list("aZéßжЖ中文カナ한글عربيहिन्दीไทย")
    + list("09²Ⅷ٣５½")
    + list(".,!?'’\"-_()[]<>|/\\@#$%^&*+=~`;:")
    + ["🐶", "👩‍🚀", "\u0301", "\u0903", "\u200d", "\u200b", "\x00", "\x1c", "\x85"]
    + [" ", "  ", "\t", "\n", "\r\n", "\xa0", "\u3000", "\u2028", "\u2009"]
    + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "<|endoftext|>", "<|startoftext|>", "<|", "|>"]
)


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(FUZZ_PIECES, size=rng.integers(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("real_merges", [False, True])
def test_clip_tokenizing_without_the_second_regex_gives_the_same_ids(tmp_path, real_merges):
    """Stage 1 skips ByteLevel's GPT-2 split after CLIP's own split (see CLIP_SPLIT): the same ids on fuzzed text."""
    from transformers import AutoTokenizer

    merges = tiny.real_clip_merges() if real_merges else None
    if real_merges and merges is None:
        pytest.skip("the real CLIP merges come from open-clip-torch, which is not installed")
    tiny.write_clip_tokenizer(tmp_path, merges)
    backend = AutoTokenizer.from_pretrained(tmp_path).backend_tokenizer
    fast = AutoTokenizer.from_pretrained(tmp_path).backend_tokenizer
    assert skip_second_regex(fast) and '"use_regex":false' in fast.to_str().replace(" ", "")  # the fast path is taken
    assert '"use_regex":true' in backend.to_str().replace(" ", "")
    texts = _fuzz_texts(5000) + TEXTS + [LONG, "it's a dog's life, isn't it? I'll say 'Hello' ＡＢＣ１２３"]
    want = [e.ids for e in backend.encode_batch(texts)]
    assert [e.ids for e in fast.encode_batch(texts)] == want
    assert sum(len(x) for x in want) > 10 * len(texts)  # the texts are not trivially short (19-27 ids a text)


def test_other_tokenizers_keep_their_pre_tokenizer(bert_teacher):
    backend = load_teacher(str(bert_teacher)).tokenizer.backend_tokenizer
    before = backend.to_str()
    assert not skip_second_regex(backend) and backend.to_str() == before


def test_pad_right_pads_each_sequence_of_a_flat_array(clip_teacher):
    teacher = load_teacher(str(clip_teacher))
    assert '"use_regex":false' in teacher.tokenizer.backend_tokenizer.to_str().replace(
        " ", ""
    )  # a CLIP teacher skips it
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    flat = np.array([t for s in seqs for t in s])
    lengths = np.array([len(s) for s in seqs])
    starts = np.cumsum(lengths) - lengths
    pad = teacher.tokenizer.pad_token_id
    order = np.array([3, 0, 2])  # any subset, any order: a batch of stage 1
    input_ids, mask = teacher.pad(flat, starts[order], lengths[order])
    assert input_ids.tolist() == [[13, 14, pad, pad], [5, 6, 7, pad], [9, 10, 11, 12]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert input_ids.dtype == mask.dtype == torch.int64
    ids, m = teacher.collate([seqs[1], seqs[2]])  # collate of lists takes the same path
    assert ids.tolist() == [[8, pad, pad, pad], [9, 10, 11, 12]] and m.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]


# ---- sentence-transformers folders: modules.json is honoured as sentence-transformers applies it ----


def _st_folder(folder, base, pooling: str, dense: bool = True, activation=None):
    """A sentence-transformers model saved by sentence-transformers itself: Transformer + Pooling(pooling) [+ Dense] + Normalize."""
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
    """BGE-style CLS pooling + Dense + Normalize (and the other modes): the cache equals SentenceTransformer(path).encode,
    and the manifest records what was applied."""
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
    """Older sentence-transformers wrote one boolean per pooling mode; an Identity Dense (mclip's own 2_Dense) is linear."""
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
    """Chained distillation: a final/ folder as --teacher gives exactly what mclip.load(final).encode gives (CLS pooling and
    the 2_Dense projection applied; mean pooling over the backbone would be another space)."""
    import mclip
    from mclip.models.student import build_student

    final = build_student(str(bert_student), dim=16, pooler="cls").save(tmp_path / "final")
    teacher = load_teacher(str(final))
    assert (teacher.kind, teacher.pooling, teacher.dim) == ("encoder", "cls + dense(32->16) + normalize", 16)
    np.testing.assert_allclose(teacher.encode(TEXTS), mclip.load(final).encode(TEXTS), atol=2e-6)


def test_the_dense_weights_are_part_of_the_fingerprint(bert_student, tmp_path):
    from mclip.models.student import build_student

    student = build_student(str(bert_student), dim=16, pooler="mean")
    first = load_teacher(str(student.save(tmp_path / "a"))).info().fingerprint
    with torch.no_grad():
        student.projection.bias.add_(0.5)
    second = load_teacher(str(student.save(tmp_path / "b"))).info().fingerprint
    assert first != second
    # a head without weights (pooling + Normalize, as all-MiniLM-L6-v2) keeps the backbone's own fingerprint
    assert fingerprint(load_teacher(str(tmp_path / "a")).model) == fingerprint(student.backbone)


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
