"""The package's folders are its architecture (docs/design.md §7); these rules are read off the imports,
so they stay true:

    edges (collector/, clickhouse/, web/, cli, worker, …) and runtime/  →  stages/  →  metrics/  →  model/

- no import cycles between modules;
- model/ imports only model/; metrics/ only metrics/ and model/; stages/ only those, config and
  observability — and none of the three loads Faust, aiokafka or a ClickHouse client;
- `import flywheel.producer` (the client for backend services) loads no Faust;
- faust-streaming's and aiokafka's private names are used in runtime/faust_seams.py only.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "streams" / "flywheel"
SHARED = {"flywheel.config", "flywheel.observability"}  # settings and counters, usable from every layer
ALLOWED = {
    "model": {"model"},
    "metrics": {"model", "metrics"},
    "stages": {"model", "metrics", "stages"},
}
EXTERNAL = ("faust", "mode", "aiokafka", "kafka", "chdb", "clickhouse_driver", "aiohttp", "rocksdict")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, anywhere in it (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


MODULES = modules()
GRAPH = {m: {i for i in imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in GRAPH[m]:
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [m, d] if d in path else [m, d])
            elif d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_inner_layers_import_only_what_is_below_them(folder):
    wrong = {}
    for m, deps in GRAPH.items():
        if layer(m) != folder:
            continue
        bad = {d for d in deps if d not in SHARED and layer(d) not in ALLOWED[folder] and d != "flywheel"}
        external = {i for i in imports(m, MODULES[m]) if i.split(".")[0] in EXTERNAL}
        if bad or external:
            wrong[m] = sorted(bad | external)
    assert not wrong, f"{folder}/ must import only {sorted(ALLOWED[folder])} (and {sorted(SHARED)}): {wrong}"


def _loaded_by(module: str) -> list[str]:
    code = (f"import sys, {module}; "
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(EXTERNAL)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("module", ["flywheel.stages.aggregate", "flywheel.stages.ingest", "flywheel.stages.sink",
                                    "flywheel.metrics.verify", "flywheel.model.validate"])
def test_inner_layers_load_no_engine(module):
    assert _loaded_by(module) == []


def test_the_producer_for_backend_services_loads_no_faust():
    loaded = _loaded_by("flywheel.producer")
    assert not {"faust", "mode", "aiokafka"} & set(loaded), loaded


PRIVATE = re.compile(r"\b(_unacked_messages|_current_event|_drain_messages|_isolation_level|_ensure_producer|"
                     r"_db_for_partition|_dbs|_read_offset|_commit_every|_n_acked|_add_gap|_buffered_partitions)\b")


def test_private_names_of_faust_and_aiokafka_are_used_in_one_module():
    users = sorted(str(p.relative_to(PACKAGE)) for m, p in MODULES.items() if PRIVATE.search(p.read_text()))
    assert users == ["runtime/faust_seams.py"]
