"""The package boundaries hold: the layers of `[tool.importlinter]` in pyproject.toml
(simulations over the coordinator and the sites, which are independent of each other, over what
they share of Flower, over safn_core; safn_core imports no Flower) checked by import-linter,
whose graph (grimp) sees every import, also one inside a function; no two modules import each
other, directly or round a longer circle; safn_core imports without Flower installed."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("safn_core", "safn.server", "safn.client", "safn.simulations", "safn_flower")
FOLDERS = {"safn.server": "server", "safn.client": "client", "safn.simulations": "simulations"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _modules(package: str) -> list[str]:
    pkg = __import__(package)
    return [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")]


def _graph():
    import grimp

    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_the_import_contracts_hold():
    """`lint-imports` with the project's contracts; fails with its report."""
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache",
                          "--config", str(ROOT / "pyproject.toml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    report = out.stdout[out.stdout.find("Contracts"):] + out.stderr
    assert out.returncode == 0, report
    assert " 0 broken" in report, report


def test_every_package_is_installed_under_its_name_and_no_generic_top_level_name():
    """pyproject.toml lists every package (a folder with __init__.py), the coordinator, site and
    simulation as safn.server / safn.client / safn.simulations; from outside the checkout those
    are importable and the generic names server, client, simulations are not."""
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, folders = set(meta["packages"]), meta["package-dir"]
    assert folders == FOLDERS
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("safn_core", "safn_flower")
             for p in (ROOT / top).rglob("__init__.py")}
    found |= {name for name, folder in FOLDERS.items() if (ROOT / folder / "__init__.py").is_file()}
    assert listed == found, (sorted(found - listed), sorted(listed - found))
    code = ("import importlib.util as u\n"
            "print([u.find_spec(n) is not None for n in ('safn.server', 'safn.client', "
            "'safn.simulations', 'server', 'client', 'simulations')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(sys.executable).parent, timeout=120)
    assert out.stdout.strip() == "[True, True, True, False, False, False]", out.stderr


def test_the_import_graph_sees_imports_inside_functions():
    """What the contracts rest on: an import inside a function is an edge of the graph
    (`safn.client.run_end` reads its site inside its handler)."""
    assert _graph().direct_import_exists(importer="safn.client.run_end",
                                         imported="safn.client.site_context")


def _shortest_cycle(graph, start: str, modules: set[str]) -> list[str] | None:
    """The shortest circle of imports from ``start`` back to it, by breadth-first search."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for there in sorted(graph.find_modules_directly_imported_by(here) & modules):
            if there == start:
                path = [here]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if there not in came_from:
                came_from[there] = here
                queue.append(there)
    return None


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it back; each
    circle is reported once, with the line of every import in it."""
    graph = _graph()
    modules = {m for m in graph.modules
               if any(m == p or m.startswith(p + ".") for p in PACKAGES)}
    assert len(modules) > 150
    cycles, seen = [], set()
    for module in sorted(modules):
        cycle = _shortest_cycle(graph, module, modules)
        if cycle is not None and frozenset(cycle) not in seen:
            seen.add(frozenset(cycle))
            lines = [f"{a} -> {b} (line {d['line_number']}: {d['line_contents']})"
                     for a, b in zip(cycle, cycle[1:])
                     for d in graph.get_import_details(importer=a, imported=b)[:1]]
            cycles.append("\n  ".join(lines))
    assert not cycles, "import cycles:\n  " + "\n\n  ".join(cycles)


BLOCKER = """
import sys, importlib.abc
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'blocked import of {{name}}')
sys.meta_path.insert(0, Block())
"""


def test_every_safn_core_module_imports_without_flower_or_the_apps():
    modules = _modules("safn_core")
    assert "safn_core.federation.run_folder" in modules and len(modules) > 40
    code = BLOCKER.format(blocked=["flwr", "safn", "safn_flower"]) + (
        "import importlib\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n"
        "assert not bad, bad\n"
        "print('ok', len(%r))\n" % modules)
    out = _run(code)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def test_the_blocker_itself_catches_a_flower_import():
    out = _run(BLOCKER.format(blocked=["flwr"]) + "import safn.server.strategies\n")
    assert out.returncode != 0 and "blocked import of flwr" in out.stderr


def test_no_module_outside_safn_flower_patches_flower_privates():
    """Assignments into Flower modules live in safn_flower/patches.py only."""
    offenders = []
    for folder in ("safn_core", "server", "client", "simulations"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("__kwdefaults__ =", "__defaults__ =", "sci.", "http_grid.time",
                           "factory.SubprocessExecutor =", "HEARTBEAT_DEFAULT_INTERVAL ="):
                if needle in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders


def test_message_keys_are_spelled_only_in_the_protocol_module():
    """Every record, config and metric key the coordinator and the sites exchange is a name in
    `safn_core.federation.protocol`: a key spelled as a string literal anywhere else is a second
    definition that a rename would miss."""
    import ast

    from safn_core.federation import protocol

    keys = {v for cls in (protocol.Config, protocol.Metric, protocol.Describe, protocol.SecAgg,
                          protocol.Task, protocol.NodeConfig)
            for k, v in vars(cls).items() if k.isupper() and isinstance(v, str) and "-" in v}
    assert len(keys) > 30
    # Flower's own JSON (`flwr run --format json`, `flwr ls`) also says "run-id"
    flower_json = {("server/superlink.py", "run-id"), ("safn_core/federation/run_report.py",
                                                        "run-id")}
    offenders = []
    for folder in ("server", "client", "safn_core/federation", "safn_core/privacy"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "protocol.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in keys \
                        and (str(path.relative_to(ROOT)), node.value) not in flower_json:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, offenders
