"""`make bench`: start a local network, drive it with concurrent signed transactions, report throughput.

Runs `ledger-node init` and one `ledger-node run` per replica as child processes (as an operator
would), then submits put transactions from many accounts at once through the client library and
counts those confirmed by f+1 matching signed replies. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from client.library import ClientError, open_client
from ledger.crypto import SigningKey
from ledger.transactions import Put, sign_transaction

TEMPLATE = """\
[network]
id = "bench-{replicas}"
replicas = {replicas}
host = "127.0.0.1"
base_port = {base_port}

[protocol]
batch_size_max = {batch_size_max}
batch_wait_ms = {batch_wait_ms}
window_size = 64
checkpoint_interval = 128
"""


async def drive(config_path: Path, writers: int, duration_s: float, warmup_s: float) -> dict[str, float]:
    latencies: list[float] = []
    confirmed = 0
    errors = 0
    async with open_client(config_path) as client:
        await client.wait_until_ready(deadline_s=60)
        network = client.network.identity
        measuring = False

        async def writer(index: int) -> None:
            nonlocal confirmed, errors
            key = SigningKey.generate()
            nonce = 0
            while True:
                transaction = sign_transaction(network, key, nonce, Put(f"bench-{index}", str(nonce)))
                started = time.perf_counter()
                try:
                    await client.submit(transaction, deadline_s=30)
                except ClientError:
                    errors += 1
                    continue
                nonce += 1
                if measuring:
                    confirmed += 1
                    latencies.append(time.perf_counter() - started)

        async with trio.open_nursery() as nursery:
            for index in range(writers):
                nursery.start_soon(writer, index)
            await trio.sleep(warmup_s)
            measuring = True
            began = time.perf_counter()
            await trio.sleep(duration_s)
            elapsed = time.perf_counter() - began
            nursery.cancel_scope.cancel()
    latencies.sort()
    return {
        "transactions_per_second": confirmed / elapsed,
        "confirmed": confirmed,
        "latency_p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "latency_p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"),
        "client_errors": errors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--writers", type=int, default=200, help="concurrent accounts submitting (default: 200)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured duration (default: 15)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured warm-up (default: 3)")
    parser.add_argument("--batch-size-max", type=int, default=400)
    parser.add_argument("--batch-wait-ms", type=int, default=5)
    parser.add_argument("--base-port", type=int, default=7600)
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as temporary:
        directory = Path(temporary)
        template = directory / "bench.toml"
        template.write_text(
            TEMPLATE.format(
                replicas=arguments.replicas,
                base_port=arguments.base_port,
                batch_size_max=arguments.batch_size_max,
                batch_wait_ms=arguments.batch_wait_ms,
            )
        )
        network = directory / "net"
        subprocess.run(
            [sys.executable, "-m", "node.cli", "init", str(template), "--out", str(network)], check=True, stdout=subprocess.DEVNULL
        )
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--log-level", "warning", "run", str(network / f"replica-{index}.toml")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for index in range(arguments.replicas)
        ]
        try:
            print(
                f"bench: {arguments.replicas} replicas, {arguments.writers} writers, {arguments.seconds:g}s "
                f"(batches up to {arguments.batch_size_max}, wait {arguments.batch_wait_ms} ms), {os.cpu_count()} cores",
                flush=True,
            )
            result = trio.run(drive, network / "client.toml", arguments.writers, arguments.seconds, arguments.warmup)
        finally:
            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
    print(
        f"throughput {result['transactions_per_second']:.0f} tx/s ({result['confirmed']:.0f} confirmed), "
        f"latency p50 {result['latency_p50_ms']:.1f} ms, p99 {result['latency_p99_ms']:.1f} ms, "
        f"client retries {result['client_errors']:.0f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
