"""`ledger-node check`: audit stopped replicas' stores from genesis (a pruned one from its base), with progress and a one-line verdict each."""

from __future__ import annotations

import time
from pathlib import Path

from ledger.config import ConfigError, ReplicaConfig, load_replica_config
from ledger.restore import audit_store
from ledger.storage import BlockStore, DataDirectoryLock, StoreError
from node.launcher import find_replica_configs

STORE_FILE_NAME = "ledger.sqlite3"


def check_replica(config: ReplicaConfig) -> bool:
    """Audit one replica's store; print progress and its verdict. True if it is sound."""
    replica_id = config.replica_id
    path = config.data_dir / STORE_FILE_NAME
    if not path.is_file():
        print(f"replica {replica_id}: MISSING: no store at {path} (never started, or removed)", flush=True)
        return False
    try:
        # Held for the whole audit: the replica cannot start (and write) while it runs.
        lock = DataDirectoryLock(config.data_dir)
    except StoreError as error:
        print(f"replica {replica_id}: NOT CHECKED: {error}", flush=True)
        return False
    started_s = time.monotonic()
    try:
        store = BlockStore.open(path, config.network.genesis_hash, verify=False)
        try:

            def progress(done: int, total: int) -> None:
                print(f"replica {replica_id}: checked {done}/{total} blocks", flush=True)

            report = audit_store(store, config.network, progress)
        finally:
            store.close()
    except StoreError as error:
        print(f"replica {replica_id}: DAMAGED: {error}", flush=True)
        return False
    finally:
        lock.release()
    elapsed = f"in {time.monotonic() - started_s:.1f} s"
    if report.base_height:
        # Pruned (retain_blocks) or started from a snapshot: what is below the base is not kept.
        print(
            f"replica {replica_id}: OK, checked from block {report.base_height} (the store keeps no blocks below it: "
            f"pruned or started from a snapshot): {report.blocks} blocks, {report.transactions} transactions, every link, "
            f"certificate and index entry checked; state at height {report.state_height} ({report.state_entries} entries) "
            f"matches its block's digest; {report.blocks_re_executed} later blocks re-executed from it, {elapsed}",
            flush=True,
        )
        return True
    state = "no durable state yet" if report.state_height is None else f"state at height {report.state_height} ({report.state_entries} entries) matches"
    print(
        f"replica {replica_id}: OK: {report.blocks} blocks, {report.transactions} transactions re-executed from genesis, "
        f"{state}, {elapsed}",
        flush=True,
    )
    return True


def run_check_main(target: Path, replica: int | None) -> int:
    """Exit 0 if every store checked is sound, 1 if one is damaged or in use; ConfigError for a bad target."""
    if target.is_dir():
        configs = find_replica_configs(target, None)
        if replica is not None:
            configs = [config for config in configs if config.replica_id == replica]
            if not configs:
                raise ConfigError(f"--replica {replica}: no such replica in {target}")
    elif target.is_file():
        configs = [load_replica_config(target)]
        if replica is not None and replica != configs[0].replica_id:
            raise ConfigError(f"--replica {replica}: {target} is replica {configs[0].replica_id}'s config")
    else:
        raise ConfigError(f"{target}: no such replica config or network directory")
    results = [check_replica(config) for config in configs]
    return 0 if all(results) else 1
