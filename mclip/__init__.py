"""mclip: multilingual CLIP text encoders distilled from cached English CLIP teacher embeddings."""

__version__ = "0.1.0"

from mclip.config import EmbedConfig, TrainConfig  # noqa: E402  (configs import nothing heavy)

# Heavy modules (torch, transformers, faiss) load on first use, so `import mclip` and `mclip --help` stay instant.
_LAZY = {
    "load": ("mclip.student", "load"),
    "embed_teacher": ("mclip.embed_teacher", "run"),
    "train_student": ("mclip.train_student", "run"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mclip' has no attribute {name!r}")


__all__ = ["__version__", "EmbedConfig", "TrainConfig", *_LAZY]
