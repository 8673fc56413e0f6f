"""mclip: multilingual CLIP text encoders distilled from cached English CLIP teacher embeddings."""

__version__ = "0.1.0"

from mclip.config import EmbedConfig  # noqa: E402  (configs import nothing heavy)


def __getattr__(name):  # lazy: `import mclip` must not import torch
    if name == "embed_teacher":
        from mclip import embed_teacher

        return embed_teacher
    raise AttributeError(name)


__all__ = ["__version__", "EmbedConfig"]
