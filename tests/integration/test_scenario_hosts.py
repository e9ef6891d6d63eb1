"""`ledger-scenario run NAME --hosts`: every replica process in a network namespace of its own (root only)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
import trio

from node.host_network import NAME_PREFIX, hosts_mode_refusal

pytestmark = pytest.mark.integration

COMMAND_DEADLINE_S = 120


def netns_unavailable() -> str | None:
    reason = hosts_mode_refusal()
    if reason is not None:
        return reason
    probe = f"{NAME_PREFIX}-probe-test"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


UNAVAILABLE = netns_unavailable()
needs_netns = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"--hosts cannot run here: {UNAVAILABLE}")


def leftovers(tag: str) -> list[str]:
    """Namespaces and links of this run still present."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return [line for line in (namespaces + links).splitlines() if f"{NAME_PREFIX}-{tag}" in line or f"{NAME_PREFIX}{tag}" in line]


def run_tag(stderr: str) -> str:
    match = re.search(rf"on bridge {NAME_PREFIX}([0-9a-f]{{6}})b", stderr)
    assert match is not None, stderr
    return match.group(1)


@needs_netns
def test_a_partition_scenario_runs_with_one_namespace_per_replica_and_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.scenario_cli", "run", "partition-with-traitor", "--replicas", "4", "--hosts", "--no-baseline"],
        capture_output=True, text=True, timeout=COMMAND_DEADLINE_S, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCHES the expectation" in result.stdout
    assert "real processes, one network namespace each" in result.stdout
    assert "--hosts" in next(line for line in result.stdout.splitlines() if line.strip().startswith("replay"))
    tag = run_tag(result.stderr)
    # The partition took replica 3's link down, and the heal found it down.
    assert re.search(rf"at 100 ms: partition replicas 3 \({NAME_PREFIX}{tag}h3 was up\)", result.stderr), result.stderr
    assert re.search(rf"at 1400 ms: heal replicas 3 \({NAME_PREFIX}{tag}h3 was down\)", result.stderr), result.stderr
    assert f"removed the network namespaces and bridge {NAME_PREFIX}{tag}b" in result.stderr
    assert leftovers(tag) == []


@needs_netns
async def test_ctrl_c_during_a_hosts_run_removes_everything_it_made() -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "node.scenario_cli", "run", "twins", "--replicas", "4", "--hosts", "--no-baseline"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    seen = b""
    with trio.fail_after(COMMAND_DEADLINE_S):
        while b"`ledger-node run` processes" not in seen:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, seen.decode()
            seen += chunk
        tag = run_tag(seen.decode())
        # With its bridge down the runner cannot reach a replica, so it waits for them to answer
        # and cannot finish by itself: the Ctrl-C lands while the run is in progress, on any host.
        # (Sent when the workload starts instead, it raced the run's own 1.5 s to its end.)
        subprocess.run(["ip", "link", "set", f"{NAME_PREFIX}{tag}b", "down"], check=True)
        assert leftovers(tag) != []  # made while it runs
        process.send_signal(signal.SIGINT)
        while chunk := await process.stderr.receive_some(4096):
            seen += chunk
        code = await process.wait()
    assert code == 130, seen.decode()
    assert "interrupted" in seen.decode()
    assert leftovers(tag) == []


@needs_netns
def test_a_host_network_that_fails_halfway_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    import node.host_network as host_network_module

    real_run = host_network_module._run
    network = host_network_module.HostNetwork(3)

    def failing_run(arguments: list[str]) -> str:
        if arguments[:3] == ["ip", "netns", "add"] and arguments[3] == network.namespace(2):
            raise host_network_module.HostNetworkError("`ip netns add` failed: injected")
        return real_run(arguments)

    monkeypatch.setattr(host_network_module, "_run", failing_run)
    with pytest.raises(host_network_module.HostNetworkError, match="injected"):
        network.create()
    assert leftovers(network.tag) != []  # the bridge and two hosts were made
    assert network.remove() == []
    assert leftovers(network.tag) == []
