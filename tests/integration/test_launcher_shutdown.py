"""`ledger-node up` stops every replica it started on SIGTERM, even one arriving while it is starting them."""

from __future__ import annotations

import pytest
import trio

from .local_network import START_DEADLINE_S, LocalNetwork

pytestmark = pytest.mark.integration

# The race is lost most of the time; several attempts make a regression certain to show.
ATTEMPTS = 5


async def test_sigterm_while_replicas_start_stops_every_replica(initialised_network: LocalNetwork) -> None:
    problems: list[str] = []
    for attempt in range(ATTEMPTS):
        run = await initialised_network.launch()
        with trio.fail_after(START_DEADLINE_S):
            await run.handles_signals.wait()
        # SIGTERM the moment the launcher says Ctrl-C / SIGTERM will stop every replica.
        exit_code = await initialised_network.stop()
        if exit_code != 0 or "all replicas stopped" not in run.output or "Traceback" in run.output:
            problems.append(f"attempt {attempt}: exit code {exit_code}, output:\n{run.output}")
        if run.leaked_processes:
            problems.append(f"attempt {attempt}: still running after the launcher exited: {list(run.leaked_processes.values())}")
    assert not problems, "\n".join(problems)


async def test_sigterm_after_start_stops_every_replica(network: LocalNetwork) -> None:
    run = network.run
    assert run is not None
    pids = dict(run.replica_pids)
    exit_code = await network.stop()
    assert exit_code == 0, network.diagnostics()
    assert run.output.rstrip().endswith("all replicas stopped"), run.output
    assert not run.leaked_processes
    for replica_id in pids:
        assert f"replica {replica_id} stopped at height" in network.log_text(replica_id)
