"""`ledger-bench` through its console script: a short run against real replicas prints sane figures.

Timings are never asserted: only that the fields exist, hang together, and count real work.
"""

from __future__ import annotations

import json
import math
import pstats
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ledger.config import load_replica_config

from .conftest import READY_DEADLINE_S
from .local_network import NODE_COMMAND, LocalNetwork, run_command

pytestmark = pytest.mark.integration

BENCH_DEADLINE_S = 240.0


async def test_ledger_bench_json_reports_throughput_latency_resources_and_the_floor() -> None:
    script = Path(sys.executable).with_name("ledger-bench")
    result = await run_command(
        [str(script), "--replicas", "4", "--duration", "2", "--warmup", "1", "--in-flight", "16", "--json"],
        deadline_s=BENCH_DEADLINE_S,
    )
    assert result.exit_code == 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert "bench:" in result.stderr, "no progress line on stderr"
    report = json.loads(result.stdout)
    assert report["replicas"] == 4 and report["in_flight"] == 16
    assert report["confirmed"] > 0
    assert report["transactions_per_second"] == pytest.approx(report["confirmed"] / report["duration_s"], rel=1e-3)
    assert 0 < report["floor_per_transaction_reply_transactions_per_second"] < report["floor_transactions_per_second"]
    assert report["ratio_to_floor"] == pytest.approx(report["transactions_per_second"] / report["floor_transactions_per_second"])
    assert 0 < report["latency_p50_ms"] <= report["latency_p95_ms"] <= report["latency_p99_ms"]
    assert report["blocks_per_second"] > 0 and report["mean_batch_size"] > 0
    assert len(report["replica_cpu_s"]) == 4 and all(seconds > 0 for seconds in report["replica_cpu_s"])
    assert report["load_generator_cpu_s"] > 0
    assert report["cpu_us_per_transaction"] > report["floor_cpu_us_per_transaction"] > 0
    assert 0 < report["cpu_ratio_to_floor"] < 1
    assert len(report["replica_peak_rss_bytes"]) == 4 and all(size > 2**20 for size in report["replica_peak_rss_bytes"])
    primitives = report["primitives_us"]
    for name in ("verify", "sign", "encode_batch", "decode_batch", "hash_block"):
        assert math.isfinite(primitives[name]) and primitives[name] > 0, name
    assert report["cores"] >= 1


@pytest.mark.parametrize("replica_count", [4])
async def test_ledger_node_run_profile_writes_pstats_when_the_replica_stops(
    initialised_network: LocalNetwork, tmp_path: Path
) -> None:
    """`ledger-node run --profile FILE` (the profile commands the README gives) leaves a pstats file after SIGINT."""
    config_path = initialised_network.replica_config_path(0)
    address = load_replica_config(config_path).network.replicas[0].client_address
    profile_path = tmp_path / "replica-0.pstats"
    process = await trio.lowlevel.open_process(
        [*NODE_COMMAND, "run", str(config_path), "--profile", str(profile_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(READY_DEADLINE_S):
            while True:  # until the replica serves clients
                try:
                    stream = await trio.open_tcp_stream(address.host, address.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        process.send_signal(signal.SIGINT)
        with trio.fail_after(READY_DEADLINE_S):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
    functions = {(Path(filename).name, name) for filename, _, name in pstats.Stats(str(profile_path)).stats}  # type: ignore[attr-defined]
    assert ("runtime.py", "_event_loop") in functions


async def test_ledger_bench_scenario_measures_throughput_while_a_traitor_attacks() -> None:
    """`--scenario NAME` starts the scenario's traitor processes and reports the attacked run against the fault-free one."""
    script = Path(sys.executable).with_name("ledger-bench")
    result = await run_command(
        [str(script), "--replicas", "4", "--duration", "2", "--warmup", "1", "--in-flight", "16", "--scenario", "wrong-replies", "--json"],
        deadline_s=BENCH_DEADLINE_S,
    )
    assert result.exit_code == 0, result.describe()
    report = json.loads(result.stdout)
    attack = report["scenario"]
    assert attack["name"] == "wrong-replies" and attack["replicas"] == 4
    assert attack["traitors"] == "replica 1: --traitor wrong_replies --traitor-seed 1"
    before, after = attack["fault_free_runs_transactions_per_second"]
    assert before == report["transactions_per_second"] and after > 0
    assert attack["fault_free_transactions_per_second"] == pytest.approx((before + after) / 2)
    assert attack["run"]["confirmed"] > 0, "a replica signing wrong replies does not stop clients from accepting"
    assert attack["fraction_of_fault_free"] == pytest.approx(attack["transactions_per_second"] / attack["fault_free_transactions_per_second"])


async def test_ledger_bench_refuses_a_scenario_beyond_f_before_starting_anything() -> None:
    script = Path(sys.executable).with_name("ledger-bench")
    result = await run_command([str(script), "--scenario", "silent-f-plus-one"], deadline_s=BENCH_DEADLINE_S)
    assert result.exit_code == 2, result.describe()
    assert "more than f = 1" in result.stderr and "Traceback" not in result.stderr
