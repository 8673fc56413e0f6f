"""Stage 2's run folder: refusing or claiming it, its records and curves, checkpoints (save, list, restore on resume),
final/.

    OUT/config.json  join.json  metrics.jsonl  curves.png  summary.json
    OUT/checkpoints/step-XXXXXXX/   a student folder + trainer.pt + checksums.sha256; the last --keep-last kept
    OUT/final/                      the exported student
    OUT/start.pt                    the student's step-0 weights, with --wise-ft < 1 (final/ mixes them back in)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from mclip import distributed
from mclip.config import TrainConfig
from mclip.errors import UserError, first_line, writing
from mclip.store import outputs, verify
from mclip.store.outputs import META

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
METRICS = "metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
START = "start.pt"
ARTEFACTS = (
    "config.json",
    METRICS,
    "curves.png",
    "join.json",
    "summary.json",
    CHECKPOINTS,
    "final",
    ".final.tmp",
    ".old-final",
    START,
)
RESUME = "rerun the same command with --resume to continue from the last checkpoint"  # after a failed write
CORRUPT = ".corrupt"  # suffix of a damaged checkpoint set aside on resume (kept for inspection, never loaded)


def is_finished(out: Path) -> bool:
    """Whether the run folder holds a finished run: its summary and final/."""
    return (Path(out) / "summary.json").exists() and (Path(out) / "final").is_dir()


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (step, folder), oldest first; temp folders of an interrupted save never match."""
    root = Path(out) / CHECKPOINTS
    found = (
        [
            (int(m.group(1)), p)
            for p in root.iterdir()
            if (m := CHECKPOINT_RE.match(p.name)) and (p / TRAINER_STATE).exists()
        ]
        if root.is_dir()
        else []
    )
    return sorted(found)


# ---- before the run: check, then claim ----


def check_out(config: TrainConfig, cache) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Refuse a non-empty run folder unless --resume or --overwrite; on resume check the run against the cache and the
    checkpoint against its checksums. Read-only: nothing is created or removed before the inputs have been checked
    (`claim`). Returns the checkpoint to resume from and the damaged newer ones to set aside (folder, first problem)."""
    out = Path(config.out)
    outputs.check(
        out,
        config.resume or config.overwrite,
        "; pass --resume to continue the run in it, --overwrite to replace it, or choose another folder",
    )
    found = checkpoints(out) if config.resume else []
    if not found:
        return (
            None,
            [],
        )  # --resume with nothing to resume starts the run, so one command serves a first start and a restart
    saved_path = out / "config.json"
    if not saved_path.exists():
        raise UserError(f"{out} holds checkpoints but no config.json; restore it, or pass --overwrite to start over")
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    old = saved["train"]
    defaults = {
        f.name: json.loads(json.dumps(f.default))
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING
    }
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}  # a field newer than the run: its default
    # the default student_layers resolves the same way again; config.json holds the resolved layers
    resolved = {} if config.student_layers else {"student_layers": old.get("student_layers", [])}
    diff = outputs.changed(old, config, **resolved)
    if diff:
        raise UserError(
            f"{out} was trained with other arguments ({', '.join(diff)}); repeat them to resume, or pass --overwrite to start over"
        )
    latest, damaged = _intact_checkpoint(found)
    dim = json.loads((latest / META).read_text(encoding="utf-8"))["dim"]
    if dim != cache.dim:
        raise UserError(
            f"checkpoint {latest} projects to {dim} dims but cache {config.cache} holds {cache.dim}-dim targets; "
            "point --cache at the cache this run was trained on, or start a new run"
        )
    was, now = saved["teacher"], cache.manifest["teacher"]
    if was["fingerprint"] != now["fingerprint"]:
        raise UserError(
            f"cache {config.cache} was made by teacher {now['name']} ({now['fingerprint'][:12]}) but this run trained on "
            f"{was['name']} ({was['fingerprint'][:12]}); point --cache at the original cache, or --overwrite to start over"
        )
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
    raise UserError(
        f"checkpoint {newest} is damaged ({problem}) and no earlier checkpoint is intact; "
        "restore the file, or pass --overwrite to start over"
    )


def claim(
    config: TrainConfig, damaged: list[tuple[Path, str]], resume_from: Path | None, record: dict, join: dict, step: int
) -> None:
    """Make the run folder this run's (rank 0, inputs checked): --overwrite removes the files of the run it held (and nothing
    else), a killed save's temp folders go, damaged checkpoints are set aside (renamed, never deleted) so the run resumes
    from the last intact one; then config.json (`record`) and join.json are written, and the metrics records a killed run
    wrote after its last checkpoint (`step`) are dropped, so each step is logged once."""
    out = Path(config.out)
    root = out / CHECKPOINTS
    previous = [out / name for name in ARTEFACTS] if config.overwrite else []
    outputs.claim(out, previous, RESUME)
    outputs.claim(root, [*root.glob(".tmp-*"), *root.glob(".old-*")], RESUME)  # a killed save's
    with writing(out, RESUME):
        for folder, problem in damaged:
            aside = folder.with_name(folder.name + CORRUPT)
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            print(
                f"mclip: warning: checkpoint {folder} is damaged ({problem}); set aside as {aside.name}, resuming from "
                f"{resume_from.name}",
                file=sys.stderr,
            )
    for name, data in (("config.json", record), ("join.json", join)):
        with writing(out / name, RESUME):
            outputs.write_json(out / name, data)
    lines = (out / METRICS).read_text(encoding="utf-8").splitlines() if (out / METRICS).exists() else []
    kept = [line for line in lines if (record := _record(line)) is not None and record["step"] <= step]
    with writing(out / METRICS, RESUME):
        outputs.atomic_write_bytes(out / METRICS, "".join(line + "\n" for line in kept).encode("utf-8"))


# ---- during the run: records and checkpoints ----


def _record(line: str) -> dict | None:
    """A metrics.jsonl line's record; None for a blank line or the cut last one of a run killed (or out of disk) while
    appending it: the steps after the last checkpoint are logged again by the resumed run."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def records(out: Path) -> list[dict]:
    """metrics.jsonl's train and val records, in order (none before the first)."""
    path = Path(out) / METRICS
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [record for line in lines if (record := _record(line)) is not None]


