"""The shape of the product, read from its source: STYLE.md rules 1, 12 and 13 and issue 12's
"done when" as tests. The rules on imports, size and writes parse the code with ``ast`` and
import none of it, so a module that would pull in torch costs nothing here.

- the first-party import graph has no cycle: module-level, function-level and ``TYPE_CHECKING``
  imports alike, since an import moved into a function to dodge a cycle is the cycle all the same;
- in ``tasks/`` a function-level import of a first-party module is allowed only where it keeps a
  heavy third-party library out of a process that does not need it (``LAZY_HEAVY_IMPORTS``);
- no module imports another module's private names;
- the layers import one way (rule 1);
- no product module passes 600 lines (rule 12);
- only ``models/`` writes the jobs table (UPDATE or DELETE), and nothing outside it sets job
  columns through a generic pass-through writer;
- tests build rows through one factory per model.

The detectors are run on small snippets as well, so each rule is seen to fail where it should.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from models.db import Database

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("app", "tasks", "models", "inference", "config")
MAX_LINES = 600

# Libraries worth keeping out of a process that does not use them: the engines' stack (a GPU
# worker needs it; the API and the cpu workers must not pay its seconds and hundreds of MB), and
# the web, database and broker stacks, which the ``aiorch`` CLI entry point (the gunicorn master)
# does not load. tests/app/test_api.py checks both at run time.
HEAVY = frozenset(
    {
        "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "safetensors",
        "huggingface_hub", "spandrel", "onnx", "onnxruntime", "insightface", "mediapipe", "cv2",
        "numpy", "PIL", "av",
        "flask", "flask_smorest", "werkzeug", "marshmallow", "webargs",
        "sqlalchemy", "alembic", "psycopg2",
        "celery", "kombu", "billiard",
        # The remote providers' clients: about 16 MB in an API process that routes nothing remote.
        "requests", "cryptography", "jwt",
        # The S3 client: only where AIORCH_STORAGE_URL names a bucket (tasks/storage_s3.py).
        "boto3", "botocore",
    }
)  # fmt: skip

# Issue 12: the pipeline's modules (``tasks/``) import first-party modules at module level, but
# for documented lazy imports of heavy libraries. A module named here may import a first-party
# module inside a function when, and only when, that module brings in one of the listed heavy
# libraries that the importer does not already load at module level. That is checked, so an entry
# cannot quietly cover an import that dodges a cycle or defers nothing.
LAZY_SCOPE = ("tasks",)
LAZY_HEAVY_IMPORTS: dict[str, frozenset[str]] = {
    # The API builds a Storage to serve and delete files; only workers encode outputs with numpy.
    # The S3 backend (boto3) only where AIORCH_STORAGE_URL names a bucket.
    "tasks.storage": frozenset({"numpy", "boto3", "botocore"}),
    # The API checks a payload against a route's providers only where a route names one; the
    # provider clients (requests, jwt, cryptography) stay out of an API that routes nothing.
    "tasks.remote.backend_limits": frozenset({"requests", "jwt", "cryptography"}),
}


# -- reading the source ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package a relative import in this module starts from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def layer(self) -> str:
        return self.name.split(".")[0]


@dataclass(frozen=True)
class Import:
    """One import statement's target: a dotted module, or ``module`` for ``from module import x``."""

    importer: Module
    target: str
    lineno: int
    names: tuple[str, ...]  # ("a", "b") for ``from x import a, b``; () for ``import x``
    function_level: bool
    runs_at_import: bool  # False inside a function and under ``if TYPE_CHECKING:``

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    @property
    def where(self) -> str:
        return f"{self.importer.rel}:{self.lineno}"


@cache
def product_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for layer in PRODUCT:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules[name] = Module(name, path, is_package)
    return modules


def source_of(module: Module) -> str:
    return module.path.read_text(encoding="utf-8")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(
    node: ast.AST, in_function: bool, runs: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement under ``node``, with (inside a function?, runs on import?)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, runs
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_nodes(child, True, False)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _import_nodes(ast.Module(body=child.body, type_ignores=[]), in_function, False)
            yield from _import_nodes(ast.Module(body=child.orelse, type_ignores=[]), in_function, runs)
        else:
            yield from _import_nodes(child, in_function, runs)


def resolve(name: str) -> str | None:
    """The first-party module that importing ``name`` binds to, or None for a third-party name."""
    modules = product_modules()
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_in(module: Module, tree: ast.AST) -> list[Import]:
    found: list[Import] = []
    for node, in_function, runs in _import_nodes(tree, False, True):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno, (), in_function, runs) for alias in node.names]
            continue
        if node.level:  # ``from ..x import y``: up from this module's package
            base = module.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        names = tuple(alias.name for alias in node.names)
        # ``from package import sub`` imports the module package.sub; ``from mod import name``, mod.
        submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in product_modules()]
        found += [Import(module, sub, node.lineno, names, in_function, runs) for sub in submodules]
        if len(submodules) < len(names):
            found.append(Import(module, source, node.lineno, names, in_function, runs))
    return found


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(
        imp
        for module in product_modules().values()
        for imp in imports_in(module, ast.parse(source_of(module), filename=str(module.path)))
    )


