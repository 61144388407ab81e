"""The package's architecture: no import cycle (lazy imports inside functions count too), one module per
stage with the same entry, Hydra only in the CLI, and no work at import time."""

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import qscope_train
from qscope_train.config import Stage

PACKAGE = Path(qscope_train.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:  # `from .data import shards` imports the submodule shards
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "qscope_train.data.batches" in graph["qscope_train.trainer"]
    assert cycles(graph) == []


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    pkg = tmp_path / "qscope_train"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    assert cycles(import_graph(pkg)) == []
    # what release.resolve once did: a function-level import of a module that imports release back
    with open(pkg / "release.py", "a") as f:
        f.write("\n\ndef _late():\n    from . import convert\n\n    return convert\n")
    assert ["qscope_train.convert", "qscope_train.release"] in cycles(import_graph(pkg))
    with open(pkg / "data" / "shards.py", "a") as f:
        f.write("\nfrom ..stages import fit  # noqa\n")
    assert any("qscope_train.data.shards" in c and "qscope_train.stages.fit" in c for c in cycles(import_graph(pkg)))


def test_every_stage_is_a_module_of_stages_with_the_same_entry():
    import importlib

    signatures = set()
    for stage in Stage:
        assert (PACKAGE / "stages" / f"{stage.value}.py").is_file(), stage
        module = importlib.import_module(f"qscope_train.stages.{stage.value}")
        signatures.add(tuple(inspect.signature(module.run).parameters))
    assert signatures == {("cfg", "dirs", "accelerator", "tracker")}


def test_only_the_cli_imports_hydra_or_omegaconf():
    graph_sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    users = set()
    for path, source in graph_sources.items():
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("hydra", "omegaconf") for n in names):
                users.add(path.name)
    assert users == {"cli.py"}


def test_importing_the_package_does_no_work():
    """No op probe, allocator change or model/dataset access at import: the first use does it."""
    code = (
        "import qscope_train.pipeline, qscope_train.cli, qscope_train.sparse as s, qscope_train.screen as sc\n"
        "assert s.per_sample_backward.cache_info().currsize == 0 and sc._native_bf16.cache_info().currsize == 0\n"
        "import sys; assert 'transformers' not in sys.modules and 'datasets' not in sys.modules, sorted(sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
