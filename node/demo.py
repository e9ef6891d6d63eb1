"""`ledger-node demo` (`make demo`): init a 4-replica network, run it, push transactions, verify, attack it, stop."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


TRAITOR = "equivocating_primary"


class Network:
    """One `ledger-node up DIR` child process, its start-up lines shown, stopped with SIGTERM."""

    def __init__(self, directory: Path, traitor_arguments: list[str]) -> None:
        self.directory = directory
        shown = ["ledger-node", "up", str(directory), *traitor_arguments]
        print("$ " + shlex.join(shown), flush=True)
        self.process = subprocess.Popen(
            NODE + ["up", str(directory), *traitor_arguments], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_started(self, replicas: int, deadline_s: float = 60.0) -> None:
        assert self.process.stdout is not None
        started = 0
        deadline = time.monotonic() + deadline_s
        while started < replicas and time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the network stopped while starting; see the logs in " + str(self.directory / "logs"))
            print("  " + line.rstrip(), flush=True)
            started += line.startswith("replica ") and " pid " in line
        if started < replicas:
            raise RuntimeError(f"the replicas did not all start within {deadline_s:g}s")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            remaining, _ = self.process.communicate(timeout=30)
            for line in (remaining or "").splitlines():
                print("  " + line, flush=True)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _honest_agreement(client_config: str, honest: list[int], deadline_s: float = 15.0) -> dict[str, Any]:
    """The honest replicas' status once they agree on height and last block (or the last one seen)."""
    deadline = time.monotonic() + deadline_s
    while True:
        completed = subprocess.run(CLIENT + ["-c", client_config, "status", "--json"], text=True, capture_output=True, check=False)
        replicas = {entry["replica"]: entry for entry in json.loads(completed.stdout)["replicas"]} if completed.returncode == 0 else {}
        rows = [replicas[replica_id] for replica_id in honest if replicas.get(replica_id, {}).get("reachable")]
        agreed = len(rows) == len(honest) and len({(row["height"], row["last_block_hash"]) for row in rows}) == 1
        if agreed or time.monotonic() > deadline:
            return {"agreed": agreed, "rows": rows}
        time.sleep(0.2)


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
    network = Network(directory, [])
    try:
        network.wait_started(4)

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

        _banner(f"8. an attack: restart the network with replica 0, the primary, as a traitor ({TRAITOR})")
        print(
            "Replica 0 keeps its valid key, so every message it sends is validly signed; it sends each\n"
            "backup a different batch for the same slot. Signature checks cannot stop that: the protocol must.",
            flush=True,
        )
        network.stop()
        network = Network(directory, ["--traitor", f"0={TRAITOR}"])
        network.wait_started(4)
        _banner("9. transactions still commit: no batch gets 2f+1 PREPAREs, so the backups vote replica 0 out")
        client("put", "under-attack", "still committing")
        client("--key", alice, "transfer", str(directory / "client.key"), "5")
        client("get", "under-attack")
        client("status")
        _banner("10. what the honest replicas caught: replica 0's conflicting signed votes, checkable by anyone")
        client("evidence", "--replica", "0")
        _banner("11. the honest replicas' chains still verify from genesis")
        client("verify", "--replica", "3")
        honest = [1, 2, 3]
        agreement = _honest_agreement(client_config, honest)
        rows = agreement["rows"]
        views = sorted({row["view"] for row in rows})
        evidence = max((row["evidence"] for row in rows), default=0)
        _banner("verdict")
        if agreement["agreed"]:
            print(f"  safety    holds: replicas 1, 2 and 3 agree on block {rows[0]['height']} ({rows[0]['last_block_hash'][:16]})", flush=True)
        else:
            print("  safety    the honest replicas did not settle on one height in time (see status above)", flush=True)
        print("  liveness  holds: every transaction above was confirmed by f+1 matching signed replies", flush=True)
        print(f"  view      honest replicas are in view {', '.join(map(str, views))} (view 0's primary was replica 0)", flush=True)
        if evidence:
            print(f"  evidence  an honest replica keeps {evidence} proof(s) that replica 0 signed two conflicting messages", flush=True)
        else:
            print("  evidence  none this run: an equivocation is caught only where one replica sees both messages", flush=True)
        print("  Run more attacks, and what breaks with f+1 traitors: ledger-scenario list", flush=True)
    except RuntimeError as error:
        print(f"\ndemo FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        _banner("12. stop every replica (SIGTERM, as Ctrl-C would)")
        network.stop()
    print(
        f"\nThe chain is verified. Run the network yourself with `ledger-node up {directory}` and "
        f"`ledger-client -c {client_config} --help`.",
        flush=True,
    )
    return 0