@cache
def first_party_edges() -> dict[str, dict[str, Import]]:
    """importer -> imported first-party module -> the first import that makes the edge."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in product_modules()}
    for imp in all_imports():
        target = resolve(imp.target)
        if target and target != imp.importer.name:
            edges[imp.importer.name].setdefault(target, imp)
    return edges


# -- the import graph has no cycle -----------------------------------------------------------------


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # recursion is fine: the product has ~100 modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _shortest_cycle(graph: Mapping[str, Iterable[str]], start: str, within: set[str]) -> list[str]:
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt in within and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return []


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """A shortest cycle through each module of each component, each cycle once."""
    seen: set[frozenset[tuple[str, str]]] = set()
    found = []
    for component in strongly_connected(graph):
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            steps = frozenset(zip(cycle, cycle[1:], strict=False))
            if steps not in seen:
                seen.add(steps)
                found.append(cycle)
    return found


def test_the_cycle_finder_reports_each_cycle_once_and_nothing_else() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["d"], "f": ["g"], "g": ["f"]}
    assert strongly_connected(graph) == [["a", "b", "c"], ["f", "g"]]
    assert cycles(graph) == [["a", "b", "c", "a"], ["f", "g", "f"]]
    assert cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_the_reader_sees_imports_in_functions_under_type_checking_and_relative_ones() -> None:
    module = Module("tasks.remote.poll", ROOT / "tasks/remote/poll.py", is_package=False)
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .submit import Submission\n"
        "from ..jobs import Runtime\n"
        "if TYPE_CHECKING:\n"
        "    from tasks.webhooks import Sender\n"
        "def f():\n"
        "    import models.jobs\n"
        "    from inference.diffusion import ENGINES\n"
    )
    found = {(i.target, i.function_level, i.runs_at_import) for i in imports_in(module, ast.parse(source))}
    assert found == {
        ("typing", False, True),
        ("tasks.remote.submit", False, True),
        ("tasks.jobs", False, True),
        ("tasks.webhooks", False, False),
        ("models.jobs", True, False),
        ("inference.diffusion", True, False),
    }


def test_the_product_import_graph_has_no_cycle() -> None:
    edges = first_party_edges()
    found = cycles(edges)
    report = []
    for cycle in found:
        report.append("  " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            imp = edges[a][b]
            how = "" if imp.runs_at_import else " (TYPE_CHECKING)"
            how = " inside a function" if imp.function_level else how
            report.append(f"      {a} -> {b}: {imp.where}{how}")
    assert not found, "import cycles among first-party modules:\n" + "\n".join(report)


# -- function-level imports and private names -----------------------------------------------------


@cache
def heavy_loaded_on_import() -> dict[str, frozenset[str]]:
    """For each module, the heavy libraries that importing it loads (its packages' __init__ too)."""
    modules = product_modules()
    direct: dict[str, set[str]] = {name: set() for name in modules}
    deps: dict[str, set[str]] = {name: set() for name in modules}
    for imp in all_imports():
        if not imp.runs_at_import:
            continue
        target = resolve(imp.target)
        if target:
            deps[imp.importer.name].add(target)
        elif imp.top in HEAVY:
            direct[imp.importer.name].add(imp.top)
    for name in modules:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        deps[name].update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in modules)
    loaded: dict[str, frozenset[str]] = {}
    for name in modules:
        seen, todo, libraries = {name}, [name], set()
        while todo:
            current = todo.pop()
            libraries |= direct[current]
            for dep in deps[current] - seen:
                seen.add(dep)
                todo.append(dep)
        loaded[name] = frozenset(libraries)
    return loaded


def test_a_function_level_first_party_import_in_tasks_only_defers_a_heavy_library() -> None:
    loaded = heavy_loaded_on_import()
    bad, used = [], set()
    for imp in all_imports():
        target = resolve(imp.target)
        if not imp.function_level or not target or target == imp.importer.name:
            continue
        if imp.importer.layer not in LAZY_SCOPE:
            continue
        deferred = loaded[target] - loaded[imp.importer.name]
        if deferred & LAZY_HEAVY_IMPORTS.get(imp.importer.name, frozenset()):
            used.add(imp.importer.name)
            continue
        why = f"defers {sorted(deferred)}, not allowed for it" if deferred else "defers no heavy library"
        bad.append(f"  {imp.where}: imports {target} inside a function; it {why}")
    title = "function-level first-party imports (a hidden cycle, or laziness that buys nothing):"
    assert not bad, title + "\n" + "\n".join(bad)
    stale = sorted(set(LAZY_HEAVY_IMPORTS) - used)
    assert not stale, f"LAZY_HEAVY_IMPORTS entries that no import needs any more: {stale}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names() -> None:
    bad = sorted(
        {
            f"  {imp.where}: from {imp.target} import {', '.join(filter(_private, imp.names))}"
            for imp in all_imports()
            if resolve(imp.target) == imp.target != imp.importer.name and any(map(_private, imp.names))
        }
    )
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


