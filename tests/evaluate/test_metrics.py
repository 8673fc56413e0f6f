"""Retrieval metrics and FAISS helpers, checked against a brute-force numpy oracle on seeded data (ties included)."""

import numpy as np
import pytest

from mclip.errors import UserError
from mclip.evaluate import metrics as retrieval


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small FAISS searches run several times faster on one thread than on two contended ones."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def oracle_ranks(queries, gallery, query_labels, gallery_labels, atol=retrieval.TIE_ATOL):
    """Brute force over the full score matrix: 1 + non-relevant items scoring >= the best relevant one (ties against)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T  # (Q, G)
    relevant = np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    best = np.where(relevant, scores, -np.inf).max(axis=1)
    ranks = 1.0 + (~relevant & (scores >= best[:, None] - atol)).sum(axis=1)
    return np.where(relevant.any(axis=1), ranks, np.inf)


def topk_with_random_tie_order(scores, depth, rng):
    """Top-`depth` ids and scores per row, best first, tied items in a random order (FAISS promises no order either)."""
    order = np.lexsort((rng.random(scores.shape), -scores), axis=-1)[:, :depth]
    return order, np.take_along_axis(scores, order, axis=1)


def clip_at(ranks, k):
    return np.where(ranks <= k, ranks, np.inf)


def tied_data(seed=0, n_gallery=60, n_queries=80, dim=6):
    """Small-integer vectors (exact dot products) with duplicated gallery rows and several gallery items per label."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-2, 3, size=(n_gallery, dim)).astype(np.float64)
    gallery[n_gallery // 2 :] = gallery[: n_gallery - n_gallery // 2]  # every vector twice: exact ties
    gallery_labels = rng.integers(0, n_gallery // 3, size=n_gallery)
    queries = rng.integers(-2, 3, size=(n_queries, dim)).astype(np.float64)
    query_labels = rng.integers(0, n_gallery // 3, size=n_queries)
    return queries, gallery, query_labels, gallery_labels, rng


def test_ranks_from_topk_match_the_oracle_with_exact_ties_in_any_order():
    queries, gallery, query_labels, gallery_labels, rng = tied_data()
    truth = oracle_ranks(queries, gallery, query_labels, gallery_labels, atol=0.0)
    scores = queries @ gallery.T
    assert (np.sort(scores, axis=1)[:, 1:] == np.sort(scores, axis=1)[:, :-1]).any(), "the data must hold exact ties"
    k = 10
    depth = retrieval.search_depth(gallery_labels, k)
    for _ in range(5):  # the rank must not depend on how tied items happen to be ordered
        ids, top = topk_with_random_tie_order(scores, depth, rng)
        ranks = retrieval.ranks_from_topk(ids, top, query_labels, gallery_labels, atol=0.0)
        np.testing.assert_array_equal(clip_at(ranks, k), clip_at(truth, k))
        ids, top = topk_with_random_tie_order(scores, len(gallery), rng)  # the full list: every rank exact
        np.testing.assert_array_equal(
            retrieval.ranks_from_topk(ids, top, query_labels, gallery_labels, atol=0.0), truth
        )


def test_ties_count_against_the_query_so_a_collapsed_model_scores_zero():
    gallery = np.ones((50, 4), np.float32)
    labels = np.arange(50)
    metrics, ranks = retrieval.retrieve(gallery, gallery, labels, labels, ks=(1, 5, 10))
    assert metrics["R@1"] == metrics["R@10"] == metrics["MRR@10"] == 0.0
    assert np.isinf(ranks).all()  # 49 non-relevant items tie with the relevant one: rank 50, beyond every listed depth


def test_tolerance_treats_float_noise_as_a_tie():
    ids = np.array([[1, 0, 2]])
    scores = np.array([[0.5 + 1e-8, 0.5, 0.1]])  # item 1 beats the relevant item 0 only by float noise
    labels = np.arange(3)
    assert retrieval.ranks_from_topk(ids, scores, np.array([0]), labels, atol=0.0)[0] == 2
    assert retrieval.ranks_from_topk(ids, scores, np.array([0]), labels, atol=1e-6)[0] == 2
    ids = np.array([[0, 1, 2]])
    scores = np.array(
        [[0.5, 0.5 - 1e-8, 0.1]]
    )  # the relevant item 0 leads item 1 only by noise: still a tie, counted against
    assert retrieval.ranks_from_topk(ids, scores, np.array([0]), labels, atol=1e-6)[0] == 2
    assert retrieval.ranks_from_topk(ids, scores, np.array([0]), labels, atol=0.0)[0] == 1


def test_a_tie_running_past_the_end_of_a_cut_list_is_unknown_but_padding_is_not_a_cut():
    labels = np.arange(5)
    ids = np.array([[3, 0]])
    assert np.isinf(retrieval.ranks_from_topk(ids, np.array([[0.7, 0.7]]), np.array([0]), labels))[
        0
    ]  # items 1, 2, 4 may tie too
    last_place = retrieval.ranks_from_topk(ids, np.array([[0.7, 0.6]]), np.array([0]), labels)[0]
    assert np.isinf(last_place)  # unlisted items may tie the last listed score
    assert retrieval.ranks_from_topk(ids, np.array([[0.7, 0.6]]), np.array([3]), labels)[0] == 1
    padded = np.array([[3, 0, -1, -1, -1]])  # an IVF index that found only two items: nothing lies beyond
    assert (
        retrieval.ranks_from_topk(padded, np.array([[0.7, 0.7, -np.inf, -np.inf, -np.inf]]), np.array([0]), labels)[0]
        == 2
    )
    assert np.isinf(retrieval.ranks_from_topk(padded, np.zeros((1, 5)), np.array([4]), labels))[
        0
    ]  # relevant item never listed


def test_metrics_from_ranks_by_hand():
    ranks = np.array([1, 2, np.inf, 7, 11])
    metrics = retrieval.metrics_from_ranks(ranks, (1, 5, 10))
    assert metrics == pytest.approx({"R@1": 0.2, "R@5": 0.4, "R@10": 0.6, "MRR@10": (1 + 1 / 2 + 1 / 7) / 5})


def test_rank_counts_added_in_any_batches_give_the_metrics_of_numpy_over_all_ranks():
    """R@K exactly numpy's share, MRR the exact mean (rounded once), whatever the batches: no array of every rank needed."""
    rng = np.random.default_rng(5)
    ranks = np.where(rng.random(1000) < 0.1, np.inf, rng.integers(1, 30, size=1000).astype(np.float64))
    whole = retrieval.metrics_from_ranks(ranks, (1, 5, 10))
    for cuts in ([], [1, 2, 3], sorted(rng.integers(0, 1000, size=40).tolist())):
        counts = retrieval.RankCounts((1, 5, 10))
        for part in np.split(ranks, cuts):
            counts.add(part)
        assert counts.metrics() == whole
    for k in (1, 5, 10):
        assert whole[f"R@{k}"] == float(np.mean(ranks <= k))
    assert whole["MRR@10"] == pytest.approx(float(np.mean(np.where(ranks <= 10, 1 / ranks, 0))), rel=1e-15)
    assert retrieval.RankCounts((1, 10)).metrics() == {"R@1": 0.0, "R@10": 0.0, "MRR@10": 0.0}


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_a_labelled_index_ranks_as_one_that_looks_its_labels_up(factory):
    """Vectors added under their label (ids: IVF's own, an IndexIDMap around others) rank as positions mapped to labels."""
    rng = np.random.default_rng(8)
    gallery = retrieval.l2_normalize(rng.normal(size=(200, 8)))
    labels = rng.integers(0, 50, size=200)
    queries = retrieval.l2_normalize(rng.normal(size=(40, 8)))
    query_labels = rng.integers(0, 50, size=40)
    plain, labelled = (
        retrieval.IndexBuilder(factory, 8, nprobe=4),
        retrieval.IndexBuilder(factory, 8, nprobe=4, labelled=True),
    )
    for start in range(0, 200, 30):
        plain.add(gallery[start : start + 30])
        labelled.add(gallery[start : start + 30], labels[start : start + 30])
    depth = retrieval.search_depth(labels, 10)
    expected = plain.ranks(queries, query_labels, depth, label_of=lambda ids: labels[ids])
    np.testing.assert_array_equal(labelled.ranks(queries, query_labels, depth, batch_size=7), expected)
    if factory == "Flat":
        np.testing.assert_array_equal(
            clip_at(expected, 10), clip_at(oracle_ranks(queries, gallery, query_labels, labels), 10)
        )


def test_identity_case_is_perfect():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(300, 16))
    labels = np.arange(300)
    metrics, ranks = retrieval.retrieve(gallery, gallery, labels, labels)
    assert metrics == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "MRR@10": 1.0}
    assert (ranks == 1).all()


def test_unrelated_queries_score_near_chance():
    rng = np.random.default_rng(2)
    n = 2000
    queries, gallery = rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    labels = np.arange(n)
    metrics, ranks = retrieval.retrieve(queries, gallery, labels, labels, ks=(1, 10, 100))
    # chance: R@K = K / n (0.0005, 0.005, 0.05); bounds are about 4 standard deviations
    assert metrics["R@1"] <= 0.004
    assert metrics["R@10"] <= 0.012
    assert 0.03 <= metrics["R@100"] <= 0.07
    np.testing.assert_array_equal(
        clip_at(ranks, 100),
        clip_at(oracle_ranks(retrieval.l2_normalize(queries), retrieval.l2_normalize(gallery), labels, labels), 100),
    )


def test_multi_caption_images_both_directions_match_the_oracle():
    rng = np.random.default_rng(3)
    n_images, per_image = 40, 5
    images = retrieval.l2_normalize(rng.normal(size=(n_images, 24)))
    caption_image = np.repeat(np.arange(n_images), per_image)  # each image has 5 captions
    captions = retrieval.l2_normalize(images[caption_image] + 0.9 * rng.normal(size=(n_images * per_image, 24)))
    image_ids = np.arange(n_images)
    # text -> image: one relevant image per caption
    metrics, ranks = retrieval.retrieve(captions, images, caption_image, image_ids, ks=(1, 5, 10))
    np.testing.assert_array_equal(
        clip_at(ranks, 10), clip_at(oracle_ranks(captions, images, caption_image, image_ids), 10)
    )
    assert 0 < metrics["R@1"] < 1
    # image -> text: a hit when any of the image's captions is in the top K
    metrics, ranks = retrieval.retrieve(images, captions, image_ids, caption_image, ks=(1, 5, 10))
    truth = oracle_ranks(images, captions, image_ids, caption_image)
    np.testing.assert_array_equal(clip_at(ranks, 10), clip_at(truth, 10))
    best_caption = np.array([(images[i] @ captions.T).argmax() for i in range(n_images)])
    assert metrics["R@1"] == np.mean(caption_image[best_caption] == image_ids)


def test_search_depth_leaves_room_for_every_relevant_item():
    assert retrieval.search_depth(np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), 10) == 13
    assert retrieval.search_depth(np.arange(5), 10) == 5  # never more than the gallery


