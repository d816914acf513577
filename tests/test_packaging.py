"""Packaging contracts: plugin entry point, idempotent registration, no top-level shadowing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "sinq" and ep.value == "sinq_vllm:register" for ep in eps)


def test_register_is_idempotent_and_adds_sinq():
    import sinq_vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    sinq_vllm.register()
    sinq_vllm.register()
    assert QUANTIZATION_METHODS.count("sinq") == 1
    assert get_quantization_config("sinq").__name__ == "SinqConfig"


def test_register_is_cheap():
    """No kernel build, no CUDA init: importing the package pulls in no extension module."""
    code = "import sinq_vllm, sys; print(any(m.startswith('sinq_vllm._C') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert out.stdout.strip() == "False"


def test_triton_kernels_ship_under_our_namespace_only():
    assert importlib.util.find_spec("sinq_vllm.triton_kernels") is not None
    spec = importlib.util.find_spec("triton_kernels")
    # vLLM probes for an unrelated `triton_kernels` package; ours must never be it.
    assert spec is None or not str(spec.origin or "").startswith(str(REPO))


# ---- package layout (docs/design.md §8) --------------------------------------------------------
_PACKAGE = REPO / "sinq_vllm"
#: which sub-packages each layer may import (its own always); lower layers never import higher ones
_MAY_IMPORT = {
    "format": set(),
    "kernels": {"format", "triton_kernels"},
    "quantizer": {"format", "kernels"},
    "vllm": {"format", "kernels", "quantizer", "triton_kernels"},
    "cli": {"format", "kernels", "quantizer"},
}
_SHARED = {"errors", "log"}  # top-level modules every layer uses


def _module_imports() -> dict[str, set[str]]:
    """``{module: modules of sinq_vllm it imports}`` (absolute dotted names), from the source."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in _PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if (_PACKAGE.parent / (full.replace(".", "/") + ".py")).exists() else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("sinq_vllm")}
    return graph


def test_layers_import_downwards_only():
    bad = []
    for module, deps in _module_imports().items():
        parts = module.split(".")
        if len(parts) < 3:
            continue  # sinq_vllm/__init__, errors, log
        layer = parts[1]
        for dep in deps:
            dep_parts = dep.split(".")
            target = dep_parts[1] if len(dep_parts) > 1 else ""
            if target in ("", layer) or target in _SHARED or target in _MAY_IMPORT.get(layer, set()):
                continue
            bad.append(f"{module} imports {dep}")
    assert not bad, "imports against the layering of docs/design.md §8:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _module_imports()
    modules = {m for m in graph if not m.endswith("__init__")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep not in graph or dep == node:
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own modules is not a cycle of concern
    cycles = [c for c in cycles if not all(part.count(".") <= 1 for part in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_compat_imports_vllm_internals():
    import ast

    offenders = []
    for path in _PACKAGE.rglob("*.py"):
        if path == _PACKAGE / "vllm" / "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n == "vllm" or n.startswith("vllm.")]
    assert not offenders, offenders


def test_every_subpackage_is_a_regular_package():
    """setup.py's find_packages ships only folders with an __init__.py; a namespace folder would
    work in an editable install and be missing from the wheel."""
    missing = [str(d.relative_to(REPO)) for d in _PACKAGE.rglob("*") if d.is_dir() and d.name != "__pycache__"
               and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert not missing, missing
