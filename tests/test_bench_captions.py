"""tests/bench/bench_captions.py runs end to end on a tiny synthetic caption folder with tiny models, and reports every
system both ways, its speed, the zero-shot languages and the train-row subsample it was asked for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

SCRIPT = Path(__file__).parent / "bench" / "bench_captions.py"


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), folder / name)


@pytest.mark.slow
def test_bench_captions_runs_every_system_on_a_tiny_folder(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("accelerate")
    k = len(tiny.CORPUS)
    rows = [
        {
            "id": f"{split}-{i:03d}",
            "caption": f"{tiny.CORPUS[i % k]} {i}",
            "caption_de": f"{tiny.CORPUS[(i + 6) % k]} {i}",
            "caption_fr": f"{tiny.CORPUS[(i + 3) % k]} {i}",
        }
        for split, n in (("train", 40), ("test", 12))
        for i in range(n)
    ]
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "train.parquet", [r for r in rows if r["id"].startswith("train")])
    _write(data, "test2016.parquet", [r for r in rows if r["id"].startswith("test")])
    _write(data, "val.parquet", rows[:3])  # not read: the bench tunes nothing
    corpus = [r[c] for r in rows for c in ("caption", "caption_de", "caption_fr")]
    teacher = tiny.write_tiny_bert(tmp_path / "teacher", hidden=16, seed=1, corpus=corpus)
    student = tiny.write_tiny_xlmr(tmp_path / "student", hidden=16, corpus=corpus)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data",
            str(data),
            "--teacher",
            str(teacher),
            "--student",
            str(student),
            "--train-rows",
            "32",
            "--step-timing",
            "2",
            "--speed-rounds",
            "2",
            "--speed-steps",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    r, text = json.loads(lines[-1]), "\n".join(lines[:-1])

    assert r["systems"] == [
        "teacher",
        "mclip_mse",
        "st_mse",
        "demo",
        "mclip_mse_ml",
        "st_mse_ml",
        "mclip_cl_ml",
        "mclip_cl_ml_sparse",
        "mclip_cl_ml_frozen",
        "demo_zs",
        "mclip_cl_ml_zs",
    ]
    assert r["languages"] == ["de", "fr"] and r["train_rows"] == 32 and r["train_rows_available"] == 40
    assert r["train_pairs"] == 32 * 3 and r["zero_shot_pairs"] == 32 * 2  # de + fr + en; de + en
    assert r["zero_shot_languages"]["demo_zs"] == ["fr"] and r["zero_shot_languages"]["demo"] == []
    for name in r["systems"]:
        for table in ("r1", "r5", "rev_r1", "rev_r5"):
            assert set(r[table][name]) == {"de", "fr", "en"}
            assert all(0 <= v <= 1 for v in r[table][name].values()), (table, name)
        assert all(r["r1"][name][lang] <= r["r5"][name][lang] for lang in ("de", "fr", "en"))
    assert set(r["speed"]) == set(r["systems"]) - {"teacher"}
    assert all(s["pairs_per_s"] > 0 and s["steps"] == 1 for s in r["speed"].values())  # 96 or 64 pairs, batch 64
    assert min(r["export_min_cos"].values()) > 0.999  # scoring mclip's students through sentence-transformers is fair
    timing = r["step_timing"]
    assert timing["steps"] == 2 and set(timing["s_per_step"]) == {"st", "dense", "sparse", "frozen"}
    assert timing["speedup_vs_dense"]["dense"] == 1.0 and all(v > 0 for v in timing["s_per_step"].values())
    assert timing["speedup_vs_st"]["sparse"] == pytest.approx(
        timing["s_per_step"]["st"] / timing["s_per_step"]["sparse"]
    )
    assert set(timing["padded_length"]) == {"st", "mclip"} and min(timing["padded_length"].values()) > 0
    assert "mclip_cl_ml_step_ge_1.5x_st" in r["targets"]
    rounds = r["speed_rounds"]  # the trainer and each multilingual mclip system (not the zero-shot arm), alternating
    ours = {"mclip_mse_ml", "mclip_cl_ml", "mclip_cl_ml_sparse", "mclip_cl_ml_frozen"}
    assert rounds["steps"] == 1 and len(rounds["rounds"]) == 2 and set(rounds["median"]) == ours
    assert list(rounds["rounds"][0])[0] == "st_mse_ml" and list(rounds["rounds"][1])[-1] == "st_mse_ml"
    for name in ours:
        per_round = [rnd[name]["pairs_per_s"] / rnd["st_mse_ml"]["pairs_per_s"] for rnd in rounds["rounds"]]
        assert rounds["ratio_vs_st"][name]["pairs_per_s"] == pytest.approx(per_round)
        assert rounds["median"][name]["pairs_per_s"] == pytest.approx(sum(per_round) / 2)
    assert "median of 2 alternating rounds of 1 steps" in text
    assert r["run_configs"]["mclip_cl_ml_sparse"]["sparse_embeddings"] is True
    assert r["run_configs"]["mclip_cl_ml"]["projection_init"] == "random"
    assert r["run_configs"]["mclip_mse"]["projection_init"] == "auto"
    assert r["run_configs"]["demo"]["extend_vocab"] is True and r["run_configs"]["demo"]["wise_ft"] == 0.5
    assert r["run_configs"]["st_mse_ml"]["learning_rate"] == r["settings"]["lr_ml"]
    assert "train 32 of 40 rows" in text and "load average" in text and "interleaved steps" in text
    assert "| `mclip_cl_ml` mclip cl (seed's path) |" in text
    assert (out / "result.json").exists()
