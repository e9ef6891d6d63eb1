"""Tests of `ledger-node init` (run as a real process) and of loading the configs it writes."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.config import ConfigError, load_client_config, load_replica_config
from ledger.crypto import read_key_file

REPOSITORY = Path(__file__).resolve().parent.parent
CONFIGS = REPOSITORY / "configs"

VALID_TEMPLATE = """\
[network]
id = "template-net"
replicas = 4
host = "127.0.0.1"
base_port = 7300

[protocol]
batch_size_max = 100
window_size = 32

[genesis]
client_balance = 500
"""


def run_init(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "init", *map(str, arguments)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ledger-node: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def expected_files(replica_count: int) -> set[str]:
    names = {"client.toml", "client.key", ".init-manifest.json"}
    for index in range(replica_count):
        names |= {f"replica-{index}.toml", f"replica-{index}.key"}
    return names


def check_network_directory(directory: Path, replica_count: int, faults: int, quorum: int, network_id: str) -> None:
    """Every file is there, keys are private, configs load and agree with one another and the keys."""
    assert {path.name for path in directory.iterdir()} == expected_files(replica_count)
    for key_path in directory.glob("*.key"):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600, key_path
    replica_public_keys = [read_key_file(directory / f"replica-{index}.key").public_key for index in range(replica_count)]
    assert len(set(replica_public_keys)) == replica_count
    client_public_key = read_key_file(directory / "client.key").public_key

    networks = []
    for index in range(replica_count):
        config = load_replica_config(directory / f"replica-{index}.toml")
        assert config.replica_id == index
        assert config.key_path == directory / f"replica-{index}.key"
        assert config.data_dir == directory / "data" / f"replica-{index}"
        networks.append(config.network)
    client = load_client_config(directory / "client.toml")
    assert client.key_path == directory / "client.key"
    networks.append(client.network)

    for network in networks:
        assert network.network_id == network_id
        assert network.replica_count == replica_count
        assert network.replica_keys == tuple(replica_public_keys)
        assert network.faults_tolerated == faults
        assert network.quorum == quorum
        assert network.reply_quorum == faults + 1
        assert client_public_key in network.genesis_balances
        assert network.genesis_hash == networks[0].genesis_hash
        endpoints = [str(replica.address) for replica in network.replicas]
        endpoints += [str(replica.client_address) for replica in network.replicas]
        assert len(set(endpoints)) == 2 * replica_count


def test_init_local_4(tmp_path: Path) -> None:
    out = tmp_path / "net4"
    result = run_init(CONFIGS / "local-4.toml", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "tolerates f=1" in result.stdout
    check_network_directory(out, replica_count=4, faults=1, quorum=3, network_id="local-4")
    network = load_replica_config(out / "replica-2.toml").network
    assert [replica.address.port for replica in network.replicas] == [7100, 7102, 7104, 7106]
    assert [replica.client_address.port for replica in network.replicas] == [7101, 7103, 7105, 7107]
    assert network.protocol.batch_size_max == 400
    assert network.protocol.frame_size_max == 8388608
    assert list(network.genesis_balances.values()) == [1_000_000]


def test_init_local_7(tmp_path: Path) -> None:
    out = tmp_path / "net7"
    result = run_init(CONFIGS / "local-7.toml", "--out", out)
    assert result.returncode == 0, result.stderr
    check_network_directory(out, replica_count=7, faults=2, quorum=5, network_id="local-7")
    network = load_client_config(out / "client.toml").network
    assert network.replicas[0].address.port == 7200
    assert network.primary(0) == 0
    assert network.primary(8) == 1


def test_init_with_replica_count_5(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "net5"
    result = run_init("--replicas", "5", "--out", out)
    assert result.returncode == 0, result.stderr
    # n = 5 still tolerates one fault, but a quorum is ceil((n + f + 1) / 2) = 4, not 2f + 1 = 3.
    check_network_directory(out, replica_count=5, faults=1, quorum=4, network_id="local-5")


def test_init_from_a_custom_template_with_overrides(tmp_path: Path) -> None:
    template = tmp_path / "template.toml"
    template.write_text(VALID_TEMPLATE)
    out = tmp_path / "net"
    result = run_init(template, "--out", out, "--host", "127.0.0.2", "--base-port", "9100")
    assert result.returncode == 0, result.stderr
    check_network_directory(out, replica_count=4, faults=1, quorum=3, network_id="template-net")
    network = load_replica_config(out / "replica-0.toml").network
    assert [str(replica.address) for replica in network.replicas] == [
        "127.0.0.2:9100",
        "127.0.0.2:9102",
        "127.0.0.2:9104",
        "127.0.0.2:9106",
    ]
    assert network.protocol.batch_size_max == 100
    assert network.protocol.window_size == 32
    assert list(network.genesis_balances.values()) == [500]


def test_init_from_a_template_with_explicit_addresses(tmp_path: Path) -> None:
    template = tmp_path / "hosts.toml"
    addresses = ", ".join(f'"10.0.0.{index}:7100"' for index in range(1, 5))
    template.write_text(f'[network]\nid = "hosts"\naddresses = [{addresses}]\n')
    out = tmp_path / "net"
    assert run_init(template, "--out", out).returncode == 0
    network = load_replica_config(out / "replica-3.toml").network
    assert str(network.replicas[3].address) == "10.0.0.4:7100"
    assert str(network.replicas[3].client_address) == "10.0.0.4:7101"


def test_re_init_is_refused_without_force_and_works_with_it(tmp_path: Path) -> None:
    out = tmp_path / "net"
    assert run_init("--replicas", "4", "--out", out).returncode == 0
    first_key = (out / "replica-0.key").read_text()

    line = assert_one_line_failure(run_init("--replicas", "4", "--out", out))
    assert "already exists" in line and "--force" in line
    assert (out / "replica-0.key").read_text() == first_key

    # What a network run leaves behind (stores, logs) belongs to the network init wrote.
    (out / "data" / "replica-0").mkdir(parents=True)
    (out / "data" / "replica-0" / "ledger.sqlite3").write_bytes(b"old chain")
    (out / "logs").mkdir()
    (out / "logs" / "replica-0.log").write_text("old log")
    result = run_init("--replicas", "7", "--out", out, "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "replica-0.key").read_text() != first_key
    check_network_directory(out, replica_count=7, faults=2, quorum=5, network_id="local-7")


def test_force_refuses_a_directory_holding_files_init_did_not_write(tmp_path: Path) -> None:
    """Regression: `init --force` deleted whatever the directory held (a user's files were gone)."""
    out = tmp_path / "net"
    assert run_init("--replicas", "4", "--out", out).returncode == 0
    (out / "notes.txt").write_text("my notes")
    line = assert_one_line_failure(run_init("--replicas", "4", "--out", out, "--force"))
    assert "notes.txt" in line and "not written by" in line
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "replica-0.key").exists()


