"""The package's shape: a small public API, no import cycles, nothing GPU-only or test-only imported or shipped
where it should not be, and a recipe that reads top to bottom."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import HANG_TIMEOUT, REPO, subprocess_env

PACKAGE = REPO / "hf_sparse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every hf_sparse module `path` imports, at top level or inside a function (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hf_sparse"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("hf_sparse"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import x` may name a submodule
                found.add(f"{target}.{alias.name}")
    return found


def _import_graph(root: Path) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path) if d in modules and d != name}
        # Importing a.b runs a/__init__ first: a package's own __init__ re-exporting its modules is no cycle.
        graph[name] = deps - {n for n in deps if name.startswith(n + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(node, stack):
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in done:
                visit(dep, stack)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [])
    return cycles


def test_no_module_imports_a_module_that_imports_it_back():
    graph = _import_graph(PACKAGE)
    assert {"hf_sparse.criteria", "hf_sparse.inference.swap"} <= graph["hf_sparse.callback"]  # top and in-function
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path, monkeypatch):
    package = tmp_path / "hf_sparse"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import x\n")
    (package / "a.py").write_text("from .b import y\nx = 1\n")
    (package / "b.py").write_text("y = 2\n\ndef f():\n    from .a import x\n    return x\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert _cycles(_import_graph(package)) == [["hf_sparse.a", "hf_sparse.b", "hf_sparse.a"]]


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("policy", ["policy", "fp8_policy"])
def test_the_swap_policy_imports_no_kernel_binding(policy):
    inference = "hf_sparse.inference."
    reached = _closure(_import_graph(PACKAGE), inference + policy)
    assert inference + "kernels.base" in reached  # it reads the kernels' facts through the types
    allowed = {inference + m for m in ("kernels.base", "units", "policy", "holdings")}  # holdings: policy, split
    bindings = {m for m in reached if m.startswith(inference) and m not in allowed}
    assert not bindings, f"{policy}.py reaches kernel code: {sorted(bindings)}"
    modules = [REPO.joinpath(*m.split(".")).with_suffix(".py") for m in reached | {inference + policy}]
    assert not [m for m in modules if m.is_file() and "ctypes" in m.read_text()]


def test_the_inference_room_reaches_no_training_or_report_module():
    graph = _import_graph(PACKAGE)
    above = ("pruning", "criteria", "calibration", "callback", "checkpoint", "hub", "run_report", "distillation")
    for module in [m for m in graph if m.startswith("hf_sparse.inference")]:
        reached = {m for m in _closure(graph, module) if m.removeprefix("hf_sparse.").split(".")[0] in above}
        assert not reached, f"{module} reaches {sorted(reached)}"


def test_each_kernel_is_one_file_and_one_entry():
    from hf_sparse.inference.kernels import KERNELS

    files = {type(k).__module__ for k in KERNELS}
    assert {k.name for k in KERNELS} >= {"dense", "cusparselt", "cutlass", "fp8", "fp8-dense"}
    assert len(files) == len(KERNELS) and all(f.startswith("hf_sparse.inference.kernels.") for f in files)


def test_modules_are_short():
    # A module holds one idea: none of the package's or the recipes' is over 600 lines
    long = {
        str(p.relative_to(REPO)): n
        for p in [*PACKAGE.rglob("*.py"), *(REPO / "recipes").glob("*.py")]
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"modules over 600 lines: {long}"


def test_public_api_is_small_and_exports_the_errors():
    import hf_sparse

    assert len(hf_sparse.__all__) <= 20
    assert len(set(hf_sparse.__all__)) == len(hf_sparse.__all__)
    assert all(hasattr(hf_sparse, name) for name in hf_sparse.__all__)
    from hf_sparse import HubPushError, SparseCheckpointError

    assert issubclass(SparseCheckpointError, Exception) and issubclass(HubPushError, Exception)


def test_import_on_a_cpu_machine_loads_no_gpu_only_or_benchmark_code():
    # torch._dynamo (which transformers imports) imports Triton wherever it is installed, as on every CUDA build of
    # PyTorch: what it loads by itself is not held against hf_sparse; hf_sparse's own Triton kernels are
    code = (
        "import sys, torch._dynamo; base = set(sys.modules); import hf_sparse; "
        "bad = [m for m in sys.modules if m not in base and m.startswith(('nvmath', 'cuda.bindings', 'triton', "
        "'hf_sparse.inference.benchmark', 'hf_sparse.inference.decode_bench', 'hf_sparse.inference._decode_jit', "
        "'matplotlib', 'datasets', 'evaluate', 'benchmarks'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


@pytest.mark.parametrize("recipe", ["squad_24.py", "llm_24.py"])
def test_recipe_functions_are_short(recipe):
    long = {name: n for name, n in _function_lengths(REPO / "recipes" / recipe).items() if n > 60}
    assert not long, f"functions over 60 lines in recipes/{recipe}: {long}"


@pytest.mark.slow
def test_wheel_ships_the_library_only(tmp_path):
    # built from a copy without build outputs: a build/ folder left in the checkout would ship what it holds
    source = tmp_path / "source"
    outputs = ("build", "dist", "*.egg-info", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".venv")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*outputs))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=HANG_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("hf_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"hf_sparse", next(t for t in top if t.endswith(".dist-info"))}, top
    assert "hf_sparse/model_cards/sparse_model_card.md" in names
    assert "hf_sparse/squad/evaluate_modules/squad/squad.py" in names
    assert (
        "hf_sparse/inference/kernels/cutlass.py" in names and "hf_sparse/inference/csrc/sm90_sparse_gemm.cu" in names
    )
    assert not [n for n in names if "benchmarks" in n or "/tests/" in n or "reference" in n]
