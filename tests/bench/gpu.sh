#!/usr/bin/env bash
# GPU benchmarks in one go (about 6 minutes on one H100): stage 1 (bench_embed, profile_embed) and stage 2 (bench_train) in bf16 with
# GPU-sized batches; each bench's JSON line goes to $1 (default ./gpu-out) as <name>.json, its full output to <name>.log.
# Without CUDA it runs the same benches on CPU at --quick sizes, so the script is tested before device time is spent.
#
#   bash tests/bench/gpu.sh [OUT_DIR]
#
# Installs nothing: missing Python packages are listed first (carry wheels and `pip install --no-index --find-links`).
set -uo pipefail

OUT="${1:-./gpu-out}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1

# ---- 1. what is installed (nothing is fetched from the network) ----
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import importlib.metadata, importlib.util, platform, sys
need = ["torch", "transformers", "datasets", "pyarrow", "numpy", "safetensors", "tqdm", "typer", "tokenizers", "open_clip"]
optional = {"emoji": "captions fall back to a short word list", "faiss": "stage 3 only; not used here",
            "threadpoolctl": "thread counts are not reported"}
missing = [m for m in need if importlib.util.find_spec(m) is None]
print(f"python {platform.python_version()} on {platform.node()}")
dists = {"open_clip": ["open_clip_torch"], "faiss": ["faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"]}
def version(module):  # from the installed metadata: importing open_clip would pull in torchvision
    for dist in dists.get(module, [module]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "?"
for m in need + list(optional):
    if importlib.util.find_spec(m) is not None:
        print(f"  {m:14s} {version(m)}")
for m, why in optional.items():
    if importlib.util.find_spec(m) is None:
        print(f"  optional package missing: {m} ({why})")
if missing:
    names = " ".join("open-clip-torch" if m == "open_clip" else m for m in missing)
    print(f"MISSING required packages: {' '.join(missing)}")
    print(f"  install from carried wheels: pip install --no-index --find-links WHEELS {names}"
          "   (open-clip-torch with --no-deps)")
    sys.exit(3)
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}, "
      f"threads {torch.get_num_threads()}")
EOF
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "gpu.sh: required packages are missing (see above); nothing was run" >&2
  exit "$status"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
date -u +"date %Y-%m-%dT%H:%M:%SZ" >>"$OUT/env.txt"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
  # 1M captions keep the fixed costs (loading, fingerprint: ~2 s) small beside the stream; the naive fp32 loop is far
  # slower, so it runs on 20k (rates are per caption); memory: 100k against 1M captions.
  EMBED_ARGS=(--device cuda --precision bf16 --captions 1000000 --naive-captions 20000 --rss-small 100000 --rss-large 1000000 --repeats 2)
  EMBED_VARIANT_ARGS=(--device cuda --precision bf16 --captions 500000 --repeats 1 --max-batch-size 8192 --skip-naive --skip-rss)
  TRAIN_ARGS=(--device cuda --precision bf16)
  LIMIT=240
else
  DEVICE=cpu
  EMBED_ARGS=(--quick)
  EMBED_VARIANT_ARGS=(--quick --captions 200 --max-batch-size 4096 --skip-naive --skip-rss)
  TRAIN_ARGS=(--quick)
  LIMIT=300
fi
echo "gpu.sh: running on $DEVICE; results in $OUT" >&2

failed=0
run_bench() {  # name, script, args...: keep the whole output, and the last line (the JSON result) as <name>.json
  local name=$1 script=$2
  shift 2
  local start=$SECONDS
  timeout "$LIMIT" "$PY" "$script" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    tail -n 1 "$OUT/$name.log" >"$OUT/$name.json"
    echo "gpu.sh: $name done in $((SECONDS - start))s: $(cat "$OUT/$name.json")" >&2
  else
    echo "gpu.sh: $name FAILED after $((SECONDS - start))s (exit $rc; 124 = over ${LIMIT}s); last lines of $OUT/$name.log:" >&2
    tail -n 15 "$OUT/$name.log" >&2
    failed=1
  fi
}

# ---- 2. stage 1: embed-teacher against the naive loop (item 1) ----
run_bench embed tests/bench/bench_embed.py "${EMBED_ARGS[@]}"
# the same stream with bigger batches: is mclip's default cap of 1024 captions per batch the GPU's limit?
run_bench embed_maxbatch tests/bench/bench_embed.py "${EMBED_VARIANT_ARGS[@]}"

# where stage 1's time goes: the model alone, the host side alone, end to end, and the profiler's op table
if [ "$DEVICE" = cuda ]; then
  run_bench profile_embed tests/bench/profile_embed.py --device cuda --precision bf16 --captions 200000 --out "$OUT"
else
  run_bench profile_embed tests/bench/profile_embed.py --quick --out "$OUT"
fi

# ---- 3. stage 2: train-student from the cache against the teacher online (item 4) ----
if [ -f tests/bench/bench_train.py ]; then
  run_bench train tests/bench/bench_train.py "${TRAIN_ARGS[@]}"
else
  echo "gpu.sh: tests/bench/bench_train.py is not there yet; skipping stage 2" >&2
fi

cat "$OUT"/*.json 2>/dev/null >"$OUT/all.jsonl"
echo "gpu.sh: finished on $DEVICE in ${SECONDS}s; JSON lines in $OUT/all.jsonl" >&2
exit "$failed"