def test_force_refuses_a_directory_init_never_wrote(tmp_path: Path) -> None:
    """Regression: `init --out ~/project --force` would have emptied the project."""
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')\n")
    (out / "README").write_text("mine")
    line = assert_one_line_failure(run_init("--replicas", "4", "--out", out, "--force"))
    assert "not written by `ledger-node init`" in line
    assert (out / "src" / "main.py").read_text() == "print('mine')\n"
    assert (out / "README").read_text() == "mine"


def test_force_refuses_unknown_files_among_the_stores(tmp_path: Path) -> None:
    out = tmp_path / "net"
    assert run_init("--replicas", "4", "--out", out).returncode == 0
    (out / "data" / "backup").mkdir(parents=True)
    (out / "data" / "backup" / "chain.tar").write_bytes(b"precious")
    line = assert_one_line_failure(run_init("--replicas", "4", "--out", out, "--force"))
    assert "backup" in line
    assert (out / "data" / "backup" / "chain.tar").read_bytes() == b"precious"


def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert run_init("--replicas", "4", "--out", out).returncode == 0
    assert {path.name for path in out.iterdir()} == expected_files(4)


def template_with(replace: str, by: str) -> str:
    assert replace in VALID_TEMPLATE
    return VALID_TEMPLATE.replace(replace, by)