def test_search_in_batches_equals_one_search():
    rng = np.random.default_rng(4)
    gallery = retrieval.l2_normalize(rng.normal(size=(500, 16)))
    queries = retrieval.l2_normalize(rng.normal(size=(77, 16)))
    index = retrieval.build_index(gallery)
    one = retrieval.search(index, queries, 7, batch_size=10_000)
    many = retrieval.search(index, queries, 7, batch_size=8)
    np.testing.assert_array_equal(one[1], many[1])
    np.testing.assert_allclose(one[0], many[0])


@pytest.mark.parametrize("factory", ["Flat", "IVF4,PQ4x4"])
def test_an_index_filled_in_batches_equals_one_built_from_the_whole_gallery(factory, monkeypatch):
    rng = np.random.default_rng(7)
    gallery = retrieval.l2_normalize(rng.normal(size=(300, 16)))
    queries = retrieval.l2_normalize(gallery + 0.5 * rng.normal(size=gallery.shape))
    labels = np.arange(300)
    whole = retrieval.ranks_from_topk(
        *retrieval.search(retrieval.build_index(gallery, factory), queries, 11)[::-1], labels, labels
    )
    builder = retrieval.IndexBuilder(factory, 16)
    for start in range(0, 300, 7):  # a small gallery is held until its end and trained on whole, as one array would be
        builder.add(gallery[start : start + 7])
    np.testing.assert_array_equal(builder.ranks(queries, labels, 11, batch_size=13), whole)
    monkeypatch.setattr(retrieval, "TRAIN_MIN", 64)
    monkeypatch.setattr(retrieval, "TRAIN_PER_LIST", 8)  # IVF4: 32 < TRAIN_MIN
    bounded = retrieval.IndexBuilder(factory, 16)
    assert bounded.train_size == (64 if factory != "Flat" else 0)
    for start in range(0, 300, 50):
        bounded.add(gallery[start : start + 50])
    if factory == "Flat":  # no training: the same exact index
        np.testing.assert_array_equal(bounded.ranks(queries, labels, 11), whole)
    else:  # trained on the first 64 vectors only: other codes, about as good (whole: 0.32; chance: 0.03)
        assert bounded.index.ntotal == 300 and np.mean(bounded.ranks(queries, labels, 11) <= 10) > 0.2


