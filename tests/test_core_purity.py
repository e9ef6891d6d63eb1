"""The protocol core must stay pure: no IO, clocks, threads or randomness can be imported by it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The core and the modules its state machine is made of (queries: the simulator answers reads with it too).
PURE_MODULES = [
    "node/core.py",
    "node/checkpoints.py",
    "node/view_change.py",
    "node/catch_up.py",
    "node/effects.py",
    "node/new_view.py",
    "node/certificates.py",
    "node/requests.py",
    "node/evidence.py",
    "node/snapshot_keeper.py",
    "node/state_join.py",
    "node/state_sync.py",
    "node/queries.py",
]
FORBIDDEN = {"trio", "socket", "time", "random", "os", "threading", "asyncio", "select", "subprocess", "secrets", "datetime", "sqlite3"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def ledger_modules_used(path: Path) -> set[Path]:
    used: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ledger."):
            used.add(ROOT / (node.module.replace(".", "/") + ".py"))
    return used


@pytest.mark.parametrize("module", PURE_MODULES)
def test_core_imports_no_io(module: str) -> None:
    path = ROOT / module
    assert not imported_modules(path) & FORBIDDEN


def test_ledger_modules_the_core_uses_import_no_io_either() -> None:
    """What the core calls into (encoding, blocks, the application...) must be pure too."""
    pending = set().union(*(ledger_modules_used(ROOT / module) for module in PURE_MODULES))
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        forbidden = imported_modules(path) & FORBIDDEN
        # crypto.py reads and writes key files; those functions are never called by the core.
        if path.name == "crypto.py":
            forbidden -= {"os"}
        assert not forbidden, f"{path.name} imports {forbidden}"
        pending |= ledger_modules_used(path)


def test_ledger_never_imports_node_or_client() -> None:
    for path in (ROOT / "ledger").glob("*.py"):
        assert not imported_modules(path) & {"node", "client"}, path.name


def test_client_never_imports_node() -> None:
    for path in (ROOT / "client").glob("*.py"):
        assert "node" not in imported_modules(path), path.name
