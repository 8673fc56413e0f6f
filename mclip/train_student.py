"""Stage 2: train a multilingual student on (caption, cached teacher vector) pairs: join by id, batches, loop, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from mclip import __version__, distributed, lock, losses, shards, verify
from mclip.config import MIN_TEMPERATURE, TrainConfig, to_dict
from mclip.errors import UserError, first_line, writing
from mclip.student import META, StudentEncoder, build_student, extend_vocabulary, load, pool

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
ARTEFACTS = ("config.json", "metrics.jsonl", "curves.png", "join.json", "summary.json", CHECKPOINTS, "final", ".final.tmp", ".old-final")
# Fields a resumed run may change: where the inputs live and how fast it runs, not what it learns.
# Not epochs or max_steps: they set the length of the lr schedule, so changing them on resume would change what is learnt.
RUNTIME_FIELDS = {"data", "cache", "val_data", "out", "device", "precision", "num_workers", "num_threads", "progress", "resume",
                  "overwrite", "save_every", "keep_last", "eval_every", "log_every", "eval_batch_size", "trust_remote_code"}
RESUME = "rerun the same command with --resume to continue from the last checkpoint"  # after a failed write
CORRUPT = ".corrupt"  # suffix of a damaged checkpoint set aside on resume (kept for inspection, never loaded)


@dataclass
class TrainResult:
    out: Path  # the run folder
    final: Path  # the exported student (mclip.load, transformers, sentence-transformers)
    steps: int  # optimizer steps done, this run and the ones it resumed
    metrics: dict  # the last train record and the last validation, merged
    pairs_per_s: float  # global training throughput of this run (0 when it had nothing left to do)
    seconds: float  # wall time of this run
    join: dict  # what joined and what did not (also in join.json)


@dataclass
class Pairs:
    """(caption, teacher target) pairs: the text and the cache row of its id (cache ids are unique, so row == id)."""

    texts: pa.Array  # (P,) strings
    rows: np.ndarray  # (P,) int64 cache rows
    langs: np.ndarray  # (P,) int64 index into `languages`
    languages: list[str]
    groups: np.ndarray  # (P,) int64: equal for pairs whose cache row has the same English caption (one target, as in stage 3)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray) -> Pairs:
        idx = np.flatnonzero(keep)
        return Pairs(self.texts.take(pa.array(idx)), self.rows[idx], self.langs[idx], self.languages, self.groups[idx])

    def digest(self) -> str:
        """What the pairs are (texts, rows, languages, in order): a resumed run must train on exactly these."""
        h = hashlib.blake2b(digest_size=16)
        for buf in pa.concat_arrays([self.texts]).buffers()[1:]:
            h.update(memoryview(buf) if buf is not None else b"")
        h.update(self.rows.tobytes())
        h.update(self.langs.tobytes())
        return h.hexdigest()


# ---- data: join captions to cache rows by id, split validation by id, plan the batches ----


def join_pairs(parallel, languages: list[str], cache_ids: list[str], cache_texts: pa.Array) -> tuple[Pairs, dict]:
    """One pair per (id, language) with text and a target; "en" pairs take the cache's own text (what the teacher embedded)
    for every id that joined in another language. Ids without a target and targets without text are counted, never shifted."""
    row_of = {cid: r for r, cid in enumerate(cache_ids)}
    texts, rows, langs, report, joined = [], [], [], {}, []
    for k, lang in enumerate(languages):
        if lang == "en":
            continue
        ids, lang_texts = parallel.pairs(lang)
        found = np.fromiter((row_of.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
        ok = found >= 0
        texts += [t for t, good in zip(lang_texts, ok) if good]
        rows.append(found[ok])
        langs.append(np.full(int(ok.sum()), k, dtype=np.int64))
        joined.append(found[ok])
        report[lang] = {"pairs": int(ok.sum()), "empty_texts": int(parallel.missing.get(lang, 0)),
                        "ids_without_target": int((~ok).sum()), "targets_without_text": len(cache_ids) - len(np.unique(found[ok])),
                        "examples_without_target": [ids[i] for i in np.flatnonzero(~ok)[:20]]}
    if "en" in languages:
        en_rows = np.unique(np.concatenate(joined)) if joined else np.zeros(0, np.int64)
        texts += cache_texts.take(pa.array(en_rows)).to_pylist()
        rows.append(en_rows)
        langs.append(np.full(len(en_rows), languages.index("en"), dtype=np.int64))
        report["en"] = {"pairs": len(en_rows), "source": "cache text", "targets_without_text": len(cache_ids) - len(en_rows)}
    rows = np.concatenate(rows)
    text_group = pc.dictionary_encode(cache_texts).indices.to_numpy(zero_copy_only=False).astype(np.int64)  # (N,) per cache row
    pairs = Pairs(pa.array(texts, pa.large_string()), rows, np.concatenate(langs), list(languages), text_group[rows])
    return pairs, report


def hash_unit(ids: list[str], seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id from blake2b(seed:id): a split that holds across runs, machines and row order."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") / 2.0**64 for i in ids),
                       dtype=np.float64, count=len(ids))


def prepare_pairs(config: TrainConfig, cache) -> tuple[Pairs, Pairs | None, dict]:
    """Train pairs, validation pairs (ids held out whole, so no caption of a validation id is trained on) and the join report."""
    from mclip.data import load_parallel

    languages = list(config.languages) + (["en"] if config.include_english and "en" not in config.languages else [])
    table = cache.table(["id", "text"])
    cache_ids, cache_texts = table.column("id").to_pylist(), table.column("text").combine_chunks()

    def load_join(data: str, split: str) -> tuple[Pairs, dict]:
        parallel = load_parallel(data, split, [lang for lang in languages if lang != "en"], id_column=config.id_column,
                                 text_column_template=config.text_column_template, english=False)
        pairs, report = join_pairs(parallel, languages, cache_ids, cache_texts)
        if not any(report[lang]["pairs"] for lang in languages if lang != "en"):
            sample = next((parallel.pairs(lang)[0][:3] for lang in parallel.languages if parallel.pairs(lang)[0]), [])
            raise UserError(f"no caption id in {data} matches an id in the cache {config.cache} (data ids {sample} vs cache ids "
                            f"{cache_ids[:3]}); build the cache from the same rows with `mclip embed-teacher --id-column {config.id_column}`")
        return pairs, report

    pairs, report = load_join(config.data, config.split)
    val_rows = np.zeros(0, np.int64)
    if config.val_data:
        val_pairs, report["validation_join"] = load_join(config.val_data, config.val_split)
        val_rows = np.unique(val_pairs.rows)
    elif config.val_fraction > 0:
        candidates = np.unique(pairs.rows)
        val_rows = candidates[hash_unit([cache_ids[r] for r in candidates], config.seed) < config.val_fraction]
        if len(val_rows) == 0:
            raise UserError(f"val_fraction={config.val_fraction} holds out none of the {len(candidates)} ids; raise it or pass --val-data")
        val_pairs = pairs
    held_out = np.isin(pairs.rows, val_rows)
    train = pairs.subset(~held_out)
    val = None
    if len(val_rows):
        eval_rows = val_rows[np.argsort(hash_unit([cache_ids[r] for r in val_rows], config.seed), kind="stable")[: config.val_max_ids]]
        val = val_pairs.subset(np.isin(val_pairs.rows, eval_rows))
    report.update({"train_pairs": len(train), "train_ids": len(np.unique(train.rows)), "validation_ids": len(val_rows),
                   "held_out_pairs": int(held_out.sum()), "eval_ids": len(np.unique(val.rows)) if val else 0,
                   "eval_pairs": len(val) if val else 0, "languages": languages})
    if len(train) == 0:
        raise UserError("no training pairs are left after holding out validation ids; lower --val-fraction or check --val-data")
    return train, val, report


def plan_epoch(lengths: np.ndarray, langs: np.ndarray, batch_size: int, seed: int, epoch: int, group: int) -> np.ndarray:
    """(steps, batch_size) pair indices of one epoch, the same on every rank and on resume: a (seed, epoch) shuffle, then
    inside mega-batches of `group` batches pairs of alike token length are batched together (less padding), batch order
    shuffled again; the last partial batch is dropped. lengths, langs: (P,) per pair.

    Length grouping must not make batches single-language: short captions are mostly ja/ko/zh, so one sort of all pairs
    by length gives batches of one script, with one-language negatives and gradients. A pair's sort key is instead its
    length's quantile *within its language*, so a batch holds the k-th shortest slice of every language. Inside a batch
    pairs are sorted by length, so ranks taking every world-th position get alike lengths."""
    rng = np.random.default_rng([seed, epoch])
    steps = len(lengths) // batch_size
    order = rng.permutation(len(lengths))[: steps * batch_size]
    chunk = group * batch_size
    for start in range(0, len(order) if group > 1 else 0, chunk):
        part = order[start : start + chunk]
        key = np.empty(len(part))
        for lang in np.unique(langs[part]):
            where = np.flatnonzero(langs[part] == lang)
            rank = np.empty(len(where))
            rank[np.argsort(lengths[part[where]], kind="stable")] = np.arange(len(where))  # ties keep the shuffled order
            key[where] = (rank + 0.5) / len(where)
        order[start : start + chunk] = part[np.argsort(-key, kind="stable")]
    plan = order.reshape(steps, batch_size)
    plan = np.take_along_axis(plan, np.argsort(-lengths[plan], axis=1, kind="stable"), axis=1)
    return plan[rng.permutation(steps)]


def token_lengths(tokenizer, texts: pa.Array, max_length: int, chunk: int = 10_000) -> np.ndarray:
    """(P,) int32 token counts of the texts as the student reads them (special tokens included, cut at max_length)."""
    out = np.empty(len(texts), dtype=np.int32)
    for start in range(0, len(texts), chunk):
        ids = tokenizer(texts.slice(start, chunk).to_pylist(), truncation=True, max_length=max_length)["input_ids"]
        out[start : start + len(ids)] = [len(x) for x in ids]
    return out


class EpochSteps(torch.utils.data.Dataset):
    """Step k of an epoch -> this rank's micro-batches (tokenised, padded to their longest) and the global batch's targets.

    Rank r takes positions r, r + world, ... of the length-sorted global batch, so ranks get alike lengths; every rank gets
    all B targets because they are the InfoNCE negatives (fixed teacher vectors: the same as all_gathering them, minus the
    communication, and it covers accumulation micro-batches too).
    """

    def __init__(self, plan: np.ndarray, pairs: Pairs, targets: np.ndarray, layer_targets: list[np.ndarray], tokenizer,
                 max_length: int, rank: int, world_size: int, grad_accum: int):
        self.plan, self.pairs, self.targets, self.layer_targets = plan, pairs, targets, layer_targets
        self.tokenizer, self.max_length = tokenizer, max_length
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        index = self.plan[k]  # (B,) pair indices
        rows = self.pairs.rows[index]  # (B,)
        micro = []
        for pos in np.array_split(np.arange(self.rank, len(index), self.world_size), self.grad_accum):
            enc = self.tokenizer(self.pairs.texts.take(pa.array(index[pos])).to_pylist(), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            micro.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pos": torch.from_numpy(pos)})
        targets = torch.from_numpy(self.targets[rows].astype(np.float32))  # (B, D)
        same = losses.same_target(targets, torch.from_numpy(self.pairs.groups[index]))  # (B, B): never each other's negatives
        return {"rows": torch.from_numpy(rows), "targets": targets, "same": same,
                "layers": [torch.from_numpy(t[rows].astype(np.float32)) for t in self.layer_targets], "micro": micro}


# ---- model: what trains (student + temperature + layer-kd projections), one module so DDP syncs all of it ----


class Distiller(nn.Module):
    """The student, the InfoNCE temperature (log-parametrised) and the layer-kd projections (student hidden -> teacher hidden)."""

    def __init__(self, student: StudentEncoder, temperature: float, learn_temperature: bool, student_layers: tuple[int, ...] = (),
                 teacher_width: int = 0):
        super().__init__()
        self.student = student
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.student_layers = tuple(student_layers)
        self.layer_proj = nn.ModuleList(nn.Linear(student.hidden_size, teacher_width) for _ in self.student_layers)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Keep a learnt temperature at or above MIN_TEMPERATURE by clamping the parameter after each step, as open_clip
        clamps its logit scale: a clamp inside temperature() would have zero gradient below the floor, so a temperature
        that momentum carried past it could never come back."""
        if isinstance(self.log_temperature, nn.Parameter):
            self.log_temperature.clamp_(min=math.log(MIN_TEMPERATURE))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """input_ids, attention_mask (B, T) -> embedding (B, D), K projected layer states (B, H_teacher), temperature ()."""
        emb, hidden = self.student(input_ids, attention_mask, output_hidden_states=bool(self.student_layers))
        states = [proj(pool(hidden[layer], attention_mask, "mean")) for layer, proj in zip(self.student_layers, self.layer_proj)]
        return emb, states, self.temperature()