def test_approximate_indexes_track_the_exact_one():
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(400, 16))
    queries = gallery + 0.7 * rng.normal(size=gallery.shape)
    labels = np.arange(400)
    exact, exact_ranks = retrieval.retrieve(queries, gallery, labels, labels)
    assert 0.5 < exact["R@1"] < 1.0  # noisy enough that an index can lose something
    _, ivf_ranks = retrieval.retrieve(queries, gallery, labels, labels, factory="IVF4,Flat", nprobe=4)
    np.testing.assert_array_equal(ivf_ranks, exact_ranks)  # probing every list is exhaustive
    hnsw, _ = retrieval.retrieve(queries, gallery, labels, labels, factory="HNSW16")
    assert hnsw["R@10"] >= exact["R@10"] - 0.02
    pq, _ = retrieval.retrieve(
        queries, gallery, labels, labels, factory="IVF4,PQ4x4"
    )  # lossy 4-bit codes: lower, far above chance
    assert 0.3 <= pq["R@10"] <= exact["R@10"]


def test_default_nprobe():
    assert [retrieval.default_nprobe(n) for n in (4, 256, 4096, 65536)] == [4, 16, 256, 4096]


def test_rejected_and_untrainable_index_strings_are_one_line_errors():
    with pytest.raises(UserError, match="FAISS rejects index 'IVF8,Bogus'") as err:
        retrieval.make_index("IVF8,Bogus", 16)
    assert "\n" not in str(err.value) and "index_factory.cpp" not in str(err.value)
    with pytest.raises(UserError, match="dimension"):
        retrieval.make_index("PQ5", 16)  # 16 is not a multiple of 5 sub-quantizers
    with pytest.raises(UserError, match="cannot be trained on this gallery of 20 vectors") as err:
        retrieval.build_index(np.random.default_rng(6).normal(size=(20, 16)).astype(np.float32), "IVF64,Flat")
    assert "\n" not in str(err.value)


def test_l2_normalize_keeps_zero_rows_finite():
    out = retrieval.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
