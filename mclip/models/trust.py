"""What mclip will not run unless told: Python code shipped with a checkpoint (`auto_map`) needs --trust-remote-code."""

from __future__ import annotations

import json
from pathlib import Path

from mclip.errors import UserError

CODE_FILES = ("config.json", "tokenizer_config.json")  # where a checkpoint names its own classes (auto_map)


def refusal(what: str, name: str, where: str) -> UserError:
    return UserError(
        f"{what} {name} ships its own Python code ({where}), which mclip runs only with --trust-remote-code; "
        "pass it if you trust the checkpoint's source, or use a checkpoint without custom code"
    )


def check_folder(name_or_path: str | Path, trust_remote_code: bool, what: str) -> None:
    """Refuse a local checkpoint folder whose config names its own code, before transformers reads anything from it.

    Without this, transformers loads its built-in class for a known model_type and silently ignores the auto_map: no code
    runs, but the model is not the one its author meant either."""
    folder = Path(name_or_path).expanduser()
    if trust_remote_code or not folder.is_dir():
        return
    for name in CODE_FILES:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise refusal(what, str(name_or_path), f"auto_map in {name}: {', '.join(sorted(data['auto_map']))}")


def check_config(config, name: str, trust_remote_code: bool, what: str) -> None:
    """The same refusal for a loaded config (a hub checkpoint), before any model class is chosen."""
    auto_map = getattr(config, "auto_map", None)
    if auto_map and not trust_remote_code:
        raise refusal(what, name, f"auto_map in config.json: {', '.join(sorted(auto_map))}")


def is_remote_code_error(exc: Exception) -> bool:
    """transformers' own refusal when a checkpoint's model_type exists only in its shipped code."""
    return "trust_remote_code" in str(exc)
