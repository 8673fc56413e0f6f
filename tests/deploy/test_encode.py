"""`mclip encode`: text files and dataset columns -> Arrow (+ .npy), the same vectors as mclip.load(path).encode."""

import json

import numpy as np
import pyarrow as pa
import pytest

import mclip
from mclip.cli import main
from mclip.config import EncodeConfig
from mclip.deploy.encode import model_folder, run
from mclip.errors import UserError
from mclip.models.student import build_student
from mclip.store import shards
from tests import tiny

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def model(bert_student, tmp_path_factory):
    folder = tmp_path_factory.mktemp("encode") / "model"
    build_student(str(bert_student), dim=8).save(folder)
    return folder


def read_rows(out):
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in shards.shard_files(out))
    return table.column("id").to_pylist(), table.column("text").to_pylist(), shards.to_numpy(table.column("embedding"))


def test_text_file_to_arrow_and_npy_equals_mclip_load_encode(model, tmp_path):
    texts = [tiny.CORPUS[i % len(tiny.CORPUS)] + f" {i}" for i in range(11)]
    lines = texts[:3] + [""] + texts[3:7] + ["   "] + texts[7:]
    source = tmp_path / "queries.txt"
    source.write_text("\ufeff" + "\r\n".join(lines) + "\n", encoding="utf-8")  # BOM and Windows line ends
    result = run(
        EncodeConfig(
            model=str(model), out=str(tmp_path / "out"), input=str(source), npy=True, shard_size=4, progress=False
        )
    )
    assert (result.rows, result.skipped, result.dim, len(result.files)) == (11, 2, 8, 3)
    ids, stored, emb = read_rows(tmp_path / "out")
    assert stored == texts
    assert ids == [str(i) for i, line in enumerate(lines) if line.strip()]  # ids are the 0-based line numbers
    expected = mclip.load(model).encode(texts)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "embeddings.npy"), emb)
    summary = json.loads((tmp_path / "out" / "encode.json").read_text())
    assert summary["rows"] == 11 and summary["files"] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]


def test_dataset_column_with_ids_float16_and_limit(model, tmp_path):
    rows = [{"key": f"k{i}", "sentence": tiny.CORPUS[i]} for i in range(6)] + [{"key": "k6", "sentence": None}]
    data = tiny.write_captions(tmp_path / "d.jsonl", rows)
    result = run(
        EncodeConfig(
            model=str(model),
            out=str(tmp_path / "out"),
            data=str(data),
            column="sentence",
            id_column="key",
            dtype="float16",
            progress=False,
        )
    )
    assert (result.rows, result.skipped) == (6, 1)
    ids, stored, emb = read_rows(tmp_path / "out")
    assert ids == [f"k{i}" for i in range(6)] and stored == tiny.CORPUS[:6]
    assert (
        pa.ipc.open_file(pa.memory_map(str(result.files[0]))).schema.field("embedding").type.value_type == pa.float16()
    )
    np.testing.assert_allclose(emb, mclip.load(model).encode(tiny.CORPUS[:6]), atol=2e-3)
    limited = run(
        EncodeConfig(
            model=str(model), out=str(tmp_path / "out2"), data=str(data), column="sentence", limit=3, progress=False
        )
    )
    assert limited.rows == 3


def test_a_dataset_column_is_read_in_chunks_with_the_same_rows(model, tmp_path, monkeypatch):
    import mclip.deploy.encode

    rows = [{"sentence": None if i % 4 == 1 else tiny.CORPUS[i % len(tiny.CORPUS)] + f" {i}"} for i in range(11)]
    data = tiny.write_captions(tmp_path / "d.jsonl", rows)
    whole = run(
        EncodeConfig(
            model=str(model), out=str(tmp_path / "whole"), data=str(data), column="sentence", npy=True, progress=False
        )
    )
    monkeypatch.setattr(mclip.deploy.encode, "COLUMN_CHUNK", 3)  # 11 rows read 3 at a time, written in shards of 2
    chunked = run(
        EncodeConfig(
            model=str(model),
            out=str(tmp_path / "chunked"),
            data=str(data),
            column="sentence",
            npy=True,
            shard_size=2,
            progress=False,
        )
    )
    assert (chunked.rows, chunked.skipped) == (whole.rows, whole.skipped) == (8, 3)
    ids, texts, emb = read_rows(tmp_path / "chunked")
    assert ids == [str(i) for i in range(11) if i % 4 != 1] and (ids, texts) == read_rows(tmp_path / "whole")[:2]
    np.testing.assert_allclose(
        np.load(tmp_path / "chunked" / "embeddings.npy"), np.load(tmp_path / "whole" / "embeddings.npy"), atol=1e-5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "chunked" / "embeddings.npy"), emb)


