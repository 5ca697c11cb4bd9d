"""The module import graph, read from the source (function-local imports included): no cycles, and the
shared ground floor ``fashion/`` imports no stage above it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fashion", "training", "export", "gateway", "orchestration", "loadtest", "tagging")
# The layers, lowest first: a package may import its own modules and those of the layers below it.
# (training and export share a layer boundary: export reads training's checkpoints; training never
# imports export.) The gateway stands beside the stages on fashion/ alone.
BELOW = {
    "fashion": set(),
    "training": {"fashion"},
    "export": {"fashion", "training"},
    "gateway": {"fashion"},
    "orchestration": {"fashion", "training", "export"},
    "loadtest": {"fashion", "training", "export", "gateway", "orchestration"},
    "tagging": {"fashion", "training", "export", "gateway", "orchestration"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_cycles_counting_function_local_imports():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_imports_only_its_own_layer_and_those_below():
    """So ``fashion/`` imports no stage, and the gateway nothing but ``fashion/`` (no torch, no training)."""
    wrong = sorted(
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in {module.split(".")[0], *BELOW[module.split(".")[0]]}
    )
    assert not wrong, wrong


def calls_that_start_processes(path: Path) -> list[str]:
    """``subprocess.Popen(...)`` and ``start_new_session=`` in a module: starting a process to keep."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "Popen":
            found.append(f"{path.name}:{node.lineno} Popen")
        if isinstance(node, ast.ImportFrom) and any(a.name == "Popen" for a in node.names):
            found.append(f"{path.name}:{node.lineno} from {node.module} import Popen")
        if isinstance(node, ast.keyword) and node.arg == "start_new_session":
            found.append(f"{path.name}:{node.lineno} start_new_session")
    return found


def test_only_orchestration_starts_processes():
    outside = [
        call
        for name, path in modules().items()
        if name.split(".")[0] != "orchestration"
        for call in calls_that_start_processes(path)
    ]
    assert not outside, outside
    inside = [
        call
        for name, path in modules().items()
        if name.startswith("orchestration.")
        for call in calls_that_start_processes(path)
    ]
    assert inside and all(c.startswith("process.py:") for c in inside), inside


def test_the_readme_states_the_layers_the_import_graph_is_checked_against():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].strip("`/") in PACKAGES:
            imports = {i.strip() for i in cells[1].split(",")} - {"", "—"}
            rows[cells[0].strip("`/")] = imports
    assert rows == BELOW


# Third-party packages that are optional extras or heavy at import (torch alone takes seconds): importing
# them inside the function that needs them is the point, and needs no comment.
OPTIONAL = {
    "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "tritonclient", "matplotlib",
    "scipy", "pandas", "pyarrow", "psutil", "playwright", "locust", "gevent", "grpc", "urllib3",
    "helm_python", "yaml", "prometheus_client", "flask",
}


def unexplained_local_imports(path: Path) -> list[str]:
    """Function-local imports of project or standard modules with no ``# lazy: <reason>`` comment on the
    import or in the comment lines right above its block of imports."""
    lines = path.read_text().splitlines()
    found = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (module or "").split(".")[0] in OPTIONAL:
                continue
            above = node.lineno - 1  # 0-based index of the import line
            explained = "# lazy:" in lines[above]
            while not explained and above > 0:
                above -= 1
                text = lines[above].strip()
                in_block = text.startswith(("from ", "import ", "#")) or text.endswith(",") or text == ")"
                if text and not in_block:
                    break
                explained = "# lazy:" in text
            if not explained:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    return found


def test_function_local_imports_are_optional_packages_or_say_why_they_are_lazy():
    unexplained = [hit for path in modules().values() for hit in unexplained_local_imports(path)]
    assert not unexplained, unexplained


def test_fashion_help_imports_no_torch_no_optional_runtime_and_no_numpy():
    import subprocess
    import sys

    code = (
        "import sys; from fashion.cli import build_parser; build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'timm', 'onnx', 'onnxruntime', "
        "'openvino', 'nncf', 'tritonclient', 'pandas', 'numpy', 'PIL'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
