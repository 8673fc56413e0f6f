"""tests/bench/bench_train.py runs at tiny sizes and ends with a JSON line holding the contract's keys."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

SCRIPT = Path(__file__).parent / "bench" / "bench_train.py"
KEYS = {"pairs_per_s_cached", "pairs_per_s_online", "speedup_vs_online", "data_wait_fraction"}


@pytest.mark.slow
def test_bench_train_prints_its_contract():
    if tiny.real_clip_merges() is None:
        pytest.skip("bench_train needs the real CLIP tokenizer: pip install --no-deps open-clip-torch")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert KEYS <= result.keys(), KEYS - result.keys()
    assert all(
        result[k] > 0
        for k in (
            "pairs_per_s_cached",
            "pairs_per_s_online",
            "speedup_paired",
            "speedup_paired_cpu_time",
            "speedup_by_flop_count",
        )
    )
    # the rates and speed-ups agree with the raw per-step times reported beside them (a rate is batch size / step time)
    ms, cpu = result["step_ms"], result["cpu_seconds_per_step"]
    for kind in ("cached", "online", "paired_cached", "paired_online"):
        assert result[f"pairs_per_s_{kind}"] == pytest.approx(1000 * result["batch_size"] / ms[kind]), kind
    assert result["speedup_vs_online"] == pytest.approx(ms["online"] / ms["cached"])
    assert result["speedup_paired"] == pytest.approx(ms["paired_online"] / ms["paired_cached"])
    assert result["speedup_paired_cpu_time"] == pytest.approx(cpu["paired_online"] / cpu["paired_cached"])
    assert all(
        0 <= result[k] <= 1 for k in ("data_wait_fraction", "data_wait_fraction_online", "data_wait_fraction_workers0")
    )
    assert (
        result["warmup_steps"],
        result["timed_steps"],
        result["device"],
        result["precision"],
        result["warm_run"],
    ) == (2, 2, "cpu", "fp32", True)
    # warm-up steps left out; the interleaved run's 4 timed steps split into its cached and online halves
    assert result["steps_measured"] == {"cached": 2, "online": 2, "paired_cached": 2, "paired_online": 2}
    # the online loop trains on what the cache holds (float16 storage of the same fp32 teacher output)
    assert result["max_abs_diff_online_vs_cache"] < 1e-2
    assert any(line.startswith("  speed-up of the cache") for line in lines[:-1]), "the readable summary comes first"
