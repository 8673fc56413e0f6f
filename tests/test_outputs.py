"""Output folders: refusing or claiming --out, the resume diff from field metadata, atomic file and folder writes."""

import json

from mclip import outputs


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    outputs.write_json(target, {"a": 1})
    outputs.write_json(target, {"b": "é"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"b": "é"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert target.stat().st_mode & 0o777 == outputs.FILE_MODE
