"""mclip: multilingual CLIP text encoders distilled from cached English CLIP teacher embeddings."""

__version__ = "0.1.0"

from mclip.config import EmbedConfig, EncodeConfig, EvalConfig, TrainConfig  # noqa: E402  (configs import nothing heavy)

# Heavy modules (torch, transformers, faiss) load on first use, so `import mclip` and `mclip --help` stay instant.
_LAZY = {}