def test_unnormalized_output_keeps_the_norms(model, tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("red apple\ngreen tree\n", encoding="utf-8")
    run(EncodeConfig(model=str(model), out=str(tmp_path / "out"), input=str(source), normalize=False, progress=False))
    emb = read_rows(tmp_path / "out")[2]
    np.testing.assert_allclose(emb, mclip.load(model).encode(["red apple", "green tree"], normalize=False), atol=1e-5)
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_bad_inputs_are_one_line_errors(model, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 ok\n".encode("utf-8") + "na\u00efve\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt line 2 is not UTF-8") as err:
        run(EncodeConfig(model=str(model), out=str(tmp_path / "o1"), input=str(latin), progress=False))
    assert "\n" not in str(err.value) and not (tmp_path / "o1").exists()  # nothing written
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(UserError, match="no texts to encode"):
        run(EncodeConfig(model=str(model), out=str(tmp_path / "o2"), input=str(empty), progress=False))
    data = tiny.write_captions(tmp_path / "d.jsonl", [{"text": "a", "n": 1}])
    with pytest.raises(UserError, match="column 'caption' not found"):
        run(EncodeConfig(model=str(model), out=str(tmp_path / "o3"), data=str(data), column="caption", progress=False))
    with pytest.raises(UserError, match="holds int64 values, not text"):
        run(EncodeConfig(model=str(model), out=str(tmp_path / "o3"), data=str(data), column="n", progress=False))
    with pytest.raises(UserError, match="exactly one of --input"):
        EncodeConfig(model=str(model), out=str(tmp_path / "o4"), input=str(empty), data=str(data))


def test_out_folder_refused_unless_overwrite_and_stale_files_go(model, tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("\n".join(tiny.CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    run(EncodeConfig(model=str(model), out=str(out), input=str(source), shard_size=5, npy=True, progress=False))
    with pytest.raises(UserError, match="is not empty"):
        run(EncodeConfig(model=str(model), out=str(out), input=str(source), progress=False))
    run(EncodeConfig(model=str(model), out=str(out), input=str(source), overwrite=True, progress=False))
    assert sorted(p.name for p in out.iterdir()) == ["encode.json", "shard-00000.arrow"]  # old shards and .npy are gone
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="did not write \\(mine.txt\\)"):
        run(EncodeConfig(model=str(model), out=str(out), input=str(source), overwrite=True, progress=False))
    assert (out / "mine.txt").read_text() == "keep"


def test_model_folder_accepts_a_student_a_checkpoint_or_a_run(model, tmp_path):
    assert model_folder(model) == model
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-0000010").symlink_to(model, target_is_directory=True)
    assert model_folder(run_dir / "checkpoints" / "step-0000010") == run_dir / "checkpoints" / "step-0000010"
    with pytest.raises(UserError, match="has no final/ student yet; pass a checkpoint such as --model .*step-0000010"):
        model_folder(run_dir)
    (run_dir / "final").symlink_to(model, target_is_directory=True)
    assert model_folder(run_dir) == run_dir / "final"
    with pytest.raises(UserError, match="is not an mclip student"):
        model_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        model_folder(tmp_path / "nope")


def test_cli_encode(model, tmp_path, capsys):
    source = tmp_path / "t.txt"
    source.write_text("ein Hund im Park\n一只狗\n", encoding="utf-8")
    main(
        [
            "encode",
            "--model",
            str(model),
            "--input",
            str(source),
            "--out",
            str(tmp_path / "out"),
            "--npy",
            "--no-progress",
        ]
    )
    assert np.load(tmp_path / "out" / "embeddings.npy").shape == (2, 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "--model", str(model), "--out", str(tmp_path / "out2"), "--no-progress"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "mclip: error: give exactly one of --input (a text file) or --data (a dataset)"
    )