def param_groups(model: Distiller, weight_decay: float, embedding_lr_scale: float = 1.0) -> list[dict]:
    """Decay matrices only: biases, norm weights and the temperature are not pulled towards zero. The input-embedding
    matrix is a group of its own whose lr is `embedding_lr_scale` x lr (each row moves only on the steps its token is in
    a batch, so new tokens seen a handful of times learn little at the body's lr)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    emb = model.student.backbone.get_input_embeddings().weight
    groups = [{"params": [p for p in trainable if p.ndim >= 2 and p is not emb], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p is emb], "weight_decay": weight_decay, "lr_scale": embedding_lr_scale},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr, then linear/cosine decay to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    shape = 1 - progress if config.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (config.lr - floor) * shape


def _student(config: TrainConfig, cache, checkpoint: Path | None, train: Pairs) -> StudentEncoder:
    """The checkpoint's student on resume; else an exported mclip student to continue, or a fresh HF encoder + projection."""
    if checkpoint is not None or (Path(config.student) / META).exists():
        source = checkpoint or Path(config.student)
        student = load(source, trust_remote_code=config.trust_remote_code)
        if student.pooler != config.pooler and checkpoint is None:
            raise UserError(f"student {source} was exported with --pooler {student.pooler}; pass --pooler {student.pooler}")
    else:
        student = build_student(config.student, cache.dim, pooler=config.pooler, max_length=config.max_length,
                                trust_remote_code=config.trust_remote_code, projection_init=config.projection_init)
        if config.extend_vocab:
            # the new tokens come from the other languages only, and none may change how the English captions tokenise:
            # English keeps the teacher's own reading (a teacher-initialised student still equals the teacher at step 0)
            is_en = train.langs == (train.languages.index("en") if "en" in train.languages else -1)
            other = train.subset(~is_en)
            cache_text = cache.table(["text"]).column("text")
            english = cache_text.take(pa.array(other.rows)).to_pylist() if config.extend_vocab_init == "aligned" else None
            keep = cache_text.take(pa.array(np.unique(train.rows))).to_pylist()
            student.meta["added_tokens"] = len(extend_vocabulary(student, other.texts.to_pylist(), config.extend_vocab_words, english, keep))
    if student.dim != cache.dim:
        raise UserError(f"student {checkpoint or config.student} projects to {student.dim} dims but cache {config.cache} holds "
                        f"{cache.dim}-dim targets (teacher {cache.manifest['teacher']['name']}); use the cache it was trained on, or a fresh --student")
    pooler_head = getattr(student.backbone, "pooler", None)
    if isinstance(pooler_head, nn.Module):  # the HF pooler head (BERT, XLM-R) is not on mclip's path: frozen, DDP needs no unused grads
        pooler_head.requires_grad_(False)
    if config.freeze_embeddings:
        student.backbone.get_input_embeddings().weight.requires_grad_(False)
    return student


