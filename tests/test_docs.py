"""The README and docs/*.md are tested: every command they show must run as written.

Checked in every ```bash block of README.md and docs/*.md (backslash continuations joined, comments dropped):
- `mclip VERB ...` (also `python -m mclip` and `torchrun ... -m mclip`): VERB is a real command and every `--option`
  after it is one of VERB's options (read from the typer app, no subprocess); `--set section.key=value` names a field of
  that section's config;
- `python tests/bench/SCRIPT.py --option`: the script declares the option (as the string "--option" in its source or in
  tests/bench/common.py).
Checked on every page: each repository path it names (a token starting with mclip/, tests/, pipelines/, data/, docs/
or .ci/, in a bash block or an inline code span; globs allowed) exists; each relative markdown link resolves to a file,
and its #anchor to a heading of that file; the README links every docs/ page; docs/design.md's layout names every module
of mclip/ and no other.

Executed: a ```bash or ```python block whose previous non-blank line is `<!-- test: run -->`. The blocks of one page run
in order in one fresh folder that holds a tiny finished run under the names the pages use (`runs/cc3m-zh-xlmr-base`
with checkpoints and final/, its cache at `caches/cc3m-vitb16`, the captions it was made from as
`cc3m-zh/train.parquet` and `cc3m-zh/test.parquet`, and `queries_zh.txt`): bash blocks with `bash -e`,
Python blocks in a fresh interpreter, both importing this checkout's mclip. Mark only blocks that need no model hub.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TAG = "<!-- test: run -->"
REPO_DIRS = ("mclip/", "tests/", "pipelines/", "data/", "docs/", ".ci/")
SEPARATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    run: bool


def blocks(page: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a markdown page, each marked `run` when the tag line precedes it."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).splitlines()
    found, i = [], 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        found.append(Block(page, start + 1, match.group(1), "\n".join(body), before == RUN_TAG))
        i += 1
    return found


def commands(script: str) -> list[list[str]]:
    """A bash block as simple commands (token lists): continuations joined, comments dropped, split at && ; | &."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                out.append(current) if current else None
                current = []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out


@lru_cache(maxsize=None)
def cli_options() -> tuple[set[str], dict[str, set[str]]]:
    """The root options and, per verb, every option spelling (--x, --no-x) of the mclip CLI, from the typer app."""
    import typer.main

    from mclip.cli import app

    group = typer.main.get_command(app)

    def spellings(command) -> set[str]:
        names = {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("-")}
        return names | {"--help"}

    return spellings(group), {name: spellings(command) for name, command in group.commands.items()}


