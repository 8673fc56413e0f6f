"""The benchmark scripts under tests/bench run at tiny sizes and end with a JSON line holding the contract's keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

BENCH = Path(__file__).parent / "bench"

EMBED_KEYS = {
    "captions_per_s",
    "naive_captions_per_s",
    "speedup_vs_naive",
    "fraction_of_peak",
    "peak_rss_mb_small",
    "peak_rss_mb_large",
}
RETRIEVAL_KEYS = {"faiss_qps", "numpy_qps", "ivf_recall_at_10", "ivf_speedup"}

# Smallest sizes that still take every path: a 1-layer, 64-wide CLIP text tower with the real tokenizer, captions that
# span two shards, both memory runs in their own processes, and an IVF index with more than one list.
EMBED_ARGS = [
    "--quick",
    "--layers",
    "1",
    "--width",
    "64",
    "--captions",
    "24",
    "--rss-small",
    "8",
    "--rss-large",
    "24",
    "--shard-size",
    "16",
    "--repeats",
    "1",
    "--peak-size",
    "256",
]
RETRIEVAL_ARGS = [
    "--quick",
    "--gallery",
    "500",
    "--queries",
    "20",
    "--ivf-vectors",
    "2000",
    "--nlist",
    "16",
    "--repeats",
    "1",
]


def _start(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(BENCH / script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{proc.args[1]} failed:\n{err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
def test_bench_scripts_print_their_contract():
    if tiny.real_clip_merges() is None:
        pytest.skip("bench_embed needs the real CLIP tokenizer: pip install --no-deps open-clip-torch")
    embed = _start("bench_embed.py", EMBED_ARGS)  # both at once: most of the time is process start-up
    retrieval = _start("bench_retrieval.py", RETRIEVAL_ARGS)
    e, r = _result(embed), _result(retrieval)

    assert EMBED_KEYS <= e.keys(), EMBED_KEYS - e.keys()
    assert all(_positive(e[key]) for key in EMBED_KEYS), e
    # stage 1's own timer (its shard loop) runs inside the end-to-end time the bench takes around run(): per caption it
    # embeds, the loop is never the slower (the rates keep 4 significant digits: 0.1% for rounding)
    assert e["loop_captions_per_s"] / e["unique_captions"] >= 0.999 * e["captions_per_s"] / e["captions"], e
    assert e["captions"] == 24 and e["rss_captions"] == [8, 24]
    assert e["max_abs_diff_vs_naive"] < 1e-2, "stage 1 and the naive loop must compute the same embeddings"

    assert RETRIEVAL_KEYS <= r.keys(), RETRIEVAL_KEYS - r.keys()
    assert all(_positive(r[key]) for key in RETRIEVAL_KEYS), r
    assert 0 < r["ivf_recall_at_10"] <= 1
    assert r["flat_vs_numpy_topk_agreement"] == pytest.approx(1.0), "FAISS Flat and numpy must find the same top 10"
    assert r["ivf_factory"] == "IVF16,Flat"


@pytest.mark.slow
def test_profile_embed_times_the_parts_and_writes_the_profiler_table(tmp_path):
    if tiny.real_clip_merges() is None:
        pytest.skip("profile_embed needs the real CLIP tokenizer: pip install --no-deps open-clip-torch")
    r = _result(_start("profile_embed.py", ["--quick", "--captions", "40", "--out", str(tmp_path), "--rows", "5"]))
    rates = (
        "captions_per_s",
        "loop_captions_per_s",
        "model_captions_per_s",
        "host_captions_per_s",
        "tokenize_captions_per_s",
    )
    assert all(_positive(r[k]) for k in rates), r
    assert r["captions"] == 40 and r["slowest_part"] in ("model", "host") and r["device_busy"] is None  # busy: GPU only
    # the shard loop's timer runs inside the end-to-end one, over the same 40 captions (all distinct: none deduplicated)
    assert r["loop_captions_per_s"] >= 0.999 * r["captions_per_s"], r
    table = (tmp_path / "profile_embed.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
