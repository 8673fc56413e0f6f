"""mclip: multilingual CLIP text encoders distilled from cached English CLIP teacher embeddings."""

__version__ = "0.1.0"

from mclip.config import EmbedConfig, EncodeConfig, EvalConfig, ExportConfig, TrainConfig  # noqa: E402  (configs import nothing heavy)

# Heavy modules (torch, transformers, faiss) load on first use, so `import mclip` and `mclip --help` stay instant.
# Each verb's module is exported under the verb's name (`mclip.train_student.run(config)` is `mclip.train.run.run`):
# a module, not its `run` function, since a function under a submodule's name would be shadowed as soon as that
# submodule is imported.
_STAGES = {
    "embed_teacher": "mclip.embed.run",
    "train_student": "mclip.train.run",
    "eval_retrieval": "mclip.evaluate.run",
    "encode": "mclip.deploy.encode",
    "export": "mclip.deploy.export",
}


def load(path, device=None, trust_remote_code: bool = False):
    """Load an exported student (a run's final/ folder), or an `mclip export` ONNX folder (run by onnxruntime, without
    importing torch): `mclip.load(path).encode(texts)`."""
    from mclip.models.onnx import is_export, load_onnx

    if is_export(path):
        return load_onnx(path, device=device)
    from mclip.models.student import load as _load

    return _load(path, device=device, trust_remote_code=trust_remote_code)


def __getattr__(name):
    if name in _STAGES:
        import importlib

        return importlib.import_module(_STAGES[name])
    raise AttributeError(f"module 'mclip' has no attribute {name!r}")


__all__ = ["__version__", "EmbedConfig", "TrainConfig", "EvalConfig", "EncodeConfig", "ExportConfig", "load", *_STAGES]
