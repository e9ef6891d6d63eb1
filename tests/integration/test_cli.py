"""The `ledger-node` and `ledger-client` command lines run as real processes: one-line errors with
the documented exit codes, options in any position, and no harm to files they did not write."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from .local_network import NODE_COMMAND, CommandResult, pick_base_port, run_command

pytestmark = pytest.mark.integration

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INVALID_CHAIN = 4


def one_line_error(result: CommandResult, program: str, exit_code: int) -> str:
    """The single stderr line of a command that failed with `exit_code`, checked to be no traceback."""
    assert result.exit_code == exit_code, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith(f"{program}: "), result.describe()
    return lines[0]


async def test_demo_refuses_a_directory_holding_someone_elses_files(tmp_path: Path) -> None:
    """Regression: `demo --dir D` passed `--force` to init, which deleted whatever D held."""
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "thesis.tex").write_text("years of work")
    base_port = pick_base_port(4, random.Random())
    result = await run_command([*NODE_COMMAND, "demo", "--dir", str(directory), "--base-port", str(base_port)])
    assert result.exit_code == EXIT_FAILED, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    assert "thesis.tex" in result.stdout + result.stderr
    assert (directory / "thesis.tex").read_text() == "years of work"
    assert sorted(path.name for path in directory.iterdir()) == ["thesis.tex"]