# -- layers ------------------------------------------------------------------------------------------

FORBIDDEN: dict[str, frozenset[str]] = {
    # Engines are plain libraries: no web framework, broker or database (rules 1 and 3).
    "inference": frozenset({"flask", "flask_smorest", "werkzeug", "celery", "kombu", "sqlalchemy", "alembic"})
    | {"app", "tasks", "models"},
    # The API never carries the engines: neither inference nor the torch stack (rule 1).
    "app": frozenset({"inference", "torch", "torchvision", "diffusers", "transformers", "spandrel"})
    | {"onnxruntime", "cv2", "mediapipe"},
    # config <- models <- tasks: models sits below tasks and app, and beside inference (rule 1).
    "models": frozenset({"tasks", "app", "inference"}),
    # app -> tasks, never back (rule 1).
    "tasks": frozenset({"app"}),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_rule_1_allows(layer: str) -> None:
    bad = sorted(
        f"  {imp.where}: {imp.target}"
        for imp in all_imports()
        if imp.importer.layer == layer and imp.top in FORBIDDEN[layer]
    )
    assert not bad, f"{layer}/ imports what rule 1 forbids it:\n" + "\n".join(bad)


def test_config_imports_only_the_standard_library_and_itself() -> None:
    bad = sorted(
        f"  {imp.where}: {imp.target}"
        for imp in all_imports()
        if imp.importer.layer == "config" and imp.top != "config" and imp.top not in sys.stdlib_module_names
    )
    assert not bad, "config/ imports beyond the standard library:\n" + "\n".join(bad)


# -- module size -------------------------------------------------------------------------------------


def test_no_product_module_is_over_600_lines() -> None:
    sizes = sorted(
        ((len(source_of(m).splitlines()), m.rel) for m in product_modules().values()), reverse=True
    )
    over = [f"  {rel}: {count} lines" for count, rel in sizes if count > MAX_LINES]
    title = f"modules over {MAX_LINES} lines (split each by concern, STYLE.md rule 12):"
    assert not over, title + "\n" + "\n".join(over)


# -- only models/ writes the jobs table --------------------------------------------------------------

JOB_TABLE_NAMES = frozenset({"Job", "_jobs", "jobs_table", "JOBS"})
RAW_JOB_WRITE = re.compile(r"\b(update\s+\"?jobs\"?\s+set|delete\s+from\s+\"?jobs\"?)\b", re.IGNORECASE)
SQL_MODULE_ALIASES = frozenset({"sa", "sqlalchemy", "sql"})
# The pass-through writers of models/ that set whatever columns a caller names: calling one from
# outside models/ is an UPDATE of the jobs table written there, by proxy, past the lifecycle.
GENERIC_JOB_WRITERS = frozenset({"fenced_update", "update_claimed"})


def _refers_to_jobs(node: ast.expr, names: frozenset[str]) -> bool:
    """``Job``, ``models.jobs.Job``, ``Job.__table__``, ``_jobs``, ``Job.id`` ..."""
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Attribute):
        return node.attr in names or _refers_to_jobs(node.value, names)
    return False


def _queries_jobs(node: ast.expr, names: frozenset[str]) -> bool:
    """Whether a method chain such as ``session.query(Job).filter(...)`` starts from a query of Job."""
    while isinstance(node, ast.Call | ast.Attribute):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "query":
                return any(_refers_to_jobs(arg, names) for arg in node.args)
            node = func
        else:
            node = node.value
    return False


def _is_jobs_table(node: ast.expr, names: frozenset[str]) -> bool:
    """``Job.__table__`` or a name bound to the table or the model."""
    if isinstance(node, ast.Name):
        return node.id in names
    return isinstance(node, ast.Attribute) and node.attr == "__table__" and _refers_to_jobs(node.value, names)