def _layer_plan(config: TrainConfig, cache, student: StudentEncoder) -> tuple[int, ...]:
    """The student layer distilled from each cached teacher layer; default: the same relative depth."""
    if not config.layer_kd:
        return ()
    if not cache.layers:
        raise UserError(f"--layer-kd needs teacher layer states but cache {config.cache} has none; rebuild it with "
                        "`mclip embed-teacher --cache-layers 4,8,12` (any teacher layers)")
    depth = int(cache.manifest["teacher"]["num_layers"])
    chosen = config.student_layers or tuple(max(1, round(t * student.num_layers / depth)) for t in cache.layers)
    if len(chosen) != len(cache.layers):
        raise UserError(f"--student-layers names {len(chosen)} layers but the cache holds {len(cache.layers)} "
                        f"(teacher layers {','.join(map(str, cache.layers))}); pass one student layer per teacher layer")
    if max(chosen) > student.num_layers:
        raise UserError(f"--student-layers {','.join(map(str, chosen))} exceed the student's {student.num_layers} layers")
    return tuple(chosen)


# ---- run folder, checkpoints, resume ----


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (step, folder), oldest first; temp folders of an interrupted save never match."""
    root = Path(out) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and (p / TRAINER_STATE).exists()] \
        if root.is_dir() else []
    return sorted(found)


def _check_out(config: TrainConfig, cache) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Refuse a non-empty run folder unless --resume or --overwrite; on resume check the run against the cache and the
    checkpoint against its checksums. Read-only: nothing is created or removed before the inputs have been checked
    (`_claim_out`). Returns the checkpoint to resume from and the damaged newer ones to set aside (folder, first problem)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(not lock.is_lock(p.name) for p in out.iterdir()) and not (config.resume or config.overwrite):
        raise UserError(f"--out {out} is not empty; pass --resume to continue the run in it, --overwrite to replace it, or choose another folder")
    found = checkpoints(out) if config.resume else []
    if not found:
        return None, []  # --resume with nothing to resume starts the run, so one command serves a first start and a restart
    saved_path = out / "config.json"
    if not saved_path.exists():
        raise UserError(f"{out} holds checkpoints but no config.json; restore it, or pass --overwrite to start over")
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    old, new = saved["train"], to_dict(config)
    defaults = {f.name: json.loads(json.dumps(f.default)) for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}  # a field newer than the run: its default
    if not new["student_layers"]:  # the default resolves the same way again; config.json holds the resolved layers
        new["student_layers"] = old.get("student_layers", [])
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k not in RUNTIME_FIELDS and old.get(k) != new[k]]
    if diff:
        raise UserError(f"{out} was trained with other arguments ({', '.join(diff)}); repeat them to resume, or pass --overwrite to start over")
    latest, damaged = _intact_checkpoint(found)
    dim = json.loads((latest / META).read_text(encoding="utf-8"))["dim"]
    if dim != cache.dim:
        raise UserError(f"checkpoint {latest} projects to {dim} dims but cache {config.cache} holds {cache.dim}-dim targets; "
                        "point --cache at the cache this run was trained on, or start a new run")
    was, now = saved["teacher"], cache.manifest["teacher"]
    if was["fingerprint"] != now["fingerprint"]:
        raise UserError(f"cache {config.cache} was made by teacher {now['name']} ({now['fingerprint'][:12]}) but this run trained on "
                        f"{was['name']} ({was['fingerprint'][:12]}); point --cache at the original cache, or --overwrite to start over")
    return latest, damaged


def _intact_checkpoint(found: list[tuple[int, Path]]) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint whose files match its checksums, and the damaged newer ones. Falling back is safe: the run
    resumes exactly from the older step (metrics after it are dropped) and the damaged folders are kept aside, not loaded."""
    damaged = []
    for _, folder in reversed(found):
        problems = verify.check_folder(folder)
        if not problems:
            return folder, damaged
        damaged.append((folder, problems[0]))
    newest, problem = damaged[0]
    raise UserError(f"checkpoint {newest} is damaged ({problem}) and no earlier checkpoint is intact; "
                    "restore the file, or pass --overwrite to start over")


