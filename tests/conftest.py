"""Shared fixtures: tiny teachers and students saved once per session and loaded through from_pretrained."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
# One torch thread: tiny models gain nothing from more, and on a busy 2-core machine OpenMP threads that wait on
# each other made a tiny forward pass 15x slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests import tiny  # noqa: E402


@pytest.fixture
def cli_error(capsys):
    """Run the CLI in-process on argv, which must fail as a user error: exit code 2 and one stderr line
    `mclip: error: ...`, no traceback. Returns the message after `mclip: error: `."""
    from mclip.cli import main

    def fails(argv: list[str]) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2, err
        assert err.startswith("mclip: error: ") and "\n" not in err and "Traceback" not in err, err
        return err[len("mclip: error: ") :]

    return fails


@pytest.fixture(scope="session")
def clip_teacher(tmp_path_factory):
    """Tiny CLIPModel (text + vision towers) with a CLIP-format tokenizer."""
    return tiny.write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def clip_text_teacher(tmp_path_factory):
    """Tiny CLIPTextModelWithProjection (text tower only)."""
    return tiny.write_tiny_clip(tmp_path_factory.mktemp("clip_text"), with_vision=False)


@pytest.fixture(scope="session")
def bert_teacher(tmp_path_factory):
    """Tiny BERT encoder: a sentence-encoder style teacher (mean pooled)."""
    return tiny.write_tiny_bert(tmp_path_factory.mktemp("bert"), hidden=24, seed=1)


@pytest.fixture(scope="session")
def bert_student(tmp_path_factory):
    """Tiny BERT used as the multilingual student backbone."""
    return tiny.write_tiny_bert(tmp_path_factory.mktemp("student"), hidden=32, seed=2)


@pytest.fixture
def captions(tmp_path):
    """Twenty English captions with ids, as JSON lines."""
    rows = [{"id": f"c{i:03d}", "caption": tiny.CORPUS[i % len(tiny.CORPUS)] + f" number {i}"} for i in range(20)]
    return tiny.write_captions(tmp_path / "captions.jsonl", rows)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, bert_teacher):
    """A small finished pipeline to copy from (never to change): parallel captions, a tiny student without dropout, a
    teacher cache in 4 shards and a finished train-student run with checkpoints at steps 2 and 4 and final/."""
    import json

    from mclip.config import EmbedConfig, TrainConfig
    from mclip.embed.run import run as embed
    from mclip.train.run import run as train

    root = tmp_path_factory.mktemp("small_run")
    rows = tiny.parallel_rows()
    data = tiny.write_captions(root / "parallel.jsonl", rows)
    student = tiny.write_tiny_bert(
        root / "student", hidden=32, seed=2, corpus=[r[k] for r in rows for k in r if k != "id"]
    )
    config = json.loads((student / "config.json").read_text(encoding="utf-8"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # runs compare exactly across processes
    (student / "config.json").write_text(json.dumps(config), encoding="utf-8")
    embed(
        EmbedConfig(
            data=str(data),
            out=str(root / "cache"),
            teacher=str(bert_teacher),
            id_column="id",
            dtype="float32",
            shard_size=8,
            progress=False,
        )
    )
    train_args = [
        "--data",
        str(data),
        "--cache",
        str(root / "cache"),
        "--student",
        str(student),
        "--languages",
        "de,zh",
        "--batch-size",
        "16",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "2e-3",
        "--num-workers",
        "0",
        "--no-progress",
        "--num-threads",
        "1",
    ]
    train(
        TrainConfig(
            data=str(data),
            cache=str(root / "cache"),
            out=str(root / "run"),
            student=str(student),
            languages=("de", "zh"),
            batch_size=16,
            max_steps=4,
            save_every=2,
            warmup_steps=1,
            lr=2e-3,
            num_workers=0,
            progress=False,
            num_threads=1,
        )
    )
    return {
        "root": root,
        "rows": rows,
        "data": data,
        "student": student,
        "cache": root / "cache",
        "run": root / "run",
        "teacher": bert_teacher,
        "train_args": train_args,
    }


class SmallDisk:
    """A real filesystem that fills up: a tmpfs of `size` bytes at `path`. `fill(left)` leaves about `left` bytes free
    (a ballast file written until the kernel says ENOSPC, then cut back by `left`); `free()` gives the space back."""

    def __init__(self, path, size: int):
        self.path, self.size = path, size
        self.ballast = path / ".ballast"

    def fill(self, left: int = 0) -> None:
        import errno

        with open(self.ballast, "ab", buffering=0) as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 20))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        os.truncate(self.ballast, max(0, self.ballast.stat().st_size - left))

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs mounted at tmp_path/disk for the test (as root, which CI runs as), unmounted after; skipped with
    the reason where mounting is not permitted."""
    import subprocess

    path = tmp_path / "disk"
    path.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True, check=False
    )
    if mount.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs for a real full disk ({mount.stderr.strip() or mount.returncode}); run as root"
        )
    try:
        yield SmallDisk(path, 64 << 20)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one may write into, root included (CI runs as root, who ignores chmod): a read-only tmpfs mounted at
    tmp_path/ro for the test, holding an empty folder `out`; skipped with the reason where mounting is not permitted."""
    import subprocess

    path = tmp_path / "ro"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs ({mounted.stderr.strip() or mounted.returncode}); run as root")
    try:
        (path / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run several times faster on one thread than on two contended ones (use at module scope)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