def log(out: Path, record: dict) -> None:
    path = Path(out) / METRICS
    with writing(path, RESUME), path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def trainer_state(
    model,
    optimizer,
    scaler,
    *,
    step: int,
    epoch: int,
    epoch_step: int,
    steps_per_epoch: int,
    train_pairs: int,
    pairs_digest: str,
    teacher_fingerprint: str,
) -> dict:
    """trainer.pt: what a resume needs besides the student's weights: the optimizer and scaler, the data position, every
    rank's RNG states, the temperature and layer-kd projections. A collective (it gathers the RNG states): every rank calls it."""
    rng = distributed.all_gather_objects(_rng_state())
    return {
        "format": "mclip-trainer",
        "step": step,
        "epoch": epoch,
        "epoch_step": epoch_step,
        "steps_per_epoch": steps_per_epoch,
        "train_pairs": train_pairs,
        "pairs_digest": pairs_digest,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "teacher_fingerprint": teacher_fingerprint,
        "extra": {k: v for k, v in model.state_dict().items() if not k.startswith("student.")},
    }


def save(out: Path, step: int, model, trainer: dict, keep_last: int) -> Path:
    """checkpoints/step-XXXXXXX/: the student (loads like final/) + trainer.pt + checksums.sha256, whole or absent; a
    failed write leaves the earlier checkpoints as they were. Older checkpoints beyond `keep_last` go."""
    root = Path(out) / CHECKPOINTS
    final = root / f"step-{step:07d}"

    def fill(tmp: Path) -> None:
        model.student.save(tmp)
        torch.save(trainer, tmp / TRAINER_STATE)
        verify.write_checksums(tmp)

    outputs.write_folder(final, root / f".tmp-step-{step:07d}-{os.getpid()}", fill, RESUME)
    with writing(final, RESUME):
        for _, old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old)
    return final


