"""The tree shows the pipeline, and its arrows point down: errors/config/distributed <- store <- models <- the stages
(embed, train, evaluate; never each other) <- deploy <- pipeline <- cli. Checked on the source, so a new import that runs
back up fails here rather than in a reader's head."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a module's unit is its package under mclip/ (or its own name at the top); a unit may import only lower layers
LAYER = {
    "errors": 0,
    "config": 0,
    "distributed": 0,
    "store": 1,
    "models": 2,
    "embed": 3,
    "train": 3,
    "evaluate": 3,
    "deploy": 4,
    "pipeline": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 8,
}
STAGES = {"embed", "train", "evaluate"}


def _imports() -> dict[str, set[str]]:
    """module -> the mclip modules it imports, at the top or inside a function (`from mclip import __version__` is the
    package itself, the one arrow every layer may take)."""
    graph = {}
    for path in (ROOT / "mclip").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mclip":
                if node.module == "mclip":
                    deps |= {"mclip" if a.name == "__version__" else f"mclip.{a.name}" for a in node.names}
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "mclip"}
        graph[module] = deps
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[0] if parts else "__init__"


def test_every_module_belongs_to_a_layer():
    assert {_unit(m) for m in _imports()} <= set(LAYER)


def test_arrows_point_down_and_stages_never_import_each_other():
    wrong = []
    for module, deps in _imports().items():
        for dep in deps - {"mclip"}:
            a, b = _unit(module), _unit(dep)
            if a != b and (LAYER[b] > LAYER[a] or (a in STAGES and b in STAGES)):
                wrong.append(f"{module} -> {dep}")
    assert not wrong, wrong


def test_no_import_circles():
    graph = {m: deps - {"mclip"} for m, deps in _imports().items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module, path):
        state[module] = 1
        for dep in graph.get(module, ()):
            assert state.get(dep) != 1, " -> ".join([*path, dep])
            if dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_import_mclip_loads_no_stage_and_nothing_heavy():
    code = "import sys, mclip; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('mclip', 'torch', 'transformers', 'faiss', 'pyarrow', 'datasets'))))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    assert loaded == ["mclip", "mclip.config", "mclip.errors"]
