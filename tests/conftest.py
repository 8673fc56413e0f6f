"""Shared fixtures: tiny teachers and students saved once per session and loaded through from_pretrained."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# One torch thread: tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads that wait on
# each other made a tiny forward pass 15x slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def clip_teacher(tmp_path_factory):
    """Tiny CLIPModel (text + vision towers) with a CLIP-format tokenizer."""
    return tiny.write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def clip_text_teacher(tmp_path_factory):
    """Tiny CLIPTextModelWithProjection (text tower only)."""
    return tiny.write_tiny_clip(tmp_path_factory.mktemp("clip_text"), with_vision=False)


@pytest.fixture(scope="session")
def bert_teacher(tmp_path_factory):
    """Tiny BERT encoder: a sentence-encoder style teacher (mean pooled)."""
    return tiny.write_tiny_bert(tmp_path_factory.mktemp("bert"), hidden=24, seed=1)


@pytest.fixture(scope="session")
def bert_student(tmp_path_factory):
    """Tiny BERT used as the multilingual student backbone."""
    return tiny.write_tiny_bert(tmp_path_factory.mktemp("student"), hidden=32, seed=2)


@pytest.fixture
def captions(tmp_path):
    """Twenty English captions with ids, as JSON lines."""
    rows = [{"id": f"c{i:03d}", "caption": tiny.CORPUS[i % len(tiny.CORPUS)] + f" number {i}"} for i in range(20)]
    return tiny.write_captions(tmp_path / "captions.jsonl", rows)
