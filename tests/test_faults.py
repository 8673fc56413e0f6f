"""Faults: SIGKILL at random moments (stage 1 ten times, stage 2 at random steps), a full disk, an unwritable --out, two
runs on one folder, damaged checkpoints and shards. Each ends with one clear line or an exact resume; nothing is lost."""

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mclip.cli import main
from mclip.embed import dedup
from mclip.models.student import load
from mclip.store import lock, shards, verify
from mclip.train.checkpoint import checkpoints
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
TEMP_SHARD = re.compile(r"^\.shard-\d{5}\.arrow\..+\.tmp$")


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weights(final: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {
        **load_file(str(final / "model.safetensors")),
        **{f"dense.{k}": v for k, v in load_file(str(final / "2_Dense" / "model.safetensors")).items()},
    }


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def by_id(cache_dir: Path) -> tuple[list[str], np.ndarray]:
    cache = shards.open_cache(cache_dir)
    return cache.ids(), cache.embeddings()


def embed_args(data, out, teacher, *extra) -> list[str]:
    return [
        "embed-teacher",
        "--data",
        str(data),
        "--out",
        str(out),
        "--teacher",
        str(teacher),
        "--id-column",
        "id",
        "--dtype",
        "float32",
        "--no-progress",
        *extra,
    ]


# ---- a full disk, an unwritable --out ----


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_no_space_while_embedding_keeps_finished_shards(
    where, tmp_path, captions, clip_text_teacher, cli_error, monkeypatch
):
    out = tmp_path / "out"
    args = embed_args(captions, out, clip_text_teacher, "--shard-size", "4")
    real_shard, real_json, calls = shards.write_shard, shards.write_json, []

    def full_disk_shard(folder, index, table, stats):
        if Path(folder) != out:  # a unit of distinct captions, in .plan/parts
            return real_shard(folder, index, table, stats)
        calls.append(index)
        if len(calls) == 3:  # the third shard: half its bytes reach a temp file, then the disk is full
            (Path(folder) / f".{shards.shard_name(index)}.x.tmp").write_bytes(b"ARROW1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_shard(folder, index, table, stats)

    def full_disk_manifest(path, data):
        if data.get("complete"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_json(path, data)

    if where == "shard":
        monkeypatch.setattr(shards, "write_shard", full_disk_shard)
        failed = out / "shard-00002.arrow"
    else:
        monkeypatch.setattr(shards, "write_json", full_disk_manifest)
        failed = out / "manifest.json"
    assert (
        cli_error(args) == f"no space left on device writing {failed}; free space and rerun the same command to resume"
    )
    monkeypatch.undo()
    kept = [p for p in shards.shard_files(out)]
    assert [p.name for p in kept] == (
        ["shard-00000.arrow", "shard-00001.arrow"] if where == "shard" else [shards.shard_name(k) for k in range(5)]
    )
    assert all(shards.read_shard_stats(p) is not None for p in kept)  # every visible shard whole and loadable
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8"))["complete"] is False
    mtimes = {p.name: p.stat().st_mtime_ns for p in kept}
    main(args)  # the same command, with space again
    assert {p.name: p.stat().st_mtime_ns for p in kept} == mtimes  # what was written before is kept, not recomputed
    main(embed_args(captions, tmp_path / "ref", clip_text_teacher, "--shard-size", "4"))
    ids, emb = by_id(out)
    ref_ids, ref_emb = by_id(tmp_path / "ref")
    assert ids == ref_ids and np.array_equal(emb, ref_emb) and shards.open_cache(out).verify() == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_no_space_while_checkpointing_keeps_the_last_checkpoint(small_run, tmp_path, cli_error, monkeypatch):
    out = tmp_path / "run"
    args = ["train-student", *small_run["train_args"], "--out", str(out), "--max-steps", "6"]
    real_save, saves = torch.save, []

    def full_disk(obj, path, *a, **kw):
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint (step 4): a cut file, then the disk is full
            Path(path).write_bytes(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli_error(args) == (
        f"no space left on device writing {out / 'checkpoints' / 'step-0000004'}; free space and "
        "rerun the same command with --resume to continue from the last checkpoint"
    )
    monkeypatch.undo()
    assert [step for step, _ in checkpoints(out)] == [2] and not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000002"
    ]  # the cut save left nothing behind
    assert verify.check_folder(out / "checkpoints" / "step-0000002") == []
    assert load(out / "checkpoints" / "step-0000002").encode("ein Hund").shape == (24,)
    main(args + ["--resume"])
    main(["train-student", *small_run["train_args"], "--out", str(tmp_path / "reference"), "--max-steps", "6"])
    assert max_diff(weights(out / "final"), weights(tmp_path / "reference" / "final")) <= 1e-5


def _verb_argv(verb: str, small_run, out: Path) -> list[str]:
    s = small_run
    return {
        "embed-teacher": embed_args(s["data"], out, s["teacher"]),
        "train-student": ["train-student", *s["train_args"], "--out", str(out)],
        "eval-retrieval": [
            "eval-retrieval",
            "--model",
            str(s["run"]),
            "--cache",
            str(s["cache"]),
            "--data",
            str(s["data"]),
            "--languages",
            "de",
            "--split",
            "train",
            "--out",
            str(out),
            "--no-progress",
        ],
        "encode": [
            "encode",
            "--model",
            str(s["run"]),
            "--data",
            str(s["data"]),
            "--column",
            "caption_de",
            "--out",
            str(out),
            "--no-progress",
        ],
    }[verb]


@pytest.mark.parametrize("verb", ["embed-teacher", "train-student", "eval-retrieval", "encode"])
def test_an_output_path_under_a_file_is_one_line(verb, small_run, tmp_path, cli_error):
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    out = tmp_path / "file" / "out"
    assert cli_error(_verb_argv(verb, small_run, out)) == (
        f"cannot write {out}: part of that path is a file, not a folder; choose another --out"
    )
    assert (tmp_path / "file").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("verb", ["embed-teacher", "train-student", "eval-retrieval", "encode"])
def test_a_read_only_output_folder_is_one_line(verb, small_run, read_only_dir, cli_error):
    """On a read-only mount, which root cannot write either (chmod 555 skipped this test as root, as CI runs)."""
    out = read_only_dir / "out"
    assert cli_error(_verb_argv(verb, small_run, out)).startswith(
        f"permission denied writing {out / lock.LOCK_NAME} (Read-only file system)"
    )
    assert list(out.iterdir()) == []


# ---- damaged checkpoints and shards ----


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(small_run, tmp_path, capsys):
    run = shutil.copytree(small_run["run"], tmp_path / "run")
    damaged = run / "checkpoints" / "step-0000004"
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    main(["train-student", *small_run["train_args"], "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            f"mclip: warning: checkpoint {damaged} is damaged ({damaged / 'model.safetensors'}: checksum differs from "
            "checksums.sha256 (file corrupted or changed)); set aside as step-0000004.corrupt, resuming from step-0000002"
        )
    ]
    # steps 3 and 4 trained again from step 2 give exactly the weights the damaged checkpoint was meant to hold
    assert max_diff(weights(run / "final"), weights(small_run["run"] / "final")) <= 1e-5
    assert verify.check_folder(damaged) == [] and (run / "checkpoints" / "step-0000004.corrupt").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [
        4
    ]  # logged once (log_every 10 logs the last step only)


def test_a_cut_last_metrics_record_is_dropped_on_resume(small_run, tmp_path):
    """A run killed (or out of disk) while appending to metrics.jsonl leaves a cut last line; --resume drops it."""
    run = shutil.copytree(small_run["run"], tmp_path / "run")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"kind": "train", "step": 5, "lo')
    main(["train-student", *small_run["train_args"], "--out", str(run), "--resume"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [4] and (run / "final").is_dir()


def test_no_intact_checkpoint_is_one_line_naming_the_file(small_run, tmp_path, cli_error):
    run = shutil.copytree(small_run["run"], tmp_path / "run")
    for step in ("step-0000002", "step-0000004"):
        path = run / "checkpoints" / step / "trainer.pt"
        path.write_bytes(path.read_bytes()[:100])  # truncated
    before = snapshot(run)
    newest = run / "checkpoints" / "step-0000004"
    assert cli_error(["train-student", *small_run["train_args"], "--out", str(run), "--resume"]) == (
        f"checkpoint {newest} is damaged ({newest / 'trainer.pt'}: checksum differs from checksums.sha256 (file corrupted or "
        "changed)) and no earlier checkpoint is intact; restore the file, or pass --overwrite to start over"
    )
    assert snapshot(run) == before


def test_a_cut_cache_shard_is_refused_at_open_and_repaired_by_a_rerun(small_run, tmp_path, capsys, cli_error):
    cache = shutil.copytree(small_run["cache"], tmp_path / "cache")
    shard = cache / "shard-00002.arrow"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    expected = (
        f"teacher cache shard {shard} has {size // 2} bytes, not the {size} recorded in manifest.json (truncated or changed); "
        f"delete it and rerun the same `mclip embed-teacher` command to recompute it (`mclip verify {cache}` checks every file)"
    )
    args = list(small_run["train_args"])
    args[args.index("--cache") + 1] = str(cache)
    assert cli_error(["train-student", *args, "--out", str(tmp_path / "run")]) == expected
    assert (
        cli_error(
            [
                "eval-retrieval",
                "--model",
                str(small_run["run"]),
                "--cache",
                str(cache),
                "--data",
                str(small_run["data"]),
                "--languages",
                "de",
                "--split",
                "train",
                "--out",
                str(tmp_path / "eval"),
                "--no-progress",
            ]
        )
        == expected
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()
    capsys.readouterr()
    main(embed_args(small_run["data"], cache, small_run["teacher"], "--shard-size", "8"))  # the command that made it
    assert capsys.readouterr().err.startswith(f"mclip: warning: shard {shard} has {size // 2} bytes")
    ids, emb = by_id(cache)
    ref_ids, ref_emb = by_id(small_run["cache"])
    assert ids == ref_ids and np.array_equal(emb, ref_emb) and shards.open_cache(cache).verify() == []


def test_a_flipped_bit_inside_a_shard_passes_the_cheap_open_and_is_found_by_verify(small_run, tmp_path):
    cache = shutil.copytree(small_run["cache"], tmp_path / "cache")
    shard = cache / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert len(shards.open_cache(cache)) == 32  # open stays cheap: sizes, footers and row counts only
    result = verify.run(cache)
    assert result.problems == [f"{shard}: checksum differs from manifest.json (file corrupted or changed)"]


# ---- SIGKILL at random moments, in a chain of processes forked from a warm parent ----

# Each run is a fresh process killed with SIGKILL. They are forked from a parent that has already imported torch,
# transformers and datasets (and run nothing), so a restart costs milliseconds, not a five-second Python start-up.
ZYGOTE = r"""
import json, os, sys, traceback
import numpy, pyarrow, torch, transformers, datasets  # noqa: F401
import mclip.cli, mclip.embed.run, mclip.train.run  # noqa: F401
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModelWithProjection, BertModel  # noqa: F401
import transformers.models.clip.modeling_clip, transformers.models.bert.modeling_bert  # noqa: F401
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os.close(0)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
            code = 1
            try:
                mclip.cli.main(command["argv"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    else:
        _, status = os.waitpid(command["pid"], 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path) -> int:
        return self._ask({"op": "start", "argv": argv, "log": str(log)})["pid"]

    def wait(self, pid: int) -> dict:
        return self._ask({"op": "wait", "pid": pid})

    @staticmethod
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, IndexError):
            return False

    def close(self):
        self.proc.kill()  # every child has been waited for; skip the parent's slow interpreter shutdown
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def zygote():
    parent = Zygote()
    yield parent
    parent.close()


class Reader:
    """A reader polling the cache folder while it is written: every visible shard must read whole, the manifest parse."""

    def __init__(self, out: Path):
        self.out, self.seen, self.reads = out, {}, 0

    def look(self) -> int:
        for path in sorted(self.out.iterdir()) if self.out.is_dir() else []:
            if shards.SHARD_RE.match(path.name) and path.name not in self.seen:
                table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
                assert table.num_rows == json.loads(table.schema.metadata[b"mclip"])["rows"], (
                    f"partial shard {path.name} visible"
                )
                self.seen[path.name] = path.stat().st_mtime_ns
                self.reads += 1
            elif path.name == shards.MANIFEST:
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except FileNotFoundError:  # replaced between listing and opening: the next look reads the new one
                    pass
        return len(self.seen)


def _files_after_a_kill(out: Path) -> None:
    for path in out.iterdir():
        assert (
            path.name in (shards.MANIFEST, lock.LOCK_NAME, dedup.PLAN)
            or TEMP_SHARD.match(path.name)
            or (shards.SHARD_RE.match(path.name) and shards.read_shard_stats(path) is not None)
        ), path.name
    if (out / shards.MANIFEST).exists():  # absent when killed before every input was checked (nothing written yet)
        json.loads((out / shards.MANIFEST).read_text(encoding="utf-8"))


@pytest.mark.slow
def test_stage_one_killed_ten_times_at_random_moments_equals_an_uninterrupted_run(
    tmp_path, clip_text_teacher, zygote, cli_error
):
    n, size = 600, 4
    rows = [{"id": f"k{i}", "caption": f"{tiny.CORPUS[i % len(tiny.CORPUS)]} {i}"} for i in range(n)]
    data = tiny.write_captions(tmp_path / "rows.jsonl", rows)
    n_shards = n // size
    out, ref, log = tmp_path / "out", tmp_path / "ref", tmp_path / "log"

    # the uninterrupted run, which a second run on the same folder must not disturb
    started = time.monotonic()
    pid = zygote.start(
        embed_args(data, ref, clip_text_teacher, "--shard-size", str(size), "--max-batch-size", "1"), log
    )
    reader = Reader(ref)
    while reader.look() == 0:
        assert zygote.running(pid), log.read_text()
        time.sleep(0.002)  # the reader must not take the core the writer needs
    setup = time.monotonic() - started
    assert cli_error(
        embed_args(data, ref, clip_text_teacher, "--shard-size", str(size), "--max-batch-size", "1")
    ).startswith(f"--out {ref} is in use by mclip embed-teacher (pid {pid} on host ")
    assert zygote.wait(pid) == {"signal": None, "code": 0}, log.read_text()
    assert shards.open_cache(ref).verify() == []  # the first run, unharmed by the refused second one
    ref_ids, ref_emb = by_id(ref)

    rng = np.random.default_rng(7)
    edges = np.linspace(1, n_shards, 8).astype(int)  # seven shard counts, one drawn in each seventh of the run
    plan = [("shards", int(rng.integers(lo, hi))) for lo, hi in itertools.pairwise(edges)]
    for _ in range(2):  # two moments inside start-up (lock, manifest, data, teacher), anywhere in the chain
        plan.insert(int(rng.integers(0, len(plan) + 1)), ("seconds", float(rng.uniform(0.0, setup))))
    plan.append(("shards", n_shards))  # the last one once every shard is there: while the manifest is being finished
    args = embed_args(data, out, clip_text_teacher, "--shard-size", str(size), "--max-batch-size", "1")
    reader, outcomes = Reader(out), []
    for kind, target in plan:
        started = time.monotonic()
        pid = zygote.start(args, log)
        while zygote.running(pid):
            count = reader.look()
            if (kind == "seconds" and time.monotonic() - started >= target) or (kind == "shards" and count >= target):
                time.sleep(0.0 if kind == "seconds" or target == n_shards else float(rng.uniform(0.0, 0.02)))
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        outcomes.append(zygote.wait(pid))
        _files_after_a_kill(out)
    killed = [o == {"signal": signal.SIGKILL, "code": None} for o in outcomes]
    assert all(killed[:-1]), (outcomes, log.read_text()[-3000:])  # the last may win the race with its kill and finish
    assert outcomes[-1] in ({"signal": signal.SIGKILL, "code": None}, {"signal": None, "code": 0})
    assert 0 < len(reader.seen) <= n_shards

    pid = zygote.start(args, log)  # the same command once more, left to finish
    while zygote.running(pid):
        reader.look()
        time.sleep(0.002)
    assert zygote.wait(pid) == {"signal": None, "code": 0}, log.read_text()[-3000:]
    reader.look()
    assert {
        p.name: p.stat().st_mtime_ns for p in shards.shard_files(out)
    } == reader.seen  # no finished shard was rewritten
    ids, emb = by_id(out)
    assert ids == [r["id"] for r in rows] == ref_ids  # every id once, in order
    assert np.array_equal(emb, ref_emb) and shards.open_cache(out).verify() == []
    assert shards.open_cache(out).manifest["totals"] == shards.open_cache(ref).manifest["totals"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file, no lock left


@pytest.mark.slow
def test_stage_two_killed_at_random_steps_and_resumed_equals_an_uninterrupted_run(
    small_run, tmp_path, zygote, cli_error
):
    from mclip.config import EmbedConfig
    from mclip.embed.run import run as embed

    out, ref, log, cache = tmp_path / "run", tmp_path / "reference", tmp_path / "log", tmp_path / "cache"
    embed(
        EmbedConfig(
            data=str(small_run["data"]),
            out=str(cache),
            teacher=str(small_run["teacher"]),
            id_column="id",
            dtype="float32",
            cache_layers=(1, 2),
            progress=False,
        )
    )
    common = [
        "train-student",
        *small_run["train_args"],
        "--max-steps",
        "30",
        "--epochs",
        "5",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--loss",
        "cl",
        "--alpha",
        "0.5",
        "--layer-kd",
        "--cache",
        str(cache),
    ]  # the learnt temperature and projections resume too
    pid = zygote.start([*common, "--out", str(ref)], log)
    while not (ref / "metrics.jsonl").exists():
        assert zygote.running(pid), log.read_text()
        time.sleep(0.002)
    assert cli_error([*common, "--out", str(ref)]).startswith(
        f"--out {ref} is in use by mclip train-student (pid {pid}"
    )
    assert zygote.wait(pid) == {"signal": None, "code": 0}, log.read_text()[-3000:]

    def last_step(started_ns: int) -> int:
        path = out / "metrics.jsonl"
        try:
            if path.stat().st_mtime_ns < started_ns:  # still the killed run's file: this run trims it once it starts
                return 0
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)

    rng = np.random.default_rng(11)
    kills = sorted(int(s) for s in rng.choice(np.arange(2, 29), size=3, replace=False))
    for target in kills:
        started = time.time_ns()
        pid = zygote.start([*common, "--out", str(out), "--resume"], log)
        while zygote.running(pid) and last_step(started) < target:
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == {"signal": signal.SIGKILL, "code": None}, log.read_text()[-3000:]
        assert checkpoints(out) and all(verify.check_folder(folder) == [] for _, folder in checkpoints(out))
    pid = zygote.start([*common, "--out", str(out), "--resume"], log)
    assert zygote.wait(pid) == {"signal": None, "code": 0}, log.read_text()[-3000:]
    assert max_diff(weights(out / "final"), weights(ref / "final")) <= 1e-5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    reference = [json.loads(line) for line in (ref / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))  # each step logged once, whatever the kills cut
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    assert records[-1]["temperature"] == pytest.approx(reference[-1]["temperature"], abs=1e-6)
    assert verify.run(out).problems == []
    before = weights(out / "final")
    pid = zygote.start([*common, "--out", str(out), "--resume"], log)  # resuming a finished run changes nothing
    assert zygote.wait(pid) == {"signal": None, "code": 0} and max_diff(weights(out / "final"), before) == 0.0


# ---- a real full disk: a tmpfs filled at a chosen point (the write fails as the kernel makes it fail) ----


def _fill_before(monkeypatch, disk, module, name: str, when=lambda *args: True, left: int = 0) -> list:
    """Fill `disk` (leaving `left` bytes) just before the first call of module.name for which when(*args) holds; returns
    a list that holds True once it has."""
    real, done = getattr(module, name), []

    def filled_first(*args, **kwargs):
        if not done and when(*args):
            disk.fill(left)
            done.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, filled_first)
    return done


@pytest.mark.slow
@pytest.mark.parametrize("where", ["plan-rows", "plan-distinct", "part", "shard"])
def test_a_real_full_disk_in_stage_one_is_one_line_and_the_same_command_finishes(
    where, small_run, tmp_path, small_disk, cli_error, monkeypatch
):
    rows = [{"id": f"d{i:03d}", "caption": tiny.CORPUS[i % 9] + (f" {i}" if i % 3 else "")} for i in range(300)]
    data = tiny.write_captions(tmp_path / "rows.jsonl", rows)
    out = small_disk.path / "cache"
    args = embed_args(data, out, small_run["teacher"], "--shard-size", "16")
    main(embed_args(data, tmp_path / "ref", small_run["teacher"], "--shard-size", "16"))
    if where == "plan-rows":
        # group.bin and slot.bin, as the row buckets are read back: ndarray.tofile wrote nothing there and raised
        # nothing; plan.json followed once the buckets were deleted, and every rerun failed on the plan
        done = _fill_before(monkeypatch, small_disk, np, "fromfile", lambda path, *a: Path(path).parent.name == "rows")
    elif where == "plan-distinct":  # the plan's distinct captions and row buckets
        done = _fill_before(monkeypatch, small_disk, dedup, "_bucket_pass")
    elif where == "part":  # a unit of distinct captions, in .plan/parts
        done = _fill_before(monkeypatch, small_disk, shards, "write_shard", lambda folder, *a: Path(folder) != out)
    else:  # the third row shard
        calls = []
        done = _fill_before(
            monkeypatch,
            small_disk,
            shards,
            "write_shard",
            lambda f, i, *a: Path(f) == out and calls.append(i) is None and len(calls) == 3,
        )
    line = cli_error(args)
    assert done and line.startswith(f"no space left on device writing {out}"), line
    assert "; free space and rerun the same command" in line, line
    monkeypatch.undo()
    small_disk.free()
    main(args)  # the same command, with space again
    ids, emb = by_id(out)
    ref_ids, ref_emb = by_id(tmp_path / "ref")
    assert ids == ref_ids and np.array_equal(emb, ref_emb) and shards.open_cache(out).verify() == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights", "trainer", "final"])
def test_a_real_full_disk_in_training_keeps_the_last_checkpoint_and_resume_finishes(
    where, small_run, tmp_path, small_disk, cli_error, monkeypatch
):
    from mclip.train import checkpoint

    out = small_disk.path / "run"
    args = ["train-student", *small_run["train_args"], "--out", str(out), "--max-steps", "6"]
    step4 = lambda o, step, *a: step == 4  # noqa: E731
    if where == "weights":  # the checkpoint of step 4: its student's safetensors (SafetensorError: I/O error)
        done = _fill_before(monkeypatch, small_disk, checkpoint, "save", step4)
    elif where == "trainer":  # its trainer.pt (torch.save: RuntimeError ... unexpected pos)
        done = _fill_before(monkeypatch, small_disk, torch, "save", lambda obj, path, *a: "step-0000004" in str(path))
    else:
        done = _fill_before(monkeypatch, small_disk, checkpoint, "finish")
    line = cli_error(args)
    assert done and line.startswith("no space left on device"), line
    assert "--resume" in line, line
    monkeypatch.undo()
    kept = [step for step, _ in checkpoints(out)]
    assert kept[-1] == (6 if where == "final" else 2) and not (out / "final").exists()
    assert all(verify.check_folder(folder) == [] for _, folder in checkpoints(out))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written save left
    small_disk.free()
    main(args + ["--resume"])
    main(["train-student", *small_run["train_args"], "--out", str(tmp_path / "reference"), "--max-steps", "6"])
    assert max_diff(weights(out / "final"), weights(tmp_path / "reference" / "final")) <= 1e-5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [6]  # log_every 10 logs the last step only, once


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["eval-retrieval", "encode"])
def test_a_real_full_disk_in_eval_and_encode_is_one_line_and_the_command_it_names_finishes(
    verb, small_run, tmp_path, small_disk, cli_error, monkeypatch
):
    out = small_disk.path / "out"
    args = _verb_argv(verb, small_run, out)
    if verb == "eval-retrieval":  # its on-disk scratch arrays
        from mclip.store import join

        done = _fill_before(monkeypatch, small_disk, join.IdIndex, "build")
    else:  # the second Arrow file
        calls = []
        args += ["--shard-size", "8", "--npy"]
        done = _fill_before(
            monkeypatch, small_disk, shards, "write_shard", lambda *a: calls.append(1) or len(calls) == 2
        )
    line = cli_error(args)
    assert done and line.startswith("no space left on device"), line
    monkeypatch.undo()
    small_disk.free()
    main(args + (["--overwrite"] if "--overwrite" in line else []))  # the command the line names
    assert (out / ("metrics.json" if verb == "eval-retrieval" else "encode.json")).is_file()
