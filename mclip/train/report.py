"""Live curves: every record train-student writes to metrics.jsonl, also sent to TensorBoard (OUT/tensorboard) and/or
Weights & Biases (`--report-to`), from rank 0 only, with the same values.

A resumed run continues the same curves: TensorBoard drops what the killed run logged after the checkpoint the run
resumes from (`SummaryWriter(purge_step=)`, as metrics.jsonl drops those records), and wandb continues the same run id.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import sys
import time
from pathlib import Path

from mclip.errors import UserError

TENSORBOARD = "tensorboard"  # OUT/tensorboard: the event files (`tensorboard --logdir OUT/tensorboard`)
WANDB = "wandb"  # OUT/wandb: wandb.init(dir=OUT) writes its files there; mclip keeps the run id beside them
WANDB_ID = "mclip-run-id"
EXTRAS = {TENSORBOARD: ("tensorboard", "tensorboard"), WANDB: ("wandb", "wandb")}  # backend -> (module, mclip extra)
EVENTS = "events.out.tfevents."  # how every TensorBoard event file's name starts


def check_installed(report_to: tuple[str, ...]) -> None:
    """Refuse, before anything is written, a backend whose package is not installed (one line naming the extra)."""
    for backend in report_to:
        if backend in EXTRAS and importlib.util.find_spec(EXTRAS[backend][0]) is None:
            module, extra = EXTRAS[backend]
            raise UserError(
                f"--report-to {backend} needs the {module} package, which is not installed; run "
                f"`pip install 'mclip[{extra}]'`, or leave {backend} out of --report-to"
            )


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as curve name -> value: train/<key> for a train record, val/<key> for a validation
    (val/r1_de is val_r1_de), wise_ft/<key> for the validation of the WiSE-FT mix at the end. `step` is the x axis;
    a value that is not a number (grad_norm without clipping is None) draws no point."""
    group = "wise_ft" if "wise_ft" in record else record["kind"]
    return {
        f"{group}/{key.removeprefix('val_')}": float(value)
        for key, value in record.items()
        if key not in ("kind", "step", "wise_ft") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class Reporter:
    """Sends each record to the backends of `report_to` (none: nothing). Opened by rank 0 after the run folder is
    claimed; the writers start with the first record, so a resumed run with nothing left to do adds no file."""

    def __init__(self, out: Path, report_to: tuple[str, ...], step: int, config: dict):
        self.out, self.step, self.config = Path(out), step, config
        self.backends = [b for b in report_to if b != "none"]
        self.writer = None  # torch's SummaryWriter
        self.run = None  # wandb's run

    def log(self, record: dict) -> None:
        if not self.backends:
            return
        values = scalars(record)
        if TENSORBOARD in self.backends:
            self.writer = self.writer or _summary_writer(self.out / TENSORBOARD, self.step)
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()  # on disk before the checkpoint that follows it: a kill loses nothing a resume keeps
        if WANDB in self.backends:
            self.run = self.run or _wandb_run(self.out, self.config)
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
        self.writer = self.run = None


def _summary_writer(folder: Path, step: int):
    """A SummaryWriter appending a new event file to `folder`. When event files are there already (a run resumed at
    `step`), its purge_step makes TensorBoard drop every earlier point at a later step: the killed run's last points,
    which this run logs again."""
    from torch.utils.tensorboard import SummaryWriter

    earlier = sorted(folder.glob(EVENTS + "*")) if folder.is_dir() else []
    if earlier:
        # TensorBoard reads a folder's event files in name order, and a name starts with the second it was made in:
        # a file made in the same second as the killed run's could sort before it, and its purge would come too early
        latest = max(int(path.name[len(EVENTS) :].split(".")[0]) for path in earlier)
        while int(time.time()) <= latest:
            time.sleep(0.05)
    return SummaryWriter(str(folder), purge_step=step + 1 if earlier else None)


def _wandb_run(out: Path, config: dict):
    """wandb.init into OUT/wandb with the run id kept there, so a resumed run logs into the same run (resume="allow");
    WANDB_MODE (online, offline, disabled), WANDB_PROJECT (default mclip) and the rest of wandb's environment apply."""
    import wandb

    folder = out / WANDB
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / WANDB_ID
    run_id = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # wandb's kind of id: 8 lowercase letters and digits
        path.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "mclip"),
        name=out.name,
        dir=str(out),
        id=run_id,
        resume="allow",
        config=config,
        settings=wandb.Settings(console="off", silent=not sys.stderr.isatty()),
    )
