"""The repository's layout rules, checked on the source (ast and text; nothing is imported):

* the package's import graph (relative imports resolved, imports inside functions included) has no cycle;
* no module outside tests/ imports from tests/;
* no file outside tests/ and .ci/ refers to ``../shared`` (the test fixtures beside the checkout);
* no function or method outside tests/ and benchmarks/ is longer than 120 lines;
* each paper concept lives in a file named after it, and README's layout section maps the concept to that file.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from .conftest import ROOT

PACKAGE = "flextok_kit"
MAX_FUNCTION_LINES = 120
# paper concept -> the file that implements it (the file's name is the concept's)
CONCEPTS = {
    "VAE": "flextok_core/vae.py",
    "encoder (the resampler)": "flextok_core/encoder.py",
    "registers": "flextok_core/registers.py",
    "FSQ": "flextok_core/fsq.py",
    "nested dropout": "flextok_core/nested_dropout.py",
    "rectified-flow decoder": "flextok_core/decoder.py",
    "rectified-flow sampling": "flextok_core/sampling.py",
    "guidance (CFG, APG)": "flextok_core/guidance.py",
    "REPA": "training/repa.py",
    "AR model": "flextok_core/ar.py",
}
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules"}


def repo_files() -> list[Path]:
    """Files of the checkout relative to ROOT: git's tracked and untracked-not-ignored files, else a walk that skips
    virtual environments, caches and egg-info."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [Path(p) for p in out.split("\0") if p]
        return sorted(p for p in files if (ROOT / p).is_file())
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()]
        return sorted(p for p in files if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.parts))


def outside(path: Path, *dirs: str) -> bool:
    return path.parts[0] not in dirs


def python_files(*excluded_dirs: str) -> list[Path]:
    return [p for p in repo_files() if p.suffix == ".py" and outside(p, *excluded_dirs)]


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def package_modules() -> dict[str, Path]:
    """Module name -> file for the installed package: the root's modules and every sub-package outside tests/ (a
    folder with an __init__.py whose parents are packages too)."""
    modules = {}
    for path in python_files("tests"):
        folders = [Path(*path.parts[:i]) for i in range(1, len(path.parts))]
        if all((ROOT / f / "__init__.py").is_file() for f in folders):
            modules[module_name(path)] = path
    return modules


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules that ``path`` imports anywhere in its code (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule (pkg is its parent, already importing); ``from pkg import
            # name`` runs pkg itself
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_has_no_cycle():
    modules = package_modules()
    assert f"{PACKAGE}.flextok_core.decoder" in modules and f"{PACKAGE}.pipelines.pipeline_flextok" in modules
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    assert f"{PACKAGE}.flextok_core.registers" in graph[f"{PACKAGE}.flextok_core.decoder"]  # resolution works
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _imports_tests(node: ast.AST, path: Path, test_modules: set[str]) -> str | None:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the file's folder
            base = path.parent.parts[: max(len(path.parent.parts) - node.level + 1, 0)]
            names = [".".join([*base, *(node.module.split(".") if node.module else [])])]
        else:
            names = [node.module or ""]
    elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.path.insert", "sys.path.append"):
        if any(isinstance(n, ast.Constant) and n.value == "tests" for n in ast.walk(node)):
            return f"puts tests/ on sys.path: {ast.unparse(node)}"
        return None
    else:
        return None
    for name in names:
        first = name.split(".")[0]
        if first == "tests" or name.startswith(f"{PACKAGE}.tests") or first in test_modules:
            return f"imports {name}"
    return None


def test_nothing_outside_tests_imports_tests():
    test_modules = {p.stem for p in repo_files() if p.parts[0] == "tests" and p.suffix == ".py"} - {"__init__"}
    bad = []
    for path in python_files("tests"):
        for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
            why = _imports_tests(node, path, test_modules)
            if why:
                bad.append(f"{path}:{node.lineno}: {why}")
    assert not bad, "modules outside tests/ use tests/:\n" + "\n".join(bad)


SHARED_REFERENCE = re.compile(r"\.\./shared\b|[\"']shared[\"']\s*/")  # "../shared/...", parent / "shared" / ...


def test_no_reference_to_shared_outside_tests():
    bad = []
    for path in repo_files():
        # code and scripts only: the README may tell developers where the golden fixtures live
        if not outside(path, "tests", ".ci") or str(path).endswith(".md"):
            continue
        try:
            text = (ROOT / path).read_text()
        except (UnicodeDecodeError, OSError):  # binary files (weights, images)
            continue
        bad += [f"{path}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                if SHARED_REFERENCE.search(line)]
    assert not bad, "references to ../shared (a test fixture beside the checkout) outside tests/:\n" + "\n".join(bad)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in python_files("tests", "benchmarks"):
        for node in ast.walk(ast.parse((ROOT / path).read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_functions_are_at_most_120_lines():
    too_long = long_functions()
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def readme_layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def test_paper_concepts_have_their_own_files():
    section = readme_layout_section()
    for concept, path in CONCEPTS.items():
        assert (ROOT / path).is_file(), f"{concept}: {path} does not exist"
        stem = Path(path).stem.replace("_", " ").lower()
        assert stem in concept.lower(), f"{concept}: the file {path} is not named after it"
        lines = [line for line in section.splitlines() if path in line]
        assert any(concept.lower() in line.lower() for line in lines), \
            f"README's layout section does not map {concept!r} to {path}"