def restore(folder: Path, model, optimizer, scaler, train_pairs: int, digest: str, rank: int) -> int:
    """Load a checkpoint's trainer state into the model's extras (temperature, layer-kd projections; its student weights
    were loaded with the student), the optimizer, the scaler and this rank's RNGs; return its step. Refuses other pairs."""
    state = _load_trainer(folder)
    if state["train_pairs"] != train_pairs or state.get("pairs_digest", digest) != digest:
        raise UserError(
            f"the training or validation pairs changed since the checkpoint ({state['train_pairs']:,} training pairs "
            f"then, {train_pairs:,} now): --data, --val-data or --cache differ; resume with the same ones, or "
            "--overwrite to start over"
        )
    missing, unexpected = model.load_state_dict(state["extra"], strict=False)
    assert not unexpected and all(k.startswith("student.") for k in missing), (
        f"trainer state mismatch: {unexpected} {missing}"
    )
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. a checkpoint from an mclip version with other parameter groups
        raise UserError(
            f"the optimizer state in {folder} does not fit this run ({first_line(exc)}); "
            "resume it with the mclip version that wrote it, or --overwrite to start over"
        ) from None
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    return state["step"]


def _load_trainer(folder: Path) -> dict:
    """trainer.pt as tensors and plain containers only (weights_only: a pickle that would run code is refused)."""
    path = folder / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UserError(
            f"cannot load {path} ({first_line(exc, 200)}); it is damaged or was not written by mclip: delete {folder} to "
            "resume from the checkpoint before it, or pass --overwrite to start over"
        ) from None


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain lists, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))


def start_weights(out: Path, student, step: int, wise_ft: float) -> None:
    """WiSE-FT's other end: a fresh run writes the student's step-0 weights to OUT/start.pt; a resumed one checks, before
    any step, that they are there and fit the student."""
    path = Path(out) / START
    if step == 0:
        state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        with writing(path, RESUME), outputs.atomic_file(path) as tmp:
            torch.save(state, tmp)
    elif not path.is_file():
        raise UserError(
            f"--wise-ft {wise_ft:g} needs the run's step-0 weights {path}, which are gone; put the file back, or pass "
            "--overwrite to start over"
        )
    else:
        _load_start(path, student)


def _load_start(path: Path, student) -> dict:
    try:
        start = torch.load(path, map_location="cpu", weights_only=True)
        ours = student.state_dict()
        if not isinstance(start, dict) or any(
            k not in start or start[k].shape != v.shape for k, v in ours.items() if v.is_floating_point()
        ):
            raise RuntimeError("its tensors do not fit this run's student")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise UserError(
            f"cannot load the step-0 weights {path} ({first_line(exc, 200)}); it is damaged: put the file back, or "
            "pass --overwrite to start over"
        ) from None
    return start


@torch.no_grad()
def mix_start(out: Path, student, weight: float) -> None:
    """WiSE-FT (Wortsman et al. 2022), in place: every floating-point weight becomes weight x trained + (1 - weight) x step 0."""
    start = _load_start(Path(out) / START, student)
    for name, value in student.state_dict().items():
        if value.is_floating_point():
            value.mul_(weight).add_(start[name].to(value.device, value.dtype), alpha=1.0 - weight)


# ---- after the run ----


def finish(out: Path, model, summary: dict) -> None:
    """The end of a run: final/ (the trained student with its checksums, whole or absent: a previous final/ stays until
    the new one is in), curves.png from metrics.jsonl, and summary.json."""

    def fill(tmp: Path) -> None:
        model.student.save(tmp)
        verify.write_checksums(tmp)

    out = Path(out)
    outputs.write_folder(out / "final", out / ".final.tmp", fill, RESUME)
    if records(out):
        with writing(out / "curves.png", RESUME):
            plot_curves(out / METRICS, out / "curves.png")
    with writing(out / "summary.json", RESUME):
        outputs.write_json(out / "summary.json", summary)


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
        ax.plot(
            [r["step"] for r in val],
            [r["val_loss"] for r in val],
            "o-",
            label="validation loss" + (" (no layer-kd)" if with_kd else ""),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if r1:
        ax2 = fig.add_subplot(1, 2, 2)
        for key in r1:
            ax2.plot(
                [r["step"] for r in val if key in r],
                [r[key] for r in val if key in r],
                "o-",
                label=key[len("val_r1_") :],
            )
        ax2.set_xlabel("step")
        ax2.set_ylabel("R@1 student(xx) -> teacher(en)")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