def job_table_writes(source: str) -> list[tuple[int, str]]:
    """Each UPDATE or DELETE of the jobs table that ``source`` issues, as (line, what)."""
    tree = ast.parse(source)
    functions = {"update": "update", "delete": "delete"}  # local name -> the SQLAlchemy construct
    names = set(JOB_TABLE_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            functions |= {a.asname or a.name: a.name for a in node.names if a.name in ("update", "delete")}
        elif isinstance(node, ast.ImportFrom):  # from models.jobs import Job as JobRow
            names |= {a.asname for a in node.names if a.asname and a.name in JOB_TABLE_NAMES}
    for node in ast.walk(tree):  # table = Job.__table__
        if isinstance(node, ast.Assign) and _is_jobs_table(node.value, frozenset(names)):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    known = frozenset(names)
    prose = {  # docstrings and other bare strings are not SQL that runs
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if RAW_JOB_WRITE.search(node.value):
                found.append((node.lineno, f"raw SQL {node.value.strip()[:60]!r}"))
            continue
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            name = func.attr if func.value.id in SQL_MODULE_ALIASES else None
        if name in functions and node.args and _refers_to_jobs(node.args[0], known):  # update(Job)
            found.append((node.lineno, f"{functions[name]}({ast.unparse(node.args[0])})"))
        elif (  # Job.__table__.update(), session.query(Job).filter(...).delete()
            isinstance(func, ast.Attribute)
            and func.attr in ("update", "delete")
            and (_is_jobs_table(func.value, known) or _queries_jobs(func.value, known))
        ):
            found.append((node.lineno, ast.unparse(func)))
    return sorted(found)


def generic_job_writes(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in GENERIC_JOB_WRITERS:
                found.append((node.lineno, ast.unparse(func)))
    return sorted(found)


@pytest.mark.parametrize(
    "source",
    [
        "from sqlalchemy import update\nupdate(Job).where(Job.id == 1).values(status='x')",
        "from sqlalchemy import delete as sa_delete\nsa_delete(Job).where(Job.id == 1)",
        "import sqlalchemy as sa\nsa.update(models.jobs.Job)",
        "from sqlalchemy import update\nupdate(_jobs)",
        "Job.__table__.delete().where(True)",
        "table = Job.__table__\nsession.execute(table.update().values(status='x'))",
        "from models.jobs import Job as Row\nfrom sqlalchemy import delete\ndelete(Row)",
        "session.query(Job).filter(Job.id == j).delete()",
        "session.query(Job).filter_by(id=j).update({'status': 'failed'})",
        "session.execute(text('UPDATE jobs SET status = :s WHERE id = :id'))",
        "cursor.execute(f\"delete from jobs where id = '{job_id}'\")",
    ],
)
def test_the_job_write_detector_sees_each_way_of_writing_the_table(source: str) -> None:
    assert job_table_writes(source)


@pytest.mark.parametrize(
    "source",
    [
        '"""The conditional UPDATE jobs SET status ... that claims a job."""',
        "from sqlalchemy import update\nupdate(StoredFile).where(StoredFile.job_id == job.id)",
        "session.query(StoredFile).filter(StoredFile.name.in_(names)).delete()",
        "svc.store.delete(job.id)\nresult.update(outputs[0])\nselect(Job).where(Job.id == 1)",
    ],
)
def test_the_job_write_detector_leaves_other_code_alone(source: str) -> None:
    assert job_table_writes(source) == []


def _outside_models() -> list[Module]:
    return [m for m in product_modules().values() if m.layer != "models"]


def test_no_module_outside_models_updates_or_deletes_jobs() -> None:
    bad = [f"  {m.rel}:{n}: {what}" for m in _outside_models() for n, what in job_table_writes(source_of(m))]
    assert not bad, "UPDATE/DELETE of the jobs table outside models/ (use the lifecycle):\n" + "\n".join(bad)


def test_no_module_outside_models_sets_job_columns_through_a_generic_writer() -> None:
    bad = [
        f"  {m.rel}:{n}: {what}(...)"
        for m in _outside_models()
        for n, what in generic_job_writes(source_of(m))
    ]
    title = "job columns set outside models/ by a generic writer, not by a lifecycle move:"
    assert not bad, title + "\n" + "\n".join(bad)


# -- tests build rows through one factory per model -----------------------------------------------


def mapped_models() -> set[type]:
    """Every model class of the product (migrations excluded: importing alembic's env runs it)."""
    for module in product_modules().values():
        if module.layer == "models" and ".migrations" not in module.name:
            importlib.import_module(module.name)
    from models.db import Base  # here, not above: the source-reading tests import no product code

    return {mapper.class_ for mapper in Base.registry.mappers}


def test_every_model_has_a_factory_that_builds_a_row(db: Database) -> None:
    from tests.support.factories import FACTORIES

    missing = sorted(cls.__name__ for cls in mapped_models() - set(FACTORIES))
    assert not missing, f"models without a factory in tests/support/factories.py: {missing}"
    for cls, factory in FACTORIES.items():
        key = factory(db)
        with db.session() as session:
            row = session.get(cls, key)
        assert row is not None, f"{factory.__name__} returned {key!r}, not the key of a {cls.__name__} row"