def _claim_out(config: TrainConfig, damaged: list[tuple[Path, str]], resume_from: Path | None) -> None:
    """Make the run folder; --overwrite removes the files of the run it held (and nothing else), a killed save's temp folders
    go, damaged checkpoints are set aside (renamed, never deleted) so the run resumes from the last intact one."""
    out = Path(config.out)
    with writing(out, RESUME):
        if config.overwrite:
            for name in ARTEFACTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        for stale in [*(out / CHECKPOINTS).glob(".tmp-*"), *(out / CHECKPOINTS).glob(".old-*")]:  # a killed save's
            shutil.rmtree(stale)
        for folder, problem in damaged:
            aside = folder.with_name(folder.name + CORRUPT)
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            print(f"mclip: warning: checkpoint {folder} is damaged ({problem}); set aside as {aside.name}, resuming from "
                  f"{resume_from.name}", file=sys.stderr)


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain lists, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached": float(np_state[4])},
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def save_checkpoint(out: Path, step: int, model: Distiller, trainer: dict, keep_last: int) -> Path:
    """checkpoints/step-XXXXXXX/: the student (loads like final/) + trainer.pt + checksums.sha256; written to a temp folder,
    then renamed, so a checkpoint is whole or absent; a failed write leaves the earlier checkpoints as they were."""
    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    with writing(final, RESUME):
        try:
            model.student.save(tmp)
            torch.save(trainer, tmp / TRAINER_STATE)
            verify.write_checksums(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap(tmp, final)
        for _, old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old)
    return final


