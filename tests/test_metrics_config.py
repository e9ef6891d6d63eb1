"""The [metrics] table of a replica's config: what `init` writes, and what loading refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ledger.config import (
    PORTS_PER_REPLICA,
    Address,
    ConfigError,
    load_client_config,
    load_replica_config,
    load_template,
    template_for,
    write_network,
)

BASE_PORT = 7100


@pytest.fixture(scope="module")
def network_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("metrics") / "net"
    write_network(template_for(4, base_port=BASE_PORT), out)
    return out


def edited(network_directory: Path, tmp_path: Path, old: str, new: str, replica_id: int = 1) -> Path:
    text = (network_directory / f"replica-{replica_id}.toml").read_text()
    assert old in text, old
    path = tmp_path / f"replica-{replica_id}.toml"  # a copy: the directory is shared with other tests
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("replica_count", [4, 7])
def test_init_gives_each_replica_a_metrics_port_after_every_peer_and_client_port(tmp_path: Path, replica_count: int) -> None:
    write_network(template_for(replica_count, base_port=BASE_PORT), tmp_path / "net")
    used: set[int] = set()
    for replica_id in range(replica_count):
        config = load_replica_config(tmp_path / "net" / f"replica-{replica_id}.toml")
        assert config.metrics_address == Address("127.0.0.1", BASE_PORT + 2 * replica_count + replica_id)
        used.add(config.metrics_address.port)
    for replica in config.network.replicas:
        used |= {replica.address.port, replica.client_address.port}
    assert used == set(range(BASE_PORT, BASE_PORT + PORTS_PER_REPLICA * replica_count))


def test_metrics_are_off_without_a_metrics_table(network_directory: Path, tmp_path: Path) -> None:
    path = edited(network_directory, tmp_path, "[metrics]\nhost = \"127.0.0.1\"\nport = 7109\n", "")
    assert load_replica_config(path).metrics_address is None


def test_metrics_host_defaults_to_loopback(network_directory: Path, tmp_path: Path) -> None:
    path = edited(network_directory, tmp_path, 'host = "127.0.0.1"\nport = 7109', "port = 7109")
    assert load_replica_config(path).metrics_address == Address("127.0.0.1", 7109)


def test_a_template_listing_addresses_writes_metrics_off(tmp_path: Path) -> None:
    template = tmp_path / "t.toml"
    addresses = ", ".join(f'"10.0.0.{index}:7100"' for index in range(1, 5))
    template.write_text(f'[network]\nid = "spread"\naddresses = [{addresses}]\n')
    write_network(load_template(template), tmp_path / "net")
    text = (tmp_path / "net" / "replica-0.toml").read_text()
    assert "# [metrics]" in text  # says how to turn it on
    assert load_replica_config(tmp_path / "net" / "replica-0.toml").metrics_address is None


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        pytest.param("port = 7109", "port = 7109\npath = \"/m\"", "metrics.path: unknown setting", id="unknown-key"),
        pytest.param("port = 7109", "port = 0", "metrics.port: 0 is outside [1, 65535]", id="port-zero"),
        pytest.param("port = 7109", "port = 65536", "metrics.port: 65536 is outside", id="port-too-large"),
        pytest.param("port = 7109", 'port = "7109"', "metrics.port: expected an integer", id="port-not-integer"),
        pytest.param("port = 7109\n", "\n", "metrics.port: missing", id="port-missing"),
        pytest.param('host = "127.0.0.1"', 'host = "bad host!"', "metrics.host", id="host-not-a-host"),
        pytest.param('host = "127.0.0.1"', "host = 5", "metrics.host: expected non-empty text", id="host-not-text"),
        # Its own client port clashes whatever host the metrics listen on.
        pytest.param("port = 7109", "port = 7103", "7103 is replica 1's client_address", id="own-client-port"),
        pytest.param('host = "127.0.0.1"\nport = 7109', 'host = "0.0.0.0"\nport = 7102', "7102 is replica 1's address", id="own-peer-port-any-host"),
        pytest.param("port = 7109", "port = 7104", "7104 is replica 2's address", id="another-replicas-peer-port"),
        pytest.param("port = 7109", "port = 7107", "7107 is replica 3's client_address", id="another-replicas-client-port"),
        pytest.param("[metrics]", "[metrics]\n[metrics.extra]", "metrics.extra: unknown setting", id="nested-table"),
    ],
)
def test_bad_metrics_settings_are_refused_naming_the_field(
    network_directory: Path, tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = edited(network_directory, tmp_path, old, new)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        load_replica_config(path)
    assert str(path) in str(raised.value)


def test_a_metrics_value_that_is_not_a_table_is_refused(network_directory: Path, tmp_path: Path) -> None:
    path = edited(network_directory, tmp_path, '[metrics]\nhost = "127.0.0.1"\nport = 7109\n', "")
    path.write_text("metrics = 7109\n" + path.read_text())
    with pytest.raises(ConfigError, match=re.escape("[metrics] must be a table")):
        load_replica_config(path)


def test_another_replicas_port_on_another_host_is_allowed(network_directory: Path, tmp_path: Path) -> None:
    # Replica 2 listens on 127.0.0.1:7104; metrics on another address of this host do not clash.
    path = edited(network_directory, tmp_path, 'host = "127.0.0.1"\nport = 7109', 'host = "127.0.0.2"\nport = 7104')
    assert load_replica_config(path).metrics_address == Address("127.0.0.2", 7104)


def test_a_client_config_refuses_a_metrics_table(network_directory: Path, tmp_path: Path) -> None:
    text = (network_directory / "client.toml").read_text()
    path = tmp_path / "client.toml"
    path.write_text(text.replace("[client]", "[metrics]\nport = 7200\n\n[client]", 1))
    with pytest.raises(ConfigError, match="metrics: unknown setting"):
        load_client_config(path)


def test_a_base_port_without_room_for_the_metrics_ports_is_refused() -> None:
    # 4 replicas need 12 ports: 65535 - 12 is the highest base that fits.
    template_for(4, base_port=65535 - 12)
    with pytest.raises(ConfigError, match="3 ports each"):
        template_for(4, base_port=65535 - 11)
