"""The package's structure, checked on its source: floors, private names, heavy imports in the core.

Every module under ``spice_trainer/`` is parsed with `ast` (nothing is imported), so a new file, a moved
function or an import added inside a function is checked the moment it exists.

Floors: `FLOORS` below; ``docs/architecture.md`` and the package docstring show the same table (checked by
`test_the_documented_floors_are_the_checked_ones`). A module imports only from its own floor or lower ones,
the imports within one floor form no cycle, and the package's own ``__init__`` is the public facade above
every floor: it may name anything (lazily), and no module of the package imports it.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spice_trainer"

# Longest matching prefix wins. A module under no entry fails `test_every_module_has_a_floor`.
FLOORS: dict[str, int] = {
    "spice_trainer.config": 0,
    "spice_trainer.core": 1,
    "spice_trainer.features": 2,
    "spice_trainer.distributed": 3,
    "spice_trainer.pipeline": 4,
    "spice_trainer.proxy": 5,
    "spice_trainer.integrations": 6,
    "spice_trainer.cli": 7,
    "spice_trainer.demo": 7,
}
FACADE = "spice_trainer"

# The model stack: `core/` and `features/` are plain tensor math over rows and models they are handed,
# and import none of it at module level (`import spice_trainer.core.greedy` works without transformers).
HEAVY = ("transformers", "trl", "peft", "accelerate", "datasets")
LIGHT_PREFIXES = ("spice_trainer.core", "spice_trainer.features")

# Heavy imports inside functions of `core/` and `features/`, each with the reason it is there.
DOCUMENTED_LAZY_HEAVY: dict[tuple[str, str], str] = {
    ("spice_trainer.core.selection", "datasets"): (
        "Selection.to_dataset builds a `datasets.Dataset` from the record on request; the record itself is plain"
    ),
}

# Private names of *other* libraries the package reaches into, each with the reason. A private name of a
# spice_trainer module is never reached from another module (make it public instead).
FOREIGN_PRIVATE: dict[str, str] = {
    "_hf_deepspeed_config_weak_ref": (
        "transformers keeps the active ZeRO-3 config there; integrations/hub.py hides it while loading a proxy "
        "so the proxy is not partitioned (no public switch exists)"
    ),
    "_get_train_sampler": (
        "Trainer's sampler hook; integrations/trainer.py wraps it to hand the dataloader SpiceSampler "
        "(the documented way to change a Trainer's sampler is to override this method)"
    ),
    "_actions": "argparse keeps a parser's actions there; cli/main.py hides the flags `select` ignores",
    "_fingerprint": "datasets' own content fingerprint of a `Dataset`, the cheapest exact identity it offers",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (for `from pkg import name`, pkg.name when that is a module)
    names: tuple[str, ...]  # names taken with `from ... import`; empty for `import x`
    line: int
    top_level: bool  # False inside a function (a lazy import)
    type_only: bool  # under `if TYPE_CHECKING:`


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES: dict[str, ast.Module] = {name: ast.parse(p.read_text(encoding="utf-8"), str(p)) for name, p in MODULES.items()}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno, top_level, type_only))
            return
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            names = tuple(alias.name for alias in node.names)
            # `from spice_trainer.demo import world` depends on the module spice_trainer.demo.world.
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            if submodules:
                for sub in submodules:
                    found.append(Import(module, sub, (sub.rsplit(".", 1)[1],), node.lineno, top_level, type_only))
                rest = tuple(n for n in names if f"{base}.{n}" not in MODULES)
                if rest:
                    found.append(Import(module, base, rest, node.lineno, top_level, type_only))
            else:
                found.append(Import(module, base, names, node.lineno, top_level, type_only))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            top_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, top_level, True)
            for child in node.orelse:
                visit(child, top_level, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, top_level, type_only)

    visit(TREES[module], True, False)
    return found


IMPORTS: dict[str, list[Import]] = {name: _imports(name) for name in MODULES}


def floor_of(module: str) -> int | None:
    matches = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    best = max(matches, key=len, default=None)
    return None if best is None else FLOORS[best]


def _internal(target: str) -> bool:
    return target == FACADE or target.startswith(FACADE + ".")


def _where(imp: Import) -> str:
    return f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line}"


def test_the_parser_sees_the_package() -> None:
    # The checks below are only as good as the import list: it must hold the known edges of the tree.
    assert len(MODULES) > 30
    targets = {(i.module, i.target, i.top_level) for i in IMPORTS["spice_trainer.pipeline"]}
    assert ("spice_trainer.pipeline", "spice_trainer.distributed.comm", True) in targets  # from pkg import module
    assert ("spice_trainer.pipeline", "spice_trainer.core.greedy", True) in targets
    lazy = {(i.target, i.top_level) for i in IMPORTS["spice_trainer.core.selection"]}
    assert ("datasets", False) in lazy  # an import inside a function is seen, and seen as lazy


def test_every_module_has_a_floor() -> None:
    missing = sorted(name for name in MODULES if name != FACADE and floor_of(name) is None)
    assert not missing, f"give these modules a floor in FLOORS (and in docs/architecture.md): {missing}"


def test_no_import_climbs_a_floor() -> None:
    upward = []
    for name, imports in IMPORTS.items():
        if name == FACADE:
            continue
        own = floor_of(name)
        for imp in imports:
            if not _internal(imp.target):
                continue
            if imp.target == FACADE:
                upward.append(f"{_where(imp)}: {name} imports the public facade 'spice_trainer'; import the module")
                continue
            theirs = floor_of(imp.target)
            if own is not None and theirs is not None and theirs > own:
                kind = "lazily " if not imp.top_level else ""
                upward.append(f"{_where(imp)}: {name} (floor {own}) {kind}imports {imp.target} (floor {theirs})")
    assert not upward, "imports that climb a floor:\n" + "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's node list, found once each (by DFS from its smallest node)."""
    cycles: list[list[str]] = []
    nodes = sorted(edges)

    def dfs(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt > start and nxt not in path:
                dfs(start, nxt, [*path, nxt])

    for start in nodes:
        dfs(start, start, [start])
    return cycles


def test_imports_within_a_floor_form_no_cycle() -> None:
    # Lazy imports count too: a cycle that only a function-level import hides is still two modules that
    # need each other, and the first refactor that hoists the import breaks the package.
    edges: dict[str, set[str]] = {}
    for name, imports in IMPORTS.items():
        for imp in imports:
            internal = imp.target in MODULES and FACADE not in (name, imp.target) and imp.target != name
            if internal and floor_of(imp.target) == floor_of(name):
                edges.setdefault(name, set()).add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module globals, attributes and methods."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


DEFINED = {name: _private_definitions(tree) for name, tree in TREES.items()}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_from_another_module() -> None:
    found = []
    for name, imports in IMPORTS.items():
        for imp in imports:
            if _internal(imp.target) and imp.target != name:
                found += [f"{_where(imp)}: from {imp.target} import {n}" for n in imp.names if _private(n)]
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(found)


def _module_aliases(tree: ast.Module, module: str | None = None) -> dict[str, str]:
    """Names under which a module (``module``, or a test: `None`) binds modules of the package, anywhere in it:
    name -> module."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node) if module is not None else node.module or ""
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return aliases


def test_no_private_attribute_is_reached_across_modules() -> None:
    """``module._x`` on an imported module, and ``obj._x`` where only another module defines ``_x``.

    ``self._x`` / ``cls._x`` are the module's own. For any other ``obj._x`` the object's type is unknown
    to a parser, so the rule is: ``_x`` must be defined in this module, or be another library's private
    named in `FOREIGN_PRIVATE` with its reason.
    """
    found = []
    for name, tree in TREES.items():
        module_aliases = _module_aliases(tree, name)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            where = f"{MODULES[name].relative_to(ROOT)}:{node.lineno}"
            owner = ast.unparse(node.value)
            if owner in module_aliases and module_aliases[owner] != name:
                found.append(f"{where}: {owner}.{node.attr} (a private name of {module_aliases[owner]})")
                continue
            if owner in ("self", "cls") or node.attr in DEFINED[name]:
                continue
            others = sorted(m for m, defined in DEFINED.items() if node.attr in defined)
            if others:
                found.append(f"{where}: {owner}.{node.attr} (defined in {', '.join(others)})")
            elif node.attr not in FOREIGN_PRIVATE:
                found.append(f"{where}: {owner}.{node.attr} (another library's private: name it in FOREIGN_PRIVATE)")
    assert not found, "private attributes reached across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("prefix", LIGHT_PREFIXES)
def test_core_and_features_import_no_model_stack(prefix: str) -> None:
    found = []
    for name, imports in IMPORTS.items():
        if not (name == prefix or name.startswith(prefix + ".")):
            continue
        for imp in imports:
            root = imp.target.split(".")[0]
            if root not in HEAVY:
                continue
            if imp.top_level and not imp.type_only:
                found.append(f"{_where(imp)}: {name} imports {imp.target} at module level")
            elif not imp.top_level and (name, root) not in DOCUMENTED_LAZY_HEAVY:
                found.append(f"{_where(imp)}: {name} imports {imp.target} in a function (document it or move it)")
    assert not found, "\n".join(found)


def test_documented_exceptions_are_still_needed() -> None:
    # An exception whose code is gone must leave the list, or the list stops meaning anything.
    lazy_seen = {(i.module, i.target.split(".")[0]) for imps in IMPORTS.values() for i in imps if not i.top_level}
    stale = [key for key in DOCUMENTED_LAZY_HEAVY if key not in lazy_seen]
    attrs_seen = {n.attr for tree in TREES.values() for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    stale += [name for name in FOREIGN_PRIVATE if name not in attrs_seen]
    assert not stale, f"documented exceptions no code needs any more: {stale}"


def _documented_floors(rows: list[tuple[str, str]]) -> dict[str, int]:
    """``{"spice_trainer.core": 1, ...}`` from ``(floor, modules cell)`` pairs of a floors table."""
    out: dict[str, int] = {}
    for floor, cell in rows:
        for name in re.findall(r"`+([a-z_]+)/?`+", cell):
            out[f"spice_trainer.{name}"] = int(floor)
    return out


def test_the_documented_floors_are_the_checked_ones() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| (\d) \| ([^|]+) \|", doc, flags=re.MULTILINE)
    assert _documented_floors(table) == FLOORS, "docs/architecture.md's floors table differs from FLOORS"
    docstring = ast.get_docstring(TREES[FACADE]) or ""
    rows = re.findall(r"^(\d)\s+(``[^ ]+``(?:, ``[^ ]+``)*)", docstring, flags=re.MULTILINE)
    assert _documented_floors(rows) == FLOORS, "the floors table in spice_trainer/__init__.py differs from FLOORS"


# --- the test suite's own lanes ---------------------------------------------------------------------------

TESTS = ROOT / "tests"
# Helpers that start processes (torchrun's gloo ranks); calling one makes a test multi-process.
PROCESS_LAUNCHERS = {"torchrun"}
SUBPROCESS_CALLS = {"run", "Popen", "check_call", "check_output", "call"}
# Single-process tests that start a fresh interpreter, each with the reason it belongs to the fast lane.
FAST_SUBPROCESS: dict[tuple[str, str], str] = {
    ("test_greedy.py", "test_import_does_not_need_transformers"): "a fresh interpreter imports the core; no model",
    ("test_selection.py", "test_core_selection_imports_no_datasets"): "a fresh interpreter imports Selection",
}


def _is_slow_marker(node: ast.expr) -> bool:
    return "mark.slow" in ast.unparse(node)


def _launching_functions(tree: ast.Module) -> set[str]:
    """Functions of a test module that start processes, directly, through a helper or through a fixture."""
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}

    def starts_processes(fn: ast.FunctionDef, known: set[str]) -> bool:
        params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        if params & known:  # a fixture that launches
            return True
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in PROCESS_LAUNCHERS or name in known:
                return True
            if isinstance(func, ast.Attribute) and ast.unparse(func.value) == "subprocess" and name in SUBPROCESS_CALLS:
                return True
        return False

    known: set[str] = set()
    while True:
        grown = {name for name, fn in functions.items() if name not in known and starts_processes(fn, known)}
        if not grown:
            return known
        known |= grown


def test_every_test_that_starts_processes_is_slow() -> None:
    """Multi-process and subprocess tests carry ``@pytest.mark.slow`` (the fast lane is ``-m "not slow"``)."""
    unmarked = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_slow = any(
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
            and _is_slow_marker(node.value)
            for node in tree.body
        )
        launching = _launching_functions(tree)
        for node in tree.body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and node.name in launching):
                continue
            if module_slow or any(_is_slow_marker(d) for d in node.decorator_list):
                continue
            if (path.name, node.name) not in FAST_SUBPROCESS:
                unmarked.append(f"{path.name}:{node.lineno} {node.name}")
    assert not unmarked, "tests that start processes without @pytest.mark.slow:\n" + "\n".join(unmarked)
    # The list of exceptions holds only tests that exist and still start a process.
    for (file, name), _reason in FAST_SUBPROCESS.items():
        assert name in _launching_functions(ast.parse((TESTS / file).read_text(encoding="utf-8"))), (file, name)


def test_the_process_finder_sees_fixtures_and_helpers() -> None:
    tree = ast.parse(
        "def launch(): torchrun('x.py', 2)\n"
        "def fixture(tmp_path): return launch()\n"
        "def test_a(fixture): pass\n"
        "def test_b(): subprocess.run(['x'])\n"
        "def test_c(): pass\n"
    )
    assert _launching_functions(tree) == {"launch", "fixture", "test_a", "test_b"}


# --- what module docstrings say about imports ----------------------------------------------------------

THIRD_PARTY = {"torch", "numpy", "tqdm", "scipy", "matplotlib", "yaml", "huggingface_hub", "safetensors", *HEAVY}
CLAIM = re.compile(r"[^.]*\b(?:only\b[^.]*\bimported|imports only\b|imports\b[^.]*\bonly\b)[^.]*", re.IGNORECASE)


def _third_party_imports(module: str) -> set[str]:
    roots = {imp.target.split(".")[0] for imp in IMPORTS[module]}
    return {r for r in roots if r != "spice_trainer" and r not in sys.stdlib_module_names}


def test_docstrings_that_say_what_is_imported_are_true() -> None:
    """ "Only torch is imported" and the like, in a module docstring, list every library the module imports
    (at any level: a lazy import is still one the module needs)."""
    wrong, claims = [], 0
    for name, tree in TREES.items():
        for sentence in CLAIM.findall(ast.get_docstring(tree) or ""):
            named = {word for word in re.findall(r"[A-Za-z_]+", sentence) if word in THIRD_PARTY}
            claims += 1
            extra = _third_party_imports(name) - named
            if extra:
                where = MODULES[name].relative_to(ROOT)
                wrong.append(f"{where}: says {sentence.strip()!r}, also imports {sorted(extra)}")
    assert claims >= 5, "the claim finder should see the modules' 'Only torch is imported' lines"
    assert not wrong, "\n".join(wrong)


# Private names a test may reach, each with the reason (fault injection needs a hook the API does not offer).
TEST_PRIVATE: dict[tuple[str, str], str] = {
    ("tests/dist_scripts/store_resume.py", "_atomic_write_json"): (
        "the crash test kills the process between a chunk's rows and its manifest: it wraps the store's one "
        "atomic JSON writer to die at that moment"
    ),
}


def test_tests_use_only_public_names_of_the_package() -> None:
    """The tests call the library through public names (a private one would pin an implementation detail)."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and _internal(node.module or ""):
                found += [f"{where}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and ast.unparse(node.value) in aliases:
                allowed = (str(path.relative_to(ROOT)), node.attr) in TEST_PRIVATE
                found += [] if allowed else [f"{where}: {ast.unparse(node)}"]
    assert not found, "tests reaching private names of the package:\n" + "\n".join(found)
    stale = [key for key in TEST_PRIVATE if f".{key[1]}" not in (ROOT / key[0]).read_text(encoding="utf-8")]
    assert not stale, f"TEST_PRIVATE entries no test needs any more: {stale}"
