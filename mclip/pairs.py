"""Stage 2's data: (caption, cached teacher target) pairs joined by id, the validation split by id, and the epoch plan
(seeded, length-grouped batches that every rank and a resumed run cut the same way)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mclip import losses
from mclip.config import TrainConfig
from mclip.errors import UserError


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


def text_groups(cache_texts: pa.Array) -> np.ndarray:
    """(N,) int64 per cache row: equal where two rows hold the same English caption."""
    return pc.dictionary_encode(cache_texts).indices.to_numpy(zero_copy_only=False).astype(np.int64)


def join_pairs(parallel, languages: list[str], cache_ids: list[str], cache_texts: pa.Array,
               text_group: np.ndarray | None = None) -> tuple[Pairs, dict]:
    """One pair per (id, language) with text and a target; "en" pairs take the cache's own text (what the teacher embedded)
    for every id that joined in another language. Ids without a target and targets without text are counted, never shifted.
    text_group: `text_groups(cache_texts)`, when the caller joins more than one file against the same cache."""
    row_of = {cid: r for r, cid in enumerate(cache_ids)}
    texts, rows, langs, report, joined = [], [], [], {}, []
    for k, lang in enumerate(languages):
        if lang == "en":
            continue
        lang_texts, lang_rows, lost = parallel.join(lang, row_of)
        texts += lang_texts
        rows.append(lang_rows)
        langs.append(np.full(len(lang_rows), k, dtype=np.int64))
        joined.append(lang_rows)
        report[lang] = {"pairs": len(lang_rows), "empty_texts": int(parallel.missing.get(lang, 0)),
                        "ids_without_target": len(lost), "targets_without_text": len(cache_ids) - len(np.unique(lang_rows)),
                        "examples_without_target": lost[:20]}
    if "en" in languages:
        en_rows = np.unique(np.concatenate(joined)) if joined else np.zeros(0, np.int64)
        texts += cache_texts.take(pa.array(en_rows)).to_pylist()
        rows.append(en_rows)
        langs.append(np.full(len(en_rows), languages.index("en"), dtype=np.int64))
        report["en"] = {"pairs": len(en_rows), "source": "cache text", "targets_without_text": len(cache_ids) - len(en_rows)}
    rows = np.concatenate(rows)
    text_group = text_groups(cache_texts) if text_group is None else text_group
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
    text_group = text_groups(cache_texts)  # once, for the training and the validation file

    def load_join(data: str, split: str) -> tuple[Pairs, dict]:
        parallel = load_parallel(data, split, [lang for lang in languages if lang != "en"], id_column=config.id_column,
                                 text_column_template=config.text_column_template, english=False)
        pairs, report = join_pairs(parallel, languages, cache_ids, cache_texts, text_group)
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
