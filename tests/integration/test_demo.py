"""`make demo` as a newcomer runs it: a network, transactions, a verified chain, then an attack by a
traitor primary that the honest replicas survive, with the verdict printed."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from .local_network import NODE_COMMAND, pick_base_port, run_command

pytestmark = pytest.mark.integration


async def test_the_demo_ends_with_an_attack_the_network_survives(tmp_path: Path) -> None:
    base_port = pick_base_port(4, random.Random())
    result = await run_command([*NODE_COMMAND, "demo", "--dir", str(tmp_path / "demo"), "--base-port", str(base_port)], deadline_s=180)
    output = result.stdout + result.stderr
    assert result.exit_code == 0, result.describe()
    assert "Traceback" not in output
    assert "replica 0 runs as a TRAITOR: equivocating_primary" in output
    assert re.search(r"safety +holds: replicas 1, 2 and 3 agree on block \d+", output), output
    assert re.search(r"liveness +holds", output), output
    views = re.search(r"honest replicas are in view ([\d, ]+)", output)
    assert views is not None, output
    # The traitor was primary of view 0: the honest replicas must have voted it out.
    assert all(int(view) >= 1 for view in views.group(1).split(", ")), output
    assert output.count("chain of replica 3 verified") == 2, output
    assert "all replicas stopped" in output