@lru_cache(maxsize=None)
def pipeline_keys() -> dict[str, set[str]]:
    from mclip.pipeline import SECTIONS

    return {section: {f.name for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()}


def check_mclip(tokens: list[str]) -> list[str]:
    """Problems with one `mclip ...` command (tokens after `mclip`)."""
    root, verbs = cli_options()
    problems, i = [], 0
    while i < len(tokens) and tokens[i].startswith("-"):
        if tokens[i] not in root:
            problems.append(f"mclip has no root option {tokens[i]}")
        i += 1
    if i == len(tokens):
        return problems
    verb, rest = tokens[i], tokens[i + 1 :]
    if verb not in verbs:
        return problems + [f"mclip has no command {verb!r} (it has {', '.join(sorted(verbs))})"]
    for j, token in enumerate(rest):
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name not in verbs[verb]:
            problems.append(f"mclip {verb} has no option {name}")
        if name == "--set" and verb == "run" and j + 1 < len(rest):
            key = rest[j + 1].split("=", 1)[0]
            section, _, leaf = key.rpartition(".")
            fields = pipeline_keys().get(section, set()) if section else {"name", "out"}
            if leaf not in fields:
                problems.append(f"mclip run --set {key}: [{section}] has no key {leaf!r}")
    return problems


def check_bench(script: Path, tokens: list[str]) -> list[str]:
    """Problems with `python tests/bench/SCRIPT.py ...`: every --option must be declared by the script."""
    source = script.read_text(encoding="utf-8") + (ROOT / "tests" / "bench" / "common.py").read_text(encoding="utf-8")
    return [
        f"{script.relative_to(ROOT)} declares no option {t.split('=', 1)[0]}"
        for t in tokens
        if t.startswith("--") and f'"{t.split("=", 1)[0]}"' not in source
    ]


def check_command(tokens: list[str]) -> list[str]:
    for i, token in enumerate(tokens):
        if token == "mclip" and (i == 0 or tokens[i - 1] == "-m"):
            return check_mclip(tokens[i + 1 :])
        if token.startswith("tests/bench/") and token.endswith(".py") and (ROOT / token).is_file():
            return check_bench(ROOT / token, tokens[i + 1 :])
    return []


def repo_paths(text: str) -> set[str]:
    """Tokens that name a file or folder of this repository: in bash blocks and in inline code spans."""
    candidates = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        candidates += [t for command in commands(block) for t in command]
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
        candidates += span.split()
    return {
        c.rstrip(".,:;)").strip("'\"")
        for c in candidates
        if c.strip("'\"").startswith(REPO_DIRS) and not re.search(r"[<>{}$]", c)
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"\w+://", t)]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- every page: commands, paths, links ----


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_exist(page):
    problems = [
        f"{page_id(page)}:{block.line}: {p}"
        for block in blocks(page)
        if block.lang == "bash"
        for command in commands(block.text)
        for p in check_command(command)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_paths_exist(page):
    missing = [p for p in sorted(repo_paths(page.read_text(encoding="utf-8"))) if not list(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{page_id(page)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_resolve(page):
    broken = []
    for link in links(page):
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.name}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in links(ROOT / "README.md")}
    unlinked = [page_id(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"
    assert len(PAGES) > 5, "docs/ lost its pages"


def test_readme_is_a_door():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 300


def test_checks_catch_mistakes():
    """The checkers themselves: a misspelt option, an unknown verb or key, a missing path and a bad anchor are found."""
    page = "```bash\nmclip train-student --data x --batchsize 4 \\\n  --lr 1e-4\nmclip trian --out y\n```\n"
    found = [p for b in blocks(ROOT / "x.md", page) for c in commands(b.text) for p in check_command(c)]
    assert found == ["mclip train-student has no option --batchsize", found[1]] and "'trian'" in found[1], found
    assert check_mclip(["run", "pipelines/demo.toml", "--set", "train.warmup_step=3"]) == [
        "mclip run --set train.warmup_step: [train] has no key 'warmup_step'"
    ]
    assert check_mclip(["run", "pipelines/demo.toml", "--set", "train.warmup_steps=3"]) == []
    assert check_command(["python", "tests/bench/bench_scale.py", "--out", "x", "--quik"]) == [
        "tests/bench/bench_scale.py declares no option --quik"
    ]
    assert repo_paths("see `pipelines/nope.toml` and\n```bash\nmclip run pipelines/demo.toml\n```\n") == {
        "pipelines/nope.toml",
        "pipelines/demo.toml",
    }
    assert slug("WiSE-FT: `--wise-ft w`") == "wise-ft---wise-ft-w"
    assert [b.run for b in blocks(ROOT / "x.md", f"{RUN_TAG}\n```bash\nmclip --help\n```\n```bash\nls\n```\n")] == [
        True,
        False,
    ]


# ---- the blocks marked to run ----

RUNNABLE = [page for page in PAGES if any(block.run for block in blocks(page))]


@pytest.fixture
def workspace(tmp_path, small_run):
    """A folder holding a tiny finished run under the names the pages use."""
    shutil.copytree(small_run["run"], tmp_path / "runs" / "cc3m-zh-xlmr-base")
    shutil.copytree(small_run["cache"], tmp_path / "caches" / "cc3m-vitb16")
    (tmp_path / "queries_zh.txt").write_text("一只狗在草地上奔跑\n\nein Hund im Park\n", encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "cc3m-zh").mkdir()
    rows = small_run["rows"]  # the captions the cache was made from: id, caption, caption_de, caption_zh
    pq.write_table(pa.Table.from_pylist(rows[:24]), tmp_path / "cc3m-zh" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[24:]), tmp_path / "cc3m-zh" / "test.parquet")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_marked_blocks_run(page, workspace):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for block in (b for b in blocks(page) if b.run):
        assert block.lang in ("bash", "python"), f"{page_id(page)}:{block.line}: cannot run a {block.lang!r} block"
        argv = ["bash", "-e", "-c", block.text] if block.lang == "bash" else [sys.executable, "-c", block.text]
        done = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{page_id(page)}:{block.line} failed ({done.returncode}):\n{done.stderr[-3000:]}"


def test_runnable_blocks_exist():
    """The README's own examples stay executed: its eval-retrieval, encode, export and verify blocks and mclip.load."""
    readme = [b for b in blocks(ROOT / "README.md") if b.run]
    text = "\n".join(b.text for b in readme)
    for needed in ("mclip verify", "mclip encode", "mclip export", "mclip eval-retrieval", "mclip.load("):
        assert needed in text, f"README.md has no runnable block with {needed!r}"


def design_modules() -> set[str]:
    """The modules docs/design.md's layout lists under mclip/: `name.py` at the top, `pkg/name.py` inside a package."""
    block = next(b for b in blocks(ROOT / "docs" / "design.md") if b.lang == "text")
    listed, package, inside = set(), "", False
    for line in block.text.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if indent == 0:
            inside = name == "mclip/"
        elif inside and indent == 2:
            package = name if name.endswith("/") else ""
            listed |= {name} if name.endswith(".py") else set()
        elif inside and indent == 4 and name.endswith(".py"):
            listed.add(package + name)
    return listed


def test_design_lists_every_module():
    """docs/design.md's layout names every module of mclip/ and no other (a package's own __init__.py aside)."""
    actual = {
        str(p.relative_to(ROOT / "mclip"))
        for p in (ROOT / "mclip").rglob("*.py")
        if "__pycache__" not in p.parts and not (p.name == "__init__.py" and p.parent != ROOT / "mclip")
    }
    listed = design_modules()
    assert listed == actual, (
        f"not in docs/design.md: {sorted(actual - listed)}; listed but absent: {sorted(listed - actual)}"
    )