@pytest.mark.parametrize(
    ("template_text", "expected"),
    [
        pytest.param('[network\nid = "x"\n', "not valid TOML", id="bad-toml"),
        pytest.param(template_with('id = "template-net"\n', ""), "network.id: missing", id="missing-network-id"),
        pytest.param(template_with('id = "template-net"', "id = 7"), "network.id", id="network-id-not-text"),
        pytest.param("[protocol]\nwindow_size = 3\n", "[network] must be a table", id="missing-network-table"),
        pytest.param(template_with("replicas = 4", "replicas = 3"), "network.replicas", id="three-replicas"),
        pytest.param(template_with("replicas = 4", "replicas = 65"), "network.replicas", id="too-many-replicas"),
        pytest.param(
            '[network]\nid = "x"\naddresses = ["10.0.0.1:7100", "10.0.0.2", "10.0.0.3:7100", "10.0.0.4:7100"]\n',
            "network.addresses[1]",
            id="address-without-port",
        ),
        pytest.param(
            '[network]\nid = "x"\naddresses = ["10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:99999", "10.0.0.4:7100"]\n',
            "network.addresses[2]",
            id="address-port-out-of-range",
        ),
        pytest.param(
            '[network]\nid = "x"\naddresses = [":7100", "10.0.0.2:7100", "10.0.0.3:7100", "10.0.0.4:7100"]\n',
            "network.addresses[0]",
            id="address-without-host",
        ),
        pytest.param(
            '[network]\nid = "x"\naddresses = ["10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:7100"]\n',
            "network.addresses",
            id="three-addresses",
        ),
        pytest.param('[network]\nid = "x"\naddresses = "10.0.0.1:7100"\n', "network.addresses", id="addresses-not-list"),
        pytest.param(template_with("[protocol]\n", "[protocol]\nbatch_size = 5\n"), "protocol.batch_size: unknown setting", id="unknown-protocol-setting"),
        pytest.param(template_with("batch_size_max = 100", "batch_size_max = 0"), "protocol.batch_size_max", id="value-below-range"),
        pytest.param(template_with("window_size = 32", "window_size = 10001"), "protocol.window_size", id="value-above-range"),
        pytest.param(template_with("window_size = 32", 'window_size = "32"'), "protocol.window_size", id="value-not-integer"),
        pytest.param(template_with("window_size = 32", "window_size = true"), "protocol.window_size", id="value-boolean"),
        pytest.param(template_with("base_port = 7300", "base_port = 65530"), "network.base_port", id="base-port-too-high"),
        pytest.param(template_with("client_balance = 500", "client_balance = -1"), "genesis.client_balance", id="negative-balance"),
        pytest.param(
            VALID_TEMPLATE + '[[genesis.accounts]]\npublic_key = "abcd"\nbalance = 5\n',
            "genesis.accounts[0].public_key",
            id="bad-genesis-key",
        ),
    ],
)
def test_a_malformed_template_gives_one_line_and_fails(tmp_path: Path, template_text: str, expected: str) -> None:
    template = tmp_path / "template.toml"
    template.write_text(template_text)
    out = tmp_path / "net"
    line = assert_one_line_failure(run_init(template, "--out", out))
    assert expected in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        pytest.param(("--replicas", "3"), "at least 4", id="three-replicas"),
        pytest.param(("--replicas", "1"), "at least 4", id="one-replica"),
        pytest.param(("--replicas", "65"), "at most 64", id="too-many-replicas"),
        pytest.param(("--replicas", "4", "--base-port", "65530"), "--base-port", id="base-port-too-high"),
        pytest.param((), "either a TEMPLATE", id="no-template-nor-count"),
        pytest.param((str(CONFIGS / "local-4.toml"), "--replicas", "4"), "either a TEMPLATE", id="template-and-count"),
        pytest.param(("does-not-exist.toml",), "no such file", id="missing-template"),
    ],
)
def test_bad_init_arguments_give_one_line_and_fail(tmp_path: Path, arguments: tuple[str, ...], expected: str) -> None:
    out = tmp_path / "net"
    line = assert_one_line_failure(run_init(*arguments, "--out", out))
    assert expected in line
    assert not out.exists()


def test_init_into_an_existing_file_gives_one_line(tmp_path: Path) -> None:
    out = tmp_path / "a-file"
    out.write_text("not a directory")
    assert_one_line_failure(run_init("--replicas", "4", "--out", out))


def test_init_never_writes_a_config_it_cannot_load_port_65535(tmp_path: Path) -> None:
    template = tmp_path / "template.toml"
    addresses = '["10.0.0.1:7100", "10.0.0.2:7100", "10.0.0.3:7100", "10.0.0.4:65535"]'
    template.write_text(f'[network]\nid = "edge"\naddresses = {addresses}\n')
    out = tmp_path / "net"
    result = run_init(template, "--out", out)
    if result.returncode != 0:
        assert_one_line_failure(result)
        return
    load_replica_config(out / "replica-0.toml")


def test_init_never_writes_a_config_it_cannot_load_control_characters(tmp_path: Path) -> None:
    template = tmp_path / "template.toml"
    template.write_text('[network]\nid = "two\\nlines"\nreplicas = 4\n')
    out = tmp_path / "net"
    result = run_init(template, "--out", out)
    if result.returncode != 0:
        assert_one_line_failure(result)
        return
    load_client_config(out / "client.toml")


# ---- loading a config with a wrong field names the field ----