def _swap(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final`; an older `final` is moved aside first and deleted last."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _export(out: Path, model: Distiller) -> Path:
    final, tmp = out / "final", out / ".final.tmp"
    with writing(final, RESUME):
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.student.save(tmp)
            verify.write_checksums(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap(tmp, final)
    return final


def _append(path: Path, record: dict) -> None:
    with writing(path, RESUME), path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _load_trainer(folder: Path) -> dict:
    """trainer.pt as tensors and plain containers only (weights_only: a pickle that would run code is refused)."""
    path = folder / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = first_line(exc, 200)
        raise UserError(f"cannot load {path} ({first}); it is damaged or was not written by mclip: delete {folder} to resume from "
                        "the checkpoint before it, or pass --overwrite to start over") from None


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


# ---- evaluation and reporting ----


@torch.no_grad()
def evaluate(model: Distiller, val: Pairs, targets: np.ndarray, config: TrainConfig, normalized: bool = True) -> dict:
    """Validation loss (the distillation loss without layer-kd, in chunks of --batch-size) and R@1 of student(xx) -> teacher(en)
    per language, by exact search over the validation ids' teacher vectors; as in stage 3, identical English captions
    are one target, so retrieving the twin of a caption's English counts as a hit."""
    emb = torch.from_numpy(model.student.encode(val.texts.to_pylist(), batch_size=config.eval_batch_size, normalize=False))  # (V, D)
    own = torch.from_numpy(targets[val.rows].astype(np.float32))  # (V, D)
    groups = torch.from_numpy(val.groups)
    temperature = model.temperature().detach().cpu()
    total = 0.0
    for start in range(0, len(val), config.batch_size):
        chunk = slice(start, start + config.batch_size)
        n = len(own[chunk])
        parts = losses.distillation(emb[chunk], own[chunk], torch.arange(n), losses.same_target(own[chunk], groups[chunk]),
                                    config.loss, config.alpha, config.cl_base, temperature, normalized)
        total += float(losses.total(parts)) * n
    gallery_groups, first = np.unique(val.groups, return_index=True)  # one gallery entry per distinct English caption
    gallery = F.normalize(torch.from_numpy(targets[val.rows[first]].astype(np.float32)), dim=-1)  # (G, D)
    queries = F.normalize(emb, dim=-1)
    best = torch.cat([(queries[s : s + 4096] @ gallery.T).argmax(1) for s in range(0, len(queries), 4096)]).numpy()
    hit = gallery_groups[best] == val.groups
    result = {"val_loss": total / len(val)}
    for k, lang in enumerate(val.languages):
        if (val.langs == k).any():
            result[f"val_r1_{lang}"] = float(hit[val.langs == k].mean())
    return result


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Train loss, validation loss and R@1 per language against step (matplotlib's Agg canvas: no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    r1 = sorted({k for r in val for k in r if k.startswith("val_r1_")})
    fig = Figure(figsize=(11 if r1 else 6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if r1 else 1, 1)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        with_kd = any("layer_kd" in r for r in train)  # validation scores the distillation loss only
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss" + (" (no layer-kd)" if with_kd else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if r1:
        ax2 = fig.add_subplot(1, 2, 2)
        for key in r1:
            ax2.plot([r["step"] for r in val if key in r], [r[key] for r in val if key in r], "o-", label=key[len("val_r1_"):])
        ax2.set_xlabel("step")
        ax2.set_ylabel("R@1 student(xx) -> teacher(en)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def summary(result: TrainResult) -> str:
    val = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
    shown = ", ".join(f"{k[4:]} {v:.4f}" for k, v in val.items())
    return (f"train-student: {result.steps:,} steps on {result.join['train_pairs']:,} pairs, loss {result.metrics.get('loss', float('nan')):.4f}"
            f"{'; ' + shown if shown else ''}; {result.pairs_per_s:,.0f} pairs/s, {result.seconds:.1f}s; student at {result.final}")


# ---- the run ----


def run(config: TrainConfig) -> TrainResult:
    """Train the student; --resume continues from the latest checkpoint; under torchrun each global batch is split over ranks."""
    started = time.perf_counter()
    ctx, device = distributed.setup(config.device)
    with lock.hold(config.out, "train-student", ctx):
        return _run(config, ctx, device, started)


def _run(config: TrainConfig, ctx, device: torch.device, started: float) -> TrainResult:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out = Path(config.out)
    cache = shards.open_cache(config.cache)
    resume_from, damaged = distributed.main_only(ctx, lambda: _check_out(config, cache))
    if config.batch_size % (ctx.world_size * config.grad_accum):
        raise UserError(f"--batch-size {config.batch_size} must split evenly over {ctx.world_size} rank(s) x --grad-accum {config.grad_accum}")
    precision = distributed.resolve_precision(config.precision, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    torch.manual_seed(config.seed)  # the same init on every rank (DDP broadcasts rank 0's weights anyway)
    train, val, report = prepare_pairs(config, cache)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(train)} training pairs; lower it")
    total_steps = min(steps_per_epoch * config.epochs, config.max_steps or math.inf)
    student = _student(config, cache, resume_from, train)
    config = dataclasses.replace(config, student_layers=_layer_plan(config, cache, student))
    teacher = cache.manifest["teacher"]
    student.meta.update({"teacher": {k: teacher[k] for k in ("name", "fingerprint", "dim", "kind", "pooling")} |
                         {"normalized": cache.manifest["normalized"]}, "languages": report["languages"], "train": to_dict(config)})
    model = Distiller(student, config.temperature, config.loss == "cl" and not config.fixed_temperature, config.student_layers,
                      int(cache.manifest["layer_dim"] or 0)).to(device)
    targets = shards.to_numpy(cache.table(["embedding"]).column("embedding"), dtype=np.dtype(cache.manifest["dtype"]))  # (N, D)
    layer_targets = [shards.to_numpy(cache.table([c]).column(c), dtype=np.dtype(cache.manifest["dtype"]))
                     for c in (shards.layer_column(t) for t in (cache.layers if config.layer_kd else ()))]  # K x (N, H)
    # fused: one kernel over all parameters; on CPU it is ~6x faster than the per-tensor loop for a 22M-parameter student
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, config.embedding_lr_scale), lr=config.lr, betas=config.betas,
                                  fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lengths = token_lengths(student.tokenizer, train.texts, student.max_length) if config.group_batches > 1 else np.ones(len(train))
    normalized = bool(cache.manifest["normalized"])  # unit targets: the pointwise losses compare the normalised student

    digest = train.digest() + (val.digest() if val is not None else "")  # which pairs train and which validate
    step = 0
    if resume_from is not None:
        state = _load_trainer(resume_from)
        if state["train_pairs"] != len(train) or state.get("pairs_digest", digest) != digest:
            raise UserError(f"the training or validation pairs changed since the checkpoint ({state['train_pairs']:,} training pairs "
                            f"then, {len(train):,} now): --data, --val-data or --cache differ; resume with the same ones, or "
                            "--overwrite to start over")
        missing, unexpected = model.load_state_dict(state["extra"], strict=False)
        assert not unexpected and all(k.startswith("student.") for k in missing), f"trainer state mismatch: {unexpected} {missing}"
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # e.g. a checkpoint from an mclip version with other parameter groups
            raise UserError(f"the optimizer state in {resume_from} does not fit this run ({first_line(exc)}); "
                            "resume it with the mclip version that wrote it, or --overwrite to start over") from None
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        _set_rng_state(state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0])
    else:
        torch.manual_seed(config.seed + ctx.rank)  # dropout differs between ranks, as it would over a bigger batch
        np.random.seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        _claim_out(config, damaged, resume_from)
        with writing(out / "config.json", RESUME):
            shards.write_json(out / "config.json", {"mclip_version": __version__, "train": to_dict(config), "teacher": teacher,
                                                    "cache": {"dim": cache.dim, "rows": len(cache), "layers": cache.layers},
                                                    "world_size": ctx.world_size, "precision": precision, "total_steps": total_steps})
        with writing(out / "join.json", RESUME):
            shards.write_json(out / "join.json", report)
        kept = [line for line in (metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.exists() else [])
                if line.strip() and json.loads(line)["step"] <= step]  # records a killed run wrote after its last checkpoint go
        with writing(metrics_path, RESUME):
            shards.atomic_write_bytes(metrics_path, "".join(line + "\n" for line in kept).encode("utf-8"))
        if config.progress:
            langs = ", ".join(f"{lang} {report[lang]['pairs']:,}" for lang in report["languages"])
            lost = sum(report[lang].get("ids_without_target", 0) for lang in report["languages"])
            print(f"train-student: {len(train):,} training pairs ({langs}), {report['validation_ids']:,} validation ids, "
                  f"{lost:,} captions without a target (see {out / 'join.json'}); {total_steps:,} steps of {config.batch_size}"
                  f"{'; resuming at step ' + str(step) if step else ''}", file=sys.stderr)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ctx.enabled else model
    trainable = [p for p in model.parameters() if p.requires_grad]

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train-student", dynamic_ncols=True, file=sys.stderr,
               disable=not (config.progress and ctx.is_main))
    last: dict = {}
    last_val: dict = {}
    trained_pairs, train_seconds = 0, 0.0
    window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0  # window_wait: seconds blocked on the DataLoader
    window_parts = None  # sum of the loss parts over the window's steps: records hold the window's mean, not one batch's
    latest_checkpoint = resume_from
    epoch, epoch_step = divmod(step, steps_per_epoch)
    model.train()
    while step < total_steps:
        plan = plan_epoch(lengths, train.langs, config.batch_size, config.seed, epoch, config.group_batches)
        steps = EpochSteps(plan, train, targets, layer_targets, student.tokenizer, student.max_length, ctx.rank, ctx.world_size,
                           config.grad_accum)
        loader = torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(epoch_step, len(plan)), num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))
        fetch_start = time.perf_counter()  # the first fetch also pays for starting the workers
        for batch in loader:
            window_wait += time.perf_counter() - fetch_start
            if step >= total_steps:
                break
            lr = lr_at(step, config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            rows = batch["rows"].to(device)  # (B,) the global batch's ids
            batch_targets = batch["targets"].to(device)  # (B, D) its teacher vectors: own targets and negatives
            same = batch["same"].to(device)  # (B, B) True where two rows carry one target (same id or same caption)
            parts_sum: dict[str, torch.Tensor] = {}
            for i, micro in enumerate(batch["micro"]):
                pos = micro["pos"].to(device)  # (m,) this micro-batch's positions in the global batch
                sync = ddp.no_sync() if ctx.enabled and i < config.grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        emb, states, temperature = ddp(micro["input_ids"].to(device, non_blocking=True),
                                                       micro["attention_mask"].to(device, non_blocking=True))
                    parts = losses.distillation(emb, batch_targets, pos, same[pos], config.loss, config.alpha, config.cl_base,
                                                temperature, normalized)
                    if states:
                        parts |= losses.layer_kd(states, [t.to(device)[pos] for t in batch["layers"]], config.layer_kd_weight)
                    scaler.scale(losses.total(parts) / config.grad_accum).backward()
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + value.detach() / config.grad_accum
            reduced = _mean_over_ranks(torch.stack(list(parts_sum.values())))  # every rank sees the same numbers
            loss = float(reduced.sum())
            if not math.isfinite(loss):
                bar.close()
                where = f"the last good checkpoint is {latest_checkpoint}" if latest_checkpoint else "no checkpoint was written yet"
                raise UserError(f"loss is {loss} at step {step + 1} (epoch {epoch + 1}); stopped before applying it and {where}; "
                                f"lower --lr (now {config.lr:g}) or check the cache for non-finite targets, then rerun with --resume")
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad)) if config.clip_grad > 0 else None
            scaler.step(optimizer)
            scaler.update()
            model.clamp_temperature_()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch_step += 1
            window_steps += 1
            window_parts = reduced if window_parts is None else window_parts + reduced
            bar.update(1)

            if step % config.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                trained_pairs += window_steps * config.batch_size
                train_seconds += elapsed
                mean_parts = window_parts / window_steps
                last = {"kind": "train", "step": step, "epoch": epoch + epoch_step / steps_per_epoch, "lr": lr,
                        "loss": float(mean_parts.sum()), **{name: float(v) for name, v in zip(parts_sum, mean_parts)},
                        "temperature": float(model.temperature().detach()), "grad_norm": grad_norm,
                        "pairs_per_s": window_steps * config.batch_size / max(elapsed, 1e-9),
                        "data_wait": min(1.0, window_wait / max(elapsed, 1e-9))}  # share of the window spent waiting for batches
                bar.set_postfix(loss=f"{loss:.4f}", pairs_s=f"{last['pairs_per_s']:,.0f}", refresh=False)
                if ctx.is_main:
                    _append(metrics_path, last)
            if val is not None and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                if ctx.is_main:
                    last_val = {"kind": "val", "step": step, **evaluate(model, val, targets, config, normalized)}
                    _append(metrics_path, last_val)
                    model.train()
                distributed.barrier()
            if (config.save_every and step % config.save_every == 0) or step == total_steps:
                rng = distributed.all_gather_objects(_rng_state())
                if ctx.is_main:
                    trainer = {"format": "mclip-trainer", "step": step, "epoch": epoch, "epoch_step": epoch_step,
                               "steps_per_epoch": steps_per_epoch, "train_pairs": len(train), "pairs_digest": digest, "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "rng": rng, "teacher_fingerprint": teacher["fingerprint"],
                               "extra": {k: v for k, v in model.state_dict().items() if not k.startswith("student.")}}
                    latest_checkpoint = save_checkpoint(out, step, model, trainer, config.keep_last)
                distributed.barrier()
            if window_steps and (step % config.log_every == 0 or step == total_steps):
                window_start, window_steps, window_wait, window_parts = time.perf_counter(), 0, 0.0, None
            fetch_start = time.perf_counter()
        else:
            epoch, epoch_step = epoch + 1, 0
    bar.close()

    final = out / "final"
    if not last:  # nothing left to train (a finished run resumed): report what it recorded
        for record in map(json.loads, metrics_path.read_text(encoding="utf-8").splitlines() if metrics_path.exists() else []):
            (last if record["kind"] == "train" else last_val).update(record)
    metrics = {k: v for k, v in {**last, **last_val}.items() if k != "kind"}
    result = TrainResult(out, final, step, metrics, trained_pairs / train_seconds if train_seconds else 0.0,
                         time.perf_counter() - started, report)
    if ctx.is_main and (trained_pairs or not (final / META).exists()):  # a finished run resumed leaves its final/ as it was
        _export(out, model)
        if metrics_path.read_text(encoding="utf-8").strip():
            with writing(out / "curves.png", RESUME):
                plot_curves(metrics_path, out / "curves.png")
        with writing(out / "summary.json", RESUME):
            shards.write_json(out / "summary.json", {"final": str(final), "steps": step, "total_steps": total_steps,
                                                     "metrics": result.metrics, "pairs_per_s": result.pairs_per_s,
                                                     "seconds": result.seconds, "train_pairs": len(train), "world_size": ctx.world_size})
        if config.progress:
            print(summary(result), file=sys.stderr)
    distributed.barrier()
    return result
