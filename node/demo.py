"""`ledger-node demo` (`make demo`): init a 4-replica network, run it, push transactions, verify, stop."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ledger.config import packaged_config, record_in_manifest

CLIENT = [sys.executable, "-m", "client.cli"]
NODE = [sys.executable, "-m", "node.cli"]


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _run(arguments: list[str], shown: list[str]) -> subprocess.CompletedProcess[str]:
    print("$ " + shlex.join(shown), flush=True)
    completed = subprocess.run(arguments, text=True, capture_output=True, check=False)
    output = (completed.stdout + completed.stderr).rstrip()
    if output:
        print(output, flush=True)
    if completed.returncode != 0:
        raise RuntimeError(f"`{shlex.join(shown)}` exited with code {completed.returncode}")
    return completed


def run_demo(directory: Path, base_port: int) -> int:
    client_config = str(directory / "client.toml")
    template = packaged_config("local-4.toml")
    _banner("1. create a 4-replica network (n = 3f + 1 with f = 1): keys and configs")
    # --force replaces only what an earlier init (or demo) wrote here; anything else makes init refuse.
    init = ["init", str(template), "--out", str(directory), "--force", "--base-port", str(base_port)]
    try:
        _run(NODE + init, ["ledger-node", *init])
    except RuntimeError as error:
        print(f"\ndemo FAILED: {error}", file=sys.stderr, flush=True)
        return 1

    _banner(f"2. start every replica as its own process: ledger-node up {directory}")
    network = subprocess.Popen(
        NODE + ["up", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert network.stdout is not None
        started = 0
        deadline = time.monotonic() + 60
        while started < 4 and time.monotonic() < deadline:
            line = network.stdout.readline()
            if not line:
                raise RuntimeError("the network stopped while starting; see the logs in " + str(directory / "logs"))
            print("  " + line.rstrip(), flush=True)
            started += line.startswith("replica ") and " pid " in line
        if started < 4:
            raise RuntimeError("the replicas did not all start within 60s")

        def client(*arguments: str) -> subprocess.CompletedProcess[str]:
            return _run(CLIENT + ["-c", client_config, *arguments], ["ledger-client", "-c", client_config, *arguments])

        _banner("3. every replica answers")
        client("status")
        _banner("4. a new account, then transfers and puts: each needs f+1 = 2 matching signed replies")
        _run(CLIENT + ["keygen", "--out", str(directory / "alice.key"), "--force"], ["ledger-client", "keygen", "--out", str(directory / "alice.key")])
        alice = str(directory / "alice.key")
        record_in_manifest(directory, ["alice.key"])  # so the next demo's `init --force` may replace it
        client("transfer", alice, "250")
        client("transfer", alice, "50")
        client("put", "greeting", "hello, byzantine world")
        client("put", "answer", "42")
        client("--key", alice, "transfer", str(directory / "client.key"), "30")
        client("--key", alice, "put", "owner", "alice")
        _banner("5. reads: a quorum (2f+1 = 3) of replicas must sign the same answer")
        client("balance", alice)
        client("get", "greeting")
        _banner("6. the blocks, each carrying the 2f+1 signed COMMITs that decided it")
        client("block", "1")
        client("block", "2")
        _banner("7. download replica 3's whole chain and check every link, certificate and state digest")
        client("verify", "--replica", "3")
        client("status")
    except RuntimeError as error:
        print(f"\ndemo FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        _banner("8. stop every replica (SIGTERM, as Ctrl-C would)")
        network.send_signal(signal.SIGTERM)
        try:
            remaining, _ = network.communicate(timeout=30)
            for line in (remaining or "").splitlines():
                print("  " + line, flush=True)
        except subprocess.TimeoutExpired:
            network.kill()
    print(
        f"\nThe chain is verified. Run the network yourself with `ledger-node up {directory}` and "
        f"`ledger-client -c {client_config} --help`.",
        flush=True,
    )
    return 0