@pytest.fixture(scope="module")
def network_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loading") / "net"
    result = run_init("--replicas", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    return out


def edited_copy(source: Path, destination: Path, pattern: str, replacement: str) -> Path:
    text = source.read_text()
    edited, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert count == 1, pattern
    destination.write_text(edited)
    return destination


@pytest.mark.parametrize(
    ("pattern", "replacement", "field"),
    [
        pytest.param(r"^window_size = \d+", "window_size = 0", "protocol.window_size", id="protocol-out-of-range"),
        pytest.param(r"^batch_wait_ms = \d+", 'batch_wait_ms = "5"', "protocol.batch_wait_ms", id="protocol-not-integer"),
        pytest.param(r"^batch_wait_ms = \d+", "batch_waiting = 5", "protocol.batch_waiting: unknown setting", id="protocol-unknown"),
        pytest.param(r'^address = "127.0.0.1:7104"', 'address = "127.0.0.1"', "replicas[2].address", id="address-without-port"),
        pytest.param(r'^client_address = "127.0.0.1:7103"', 'client_address = "127.0.0.1:0"', "replicas[1].client_address", id="client-port-zero"),
        pytest.param(r'^public_key = "[0-9a-f]{4}', 'public_key = "zzzz', "replicas[0].public_key", id="public-key-not-hex"),
        pytest.param(r"^id = 3$", "id = 2", "replicas[3].id", id="replica-ids-out-of-order"),
        pytest.param(r"^\[replica\]\nid = 1", "[replica]\nid = 4", "replica.id", id="own-id-out-of-range"),
        pytest.param(r"^\[replica\]\nid = 1\n", "[replica]\n", "replica.id: missing", id="own-id-missing"),
        pytest.param(r'^key_file = "replica-1.key"', 'key_file = ""', "replica.key_file", id="key-file-empty"),
        pytest.param(r'^id = "local-4"', "id = 4", "network.id", id="network-id-not-text"),
        pytest.param(r"^balance = \d+", "balance = -5", "genesis.accounts[0].balance", id="negative-genesis-balance"),
    ],
)
def test_a_wrong_field_is_named_in_the_config_error(
    network_directory: Path, tmp_path: Path, pattern: str, replacement: str, field: str
) -> None:
    config = edited_copy(network_directory / "replica-1.toml", tmp_path / "replica-1.toml", pattern, replacement)
    with pytest.raises(ConfigError, match=re.escape(field)) as raised:
        load_replica_config(config)
    assert str(config) in str(raised.value)


def test_replicas_sharing_a_key_are_refused(network_directory: Path, tmp_path: Path) -> None:
    text = (network_directory / "replica-0.toml").read_text()
    keys = re.findall(r'^public_key = "([0-9a-f]{64})"', text, flags=re.MULTILINE)
    config = tmp_path / "replica-0.toml"
    config.write_text(text.replace(keys[1], keys[0]))
    with pytest.raises(ConfigError, match="share a public key"):
        load_replica_config(config)


def test_client_config_errors_name_the_field(network_directory: Path, tmp_path: Path) -> None:
    config = edited_copy(network_directory / "client.toml", tmp_path / "client.toml", r'^key_file = "client.key"', "key_file = 5")
    with pytest.raises(ConfigError, match=re.escape("client.key_file")):
        load_client_config(config)
    with pytest.raises(ConfigError, match="no such file"):
        load_client_config(tmp_path / "absent.toml")
    (tmp_path / "broken.toml").write_text("[network\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_replica_config(tmp_path / "broken.toml")


def test_init_writes_an_ipv6_host_in_brackets_and_loads_it_back(tmp_path: Path) -> None:
    """Regression: `--host ::1` was written as "::1:7100", which no one can tell apart from a port."""
    out = tmp_path / "net6"
    result = run_init("--replicas", "4", "--out", out, "--host", "::1", "--base-port", "7400")
    assert result.returncode == 0, result.stderr
    assert 'address = "[::1]:7400"' in (out / "replica-0.toml").read_text()
    replica = load_replica_config(out / "replica-0.toml").network.replicas[0]
    assert (replica.address.host, replica.address.port, replica.client_address.port) == ("::1", 7400, 7401)


def test_overrides_of_a_template_listing_addresses_are_refused(tmp_path: Path) -> None:
    """Regression: --host and --base-port were silently ignored for a template with addresses."""
    template = tmp_path / "hosts.toml"
    addresses = ", ".join(f'"10.0.0.{index}:7100"' for index in range(1, 5))
    template.write_text(f'[network]\nid = "hosts"\naddresses = [{addresses}]\n')
    line = assert_one_line_failure(run_init(template, "--out", tmp_path / "net", "--base-port", "9000"))
    assert "cannot override" in line
    assert not (tmp_path / "net").exists()


@pytest.mark.parametrize("host", ['a"b', "", "two words", "bad_host!"])
def test_a_template_host_that_is_no_host_is_refused(tmp_path: Path, host: str) -> None:
    template = tmp_path / "t.toml"
    template.write_text(VALID_TEMPLATE.replace('host = "127.0.0.1"', f"host = {host!r}".replace("'", '"') if '"' not in host else "host = 'a\"b'"))
    line = assert_one_line_failure(run_init(template, "--out", tmp_path / "net"))
    assert "network.host" in line


@pytest.mark.parametrize(
    ("replace", "by", "named"),
    [
        ("base_port = 7300", "base-port = 7300", "network.base-port"),
        ("client_balance = 500", "client_balance = 500\nclient_balanse = 7", "genesis.client_balanse"),
        ("[genesis]", "[genesys]\nx = 1\n[genesis]", "genesys"),
    ],
)
def test_unknown_template_keys_are_refused(tmp_path: Path, replace: str, by: str, named: str) -> None:
    """Regression: unknown keys were refused in [protocol] but silently ignored elsewhere."""
    template = tmp_path / "t.toml"
    template.write_text(template_with(replace, by))
    line = assert_one_line_failure(run_init(template, "--out", tmp_path / "net"))
    assert named in line and "unknown" in line, line


@pytest.mark.parametrize(
    ("replace", "by", "named"),
    [
        ('data_dir = "data/replica-0"', 'dta_dir = "elsewhere"', "replica.dta_dir"),
        ("[[replicas]]\nid = 0\n", "[[replicas]]\nid = 0\nweight = 2\n", "replicas[0].weight"),
        ('[network]\nid = "local-4"', '[network]\nid = "local-4"\nname = "x"', "network.name"),
    ],
)
def test_unknown_config_keys_are_refused(network_directory: Path, tmp_path: Path, replace: str, by: str, named: str) -> None:
    text = (network_directory / "replica-0.toml").read_text()
    assert replace in text
    path = tmp_path / "replica-0.toml"  # a copy: the directory is shared with other tests
    path.write_text(text.replace(replace, by, 1))
    with pytest.raises(ConfigError, match=re.escape(named) + ".*unknown"):
        load_replica_config(path)


# ---- [storage] retain_blocks: block pruning, off unless asked for ----


@pytest.fixture(scope="module")
def storage_network(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ledger.config import template_for, write_network

    out = tmp_path_factory.mktemp("storage") / "net"
    write_network(template_for(4, base_port=7400), out)
    return out


def with_storage_table(network: Path, tmp_path: Path, table: str) -> Path:
    path = tmp_path / "replica-1.toml"
    path.write_text(table + "\n" + (network / "replica-1.toml").read_text())
    return path


def test_a_replica_is_an_archive_unless_retain_blocks_is_set(storage_network: Path, tmp_path: Path) -> None:
    assert load_replica_config(storage_network / "replica-1.toml").retain_blocks is None
    assert load_replica_config(with_storage_table(storage_network, tmp_path, "[storage]\n")).retain_blocks is None
    assert load_replica_config(with_storage_table(storage_network, tmp_path, "[storage]\nretain_blocks = 1000\n")).retain_blocks == 1000


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[storage]\nretain_blocks = 0\n", "storage.retain_blocks: 0 is outside"),
        ("[storage]\nretain_blocks = -5\n", "storage.retain_blocks: -5 is outside"),
        ('[storage]\nretain_blocks = "100"\n', "storage.retain_blocks: expected an integer"),
        ("[storage]\nretain_blocks = true\n", "storage.retain_blocks: expected an integer"),
        ("[storage]\nretain_blocks = 1.5\n", "storage.retain_blocks: expected an integer"),
        ("[storage]\nretain_block = 100\n", "storage.retain_block: unknown setting"),
        ("storage = 100\n", "[storage] must be a table"),
    ],
)
def test_a_bad_retain_blocks_is_refused_naming_the_field(storage_network: Path, tmp_path: Path, table: str, message: str) -> None:
    path = with_storage_table(storage_network, tmp_path, table)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_replica_config(path)


def test_a_client_config_refuses_a_storage_table(storage_network: Path, tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    path.write_text("[storage]\nretain_blocks = 10\n\n" + (storage_network / "client.toml").read_text())
    with pytest.raises(ConfigError, match="storage: unknown setting"):
        load_client_config(path)
