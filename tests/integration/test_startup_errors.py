"""`ledger-node run` with a wrong key file or a missing config: one clear line on stderr, non-zero exit."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .local_network import NODE_COMMAND, LocalNetwork, run_command

pytestmark = pytest.mark.integration

RUN_DEADLINE_S = 30.0


def use_another_replicas_key(network: LocalNetwork) -> Path:
    shutil.copyfile(network.replica_key_path(1), network.replica_key_path(0))
    return network.replica_config_path(0)


def corrupt_the_key_file(network: LocalNetwork) -> Path:
    network.replica_key_path(0).write_text("this is not a key\n")
    return network.replica_config_path(0)


def remove_the_key_file(network: LocalNetwork) -> Path:
    network.replica_key_path(0).unlink()
    return network.replica_config_path(0)


def name_a_missing_config(network: LocalNetwork) -> Path:
    return network.directory / "replica-99.toml"


def break_the_config(network: LocalNetwork) -> Path:
    path = network.replica_config_path(0)
    path.write_text(path.read_text() + "\nthis line = is [not toml\n")
    return path


# (how to break the replica, a phrase its error line must contain)
BREAKAGES: dict[str, tuple[Callable[[LocalNetwork], Path], str]] = {
    "another-replicas-key": (use_another_replicas_key, "is not replica 0's key"),
    "corrupt-key-file": (corrupt_the_key_file, "not a pbft-ledger key file"),
    "missing-key-file": (remove_the_key_file, "cannot read key file"),
    "missing-config": (name_a_missing_config, "no such file"),
    "config-not-toml": (break_the_config, "not valid TOML"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
async def test_run_with_a_bad_key_or_config_prints_one_line_and_fails(initialised_network: LocalNetwork, breakage: str) -> None:
    make_broken, phrase = BREAKAGES[breakage]
    config_path = make_broken(initialised_network)
    result = await run_command([*NODE_COMMAND, "run", str(config_path)], RUN_DEADLINE_S)
    assert result.exit_code != 0, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("ledger-node: "), result.describe()
    assert phrase in lines[0], result.describe()
    assert "Traceback" not in result.stderr + result.stdout
    # The replica never got as far as creating its store.
    assert not initialised_network.store_path(0).exists()
