"""Network, replica and client configuration: loading with validation, and generating a network."""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ledger import sizes
from ledger.blocks import REPLICAS_MAX, genesis_hash
from ledger.crypto import NetworkIdentity, SigningKey, parse_public_key, write_key_file
from ledger.encoding import ENCODED_SIZE_MAX
from ledger.messages import PREPARED_CERTIFICATES_MAX

REPLICAS_MIN = 4
NETWORK_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HOST_LABEL_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Transfers conserve the total, so bounding the genesis total bounds every balance forever.
SUPPLY_MAX = 2**62
# Metrics and /health listen on loopback unless a replica's [metrics] says otherwise.
METRICS_HOST_DEFAULT = "127.0.0.1"
RETAIN_BLOCKS_MAX = 2**62  # [storage] retain_blocks: any positive height fits (SQLite integers are 64-bit)


class ConfigError(ValueError):
    """A configuration is invalid; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        # An IPv6 host is written in brackets, so the port stays unambiguous: [::1]:7100.
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    replica_id: int
    public_key: bytes
    address: Address
    client_address: Address


@dataclass(frozen=True, slots=True)
class ProtocolSettings:
    # 400 transactions of the largest valid size make a block of 7.4 MB: it fits the 8 MiB frame.
    batch_size_max: int = 400
    batch_wait_ms: int = 5
    window_size: int = 64
    request_timeout_ms: int = 2000
    view_change_timeout_ms: int = 3000
    checkpoint_interval: int = 64
    status_interval_ms: int = 500
    frame_size_max: int = 8 * 1024 * 1024
    client_connections_max: int = 256
    client_connections_per_address_max: int = 16
    client_first_frame_timeout_ms: int = 5_000
    client_idle_timeout_ms: int = 300_000
    # A backup refuses a PRE-PREPARE whose batch timestamp lies further than this from its own
    # clock: a primary cannot stamp blocks with whatever time it likes (0, 2**63 - 1, last year).
    clock_skew_max_ms: int = 15_000
    # A backup suspects a primary that leaves the requests it was sent unordered this long while
    # it had room to propose (node/ordering_monitor.py): the most a slow primary can add to each
    # request. 0 turns the watch off (then only the request timer replaces a primary).
    ordering_timeout_ms: int = 500
    # A replica whose store may start from a snapshot (an empty one, or one that already does)
    # and that is more than this many blocks behind the newest stable checkpoint joins by state
    # sync (node/state_join.py) instead of replaying every block. A local choice: not compared
    # between replicas at the handshake.
    state_sync_distance: int = 256


_PROTOCOL_LIMITS: dict[str, tuple[int, int]] = {
    "batch_size_max": (1, 10_000),
    "batch_wait_ms": (0, 60_000),
    "window_size": (1, 10_000),
    "request_timeout_ms": (10, 600_000),
    "view_change_timeout_ms": (10, 600_000),
    "checkpoint_interval": (1, 100_000),
    "status_interval_ms": (10, 60_000),
    # The decoder refuses anything larger (ledger/encoding.py), so a larger frame could never be read.
    "frame_size_max": (64 * 1024, ENCODED_SIZE_MAX),
    "client_connections_max": (1, 100_000),
    "client_connections_per_address_max": (1, 100_000),
    "client_first_frame_timeout_ms": (10, 600_000),
    "client_idle_timeout_ms": (10, 86_400_000),
    "clock_skew_max_ms": (100, 86_400_000),
    "ordering_timeout_ms": (0, 600_000),
    "state_sync_distance": (1, 1 << 40),
}
# Settings each replica chooses for itself: they may differ between replicas.
_LOCAL_SETTINGS = ("state_sync_distance",)
# The order in which a replica's HELLO lists its protocol settings (node/transport.py): the
# ones replicas must agree on.
PROTOCOL_SETTING_NAMES = tuple(name for name in _PROTOCOL_LIMITS if name not in _LOCAL_SETTINGS)
# Shrunk to fit, for large networks, when a configuration does not set them (see default_protocol).
_LOG_SETTINGS = ("window_size", "checkpoint_interval")


def faults_tolerated(replica_count: int) -> int:
    """f: the most traitors n replicas survive, floor((n - 1) / 3)."""
    return (replica_count - 1) // 3


def quorum_size(replica_count: int) -> int:
    """ceil((n + f + 1) / 2): any two quorums share an honest replica; 2f + 1 when n = 3f + 1."""
    return (replica_count + faults_tolerated(replica_count) + 2) // 2


# ---- what must fit in a frame (sizes from ledger/sizes.py) ----


def _largest(fits: Callable[[int], bool], upper: int) -> int:
    """The largest value in [1, upper] that fits (`fits` is monotonic), or 0 if none does."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def batch_messages_size_max(replica_count: int, batch_size_max: int, frame_size_max: int) -> int:
    """The largest PRE-PREPARE or Blocks response a batch of that many of the largest valid transactions makes."""
    return max(
        sizes.pre_prepare_size_max(batch_size_max),
        sizes.batch_content_size_max(batch_size_max),
        sizes.blocks_size_max(replica_count, batch_size_max, frame_size_max),
    )


def view_change_messages_size_max(replica_count: int, log_size: int) -> int:
    """The largest VIEW-CHANGE or NEW-VIEW when the log holds `log_size` sequences."""
    faults, quorum = faults_tolerated(replica_count), quorum_size(replica_count)
    return max(
        sizes.view_change_size_max(replica_count, quorum, log_size),
        sizes.new_view_size_max(replica_count, faults, quorum, log_size),
    )


def log_size_max(replica_count: int, frame_size_max: int) -> int:
    """The largest max(window_size, 2 * checkpoint_interval) whose view-change messages fit a frame."""
    return _largest(
        lambda log_size: view_change_messages_size_max(replica_count, log_size) <= frame_size_max, PREPARED_CERTIFICATES_MAX
    )


def protocol_problem(replica_count: int, protocol: ProtocolSettings) -> str | None:
    """Why some valid message of this network could outgrow its frames (and so be dropped, stalling
    the protocol), with what to change; None when every one fits."""
    frame = protocol.frame_size_max
    batch = protocol.batch_size_max
    batch_bytes = batch_messages_size_max(replica_count, batch, frame)
    if batch_bytes > frame:
        largest = _largest(lambda count: batch_messages_size_max(replica_count, count, frame) <= frame, batch)
        return (
            f"protocol.batch_size_max: {batch} transactions of the largest valid size make a block of up to {batch_bytes} "
            f"bytes, over frame_size_max {frame}: set batch_size_max to at most {largest} or frame_size_max to at least {batch_bytes}"
        )
    log_size = sizes.log_size(protocol.window_size, protocol.checkpoint_interval)
    if log_size > PREPARED_CERTIFICATES_MAX:
        return (
            f"protocol: max(window_size, 2 * checkpoint_interval) is {log_size}, over the {PREPARED_CERTIFICATES_MAX} "
            "prepared certificates a VIEW-CHANGE may carry: lower window_size or checkpoint_interval"
        )
    view_change_bytes = view_change_messages_size_max(replica_count, log_size)
    if view_change_bytes > frame:
        largest = log_size_max(replica_count, frame)
        if largest < 2:
            needed = view_change_messages_size_max(replica_count, 2)
            return f"protocol.frame_size_max: {frame} cannot hold a NEW-VIEW of {replica_count} replicas: set it to at least {needed}"
        return (
            f"protocol: with {replica_count} replicas a NEW-VIEW for max(window_size, 2 * checkpoint_interval) = {log_size} "
            f"sequences may take {view_change_bytes} bytes, over frame_size_max {frame}: set window_size to at most {largest} "
            f"and checkpoint_interval to at most {largest // 2}, or frame_size_max to at least {view_change_bytes}"
        )
    return None


def default_protocol(replica_count: int, settings: ProtocolSettings | None = None, explicit: frozenset[str] = frozenset()) -> ProtocolSettings:
    """The settings, with window_size and checkpoint_interval (unless `explicit`) lowered as far as
    needed for this many replicas' view-change messages to fit the frame; unchanged when they fit."""
    settings = settings if settings is not None else ProtocolSettings()
    log_size = sizes.log_size(settings.window_size, settings.checkpoint_interval)
    if view_change_messages_size_max(replica_count, log_size) <= settings.frame_size_max:
        return settings
    largest = log_size_max(replica_count, settings.frame_size_max)
    if largest < 2:
        return settings  # nothing fits: protocol_problem says what frame size is needed
    window_size = settings.window_size if "window_size" in explicit else min(settings.window_size, largest)
    checkpoint_interval = settings.checkpoint_interval if "checkpoint_interval" in explicit else min(settings.checkpoint_interval, largest // 2)
    return replace(settings, window_size=window_size, checkpoint_interval=checkpoint_interval)


@dataclass(frozen=True)
class NetworkConfig:
    """What every replica and client of one network agrees on."""

    network_id: str
    replicas: tuple[ReplicaInfo, ...]
    protocol: ProtocolSettings
    genesis_balances: dict[bytes, int]

    @property
    def replica_count(self) -> int:
        return len(self.replicas)

    @property
    def faults_tolerated(self) -> int:
        return faults_tolerated(self.replica_count)

    @property
    def quorum(self) -> int:
        return quorum_size(self.replica_count)

    @property
    def reply_quorum(self) -> int:
        """f + 1 matching replies: at least one of them is from an honest replica."""
        return self.faults_tolerated + 1

    @property
    def replica_keys(self) -> tuple[bytes, ...]:
        return tuple(replica.public_key for replica in self.replicas)

    @property
    def genesis_hash(self) -> bytes:
        return genesis_hash(self.network_id, self.replica_keys, self.genesis_balances)

    @functools.cached_property
    def identity(self) -> NetworkIdentity:
        """What every signature of this network is bound to (ledger.crypto.signing_domain): two
        networks with one id and the same replica keys but other balances accept none of each
        other's blocks, votes, transactions or receipts. Cached: a config is never changed."""
        return NetworkIdentity(self.network_id, self.genesis_hash)

    def primary(self, view: int) -> int:
        return view % self.replica_count

    @property
    def protocol_values(self) -> tuple[int, ...]:
        return tuple(getattr(self.protocol, name) for name in PROTOCOL_SETTING_NAMES)

    def protocol_difference(self, genesis_hash: bytes, protocol: tuple[int, ...]) -> str | None:
        """What differs between this network and the one a peer's HELLO describes, or None."""
        if genesis_hash != self.genesis_hash:
            return "a different genesis (replica keys, addresses' keys or genesis balances differ between the config files)"
        if len(protocol) != len(PROTOCOL_SETTING_NAMES):
            return f"{len(protocol)} protocol settings, this replica has {len(PROTOCOL_SETTING_NAMES)} (another version?)"
        for name, ours, theirs in zip(PROTOCOL_SETTING_NAMES, self.protocol_values, protocol, strict=True):
            if ours != theirs:
                return f"protocol.{name} = {theirs}, this replica has {ours}"
        return None


@dataclass(frozen=True)
class ReplicaConfig:
    network: NetworkConfig
    replica_id: int
    key_path: Path
    data_dir: Path
    path: Path
    # Where the replica serves Prometheus metrics and /health over HTTP; None: not at all.
    metrics_address: Address | None = None
    # [storage] retain_blocks: keep at least this many of the newest blocks (and always the stable
    # checkpoint's block and those above it), deleting older ones; None: an archive, keeps all.
    retain_blocks: int | None = None


@dataclass(frozen=True)
class ClientConfig:
    network: NetworkConfig
    key_path: Path
    path: Path


# ---- reading ----


class _Fields:
    """Typed access to one TOML table that names the file and field in every error."""

    def __init__(self, source: str, table: Any, prefix: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{prefix}] must be a table")
        self.source, self.table, self.prefix = source, table, prefix

    def _name(self, key: str) -> str:
        return f"{self.source}: {self.prefix}.{key}" if self.prefix else f"{self.source}: {key}"

    def has(self, key: str) -> bool:
        return key in self.table

    def refuse_unknown(self, known: tuple[str, ...]) -> None:
        """A misspelt key would otherwise be ignored in silence and its default used instead."""
        unknown = sorted(set(self.table) - set(known))
        if unknown:
            where = f"{self.prefix}.{unknown[0]}" if self.prefix else unknown[0]
            raise ConfigError(f"{self.source}: {where}: unknown setting (known here: {', '.join(known)})")

    def integer(self, key: str, minimum: int, maximum: int, default: int | None = None) -> int:
        if key not in self.table:
            if default is None:
                raise ConfigError(f"{self._name(key)}: missing")
            return default
        value = self.table[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self._name(key)}: expected an integer, found {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self._name(key)}: {value} is outside [{minimum}, {maximum}]")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        if key not in self.table:
            if default is None:
                raise ConfigError(f"{self._name(key)}: missing")
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self._name(key)}: expected non-empty text, found {value!r}")
        return value

    def network_id(self, key: str) -> str:
        value = self.text(key)
        if not NETWORK_ID_PATTERN.fullmatch(value):
            raise ConfigError(
                f"{self._name(key)}: {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    def public_key(self, key: str) -> bytes:
        try:
            return parse_public_key(self.text(key))
        except ValueError as error:
            raise ConfigError(f"{self._name(key)}: {error}") from None

    def address(self, key: str) -> Address:
        return parse_address(self.text(key), self._name(key))

    def table_list(self, key: str) -> list[Any]:
        value = self.table.get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self._name(key)}: expected a list of tables")
        return value


def check_host(host: str, name: str) -> str:
    """A host name or IP address (IPv6 without brackets), or ConfigError saying what is wrong."""
    if not host:
        raise ConfigError(f"{name}: the host is empty")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not all(HOST_LABEL_PATTERN.fullmatch(label) for label in host.split(".")):
        raise ConfigError(f"{name}: {host!r} is neither an IP address nor a host name (letters, digits, '-' and '.')")
    return host


def parse_address(text: str, name: str) -> Address:
    host, separator, port_text = text.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ConfigError(f"{name}: expected HOST:PORT, found {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} is outside [1, 65535]")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{name}: write an IPv6 address in brackets, e.g. [::1]:7100, found {text!r}")
    return Address(check_host(host, name), port)


PACKAGED_CONFIGS = "ledger.configs"  # the repository's configs/, installed inside the package


def packaged_config(name: str) -> Path:
    """A file or directory shipped in configs/ ("local-4.toml", "scenarios"), found through
    importlib.resources so that every install has it, not only a source checkout."""
    resource = importlib.resources.files(PACKAGED_CONFIGS).joinpath(name)
    if not isinstance(resource, Path):  # e.g. a zipped install: the templates must be real files
        raise ConfigError(f"the packaged configs/{name} is not a file on disk ({resource}); install the package unzipped")
    return resource


def find_template(path: Path) -> Path:
    """`path` if it exists; else, for a relative configs/NAME or a bare NAME, the packaged template
    of that name, so `init configs/local-4.toml` works from any directory."""
    if path.exists() or path.is_absolute() or path.suffix != ".toml":
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs"):
        packaged = packaged_config(parts[-1])
        if packaged.is_file():
            return packaged
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def _protocol_settings(source: str, table: Any, replica_count: int) -> ProtocolSettings:
    fields = _Fields(source, table if table is not None else {}, "protocol")
    defaults = ProtocolSettings()
    unknown = set(fields.table) - set(_PROTOCOL_LIMITS)
    if unknown:
        raise ConfigError(f"{source}: protocol.{sorted(unknown)[0]}: unknown setting")
    values = {
        name: fields.integer(name, low, high, getattr(defaults, name)) for name, (low, high) in _PROTOCOL_LIMITS.items()
    }
    explicit = frozenset(name for name in _LOG_SETTINGS if fields.has(name))
    settings = default_protocol(replica_count, ProtocolSettings(**values), explicit)
    problem = protocol_problem(replica_count, settings)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    return settings


def _genesis_balances(source: str, table: Any, known: tuple[str, ...] = ("accounts",)) -> dict[bytes, int]:
    fields = _Fields(source, table if table is not None else {}, "genesis")
    fields.refuse_unknown(known)
    balances: dict[bytes, int] = {}
    for index, entry in enumerate(fields.table_list("accounts")):
        account = _Fields(source, entry, f"genesis.accounts[{index}]")
        account.refuse_unknown(("public_key", "balance"))
        key = account.public_key("public_key")
        if key in balances:
            raise ConfigError(f"{source}: genesis.accounts[{index}].public_key: listed twice")
        balances[key] = account.integer("balance", 0, SUPPLY_MAX)
    if sum(balances.values()) > SUPPLY_MAX:
        raise ConfigError(f"{source}: genesis.accounts: balances add up to more than {SUPPLY_MAX}")
    return balances


def _network(source: str, document: dict[str, Any], own_table: str, own_extra: tuple[str, ...] = ()) -> NetworkConfig:
    _Fields(source, document, "").refuse_unknown(("network", "protocol", "replicas", "genesis", own_table, *own_extra))
    network = _Fields(source, document.get("network"), "network")
    network.refuse_unknown(("id",))
    network_id = network.network_id("id")
    entries = _Fields(source, document, "").table_list("replicas")
    if len(entries) < REPLICAS_MIN:
        raise ConfigError(f"{source}: replicas: {len(entries)} listed, at least {REPLICAS_MIN} needed")
    if len(entries) > REPLICAS_MAX:
        raise ConfigError(f"{source}: replicas: {len(entries)} listed, at most {REPLICAS_MAX} allowed")
    replicas = []
    for index, entry in enumerate(entries):
        fields = _Fields(source, entry, f"replicas[{index}]")
        fields.refuse_unknown(("id", "public_key", "address", "client_address"))
        replica_id = fields.integer("id", 0, REPLICAS_MAX - 1)
        if replica_id != index:
            raise ConfigError(f"{source}: replicas[{index}].id: expected {index} (ids are 0..n-1 in order)")
        replicas.append(
            ReplicaInfo(replica_id, fields.public_key("public_key"), fields.address("address"), fields.address("client_address"))
        )
    if len({replica.public_key for replica in replicas}) != len(replicas):
        raise ConfigError(f"{source}: replicas: two replicas share a public key")
    return NetworkConfig(
        network_id,
        tuple(replicas),
        _protocol_settings(source, document.get("protocol"), len(replicas)),
        _genesis_balances(source, document.get("genesis")),
    )


def _metrics_address(source: str, table: Any, network: NetworkConfig, replica_id: int) -> Address | None:
    """The replica's [metrics] table: host (default 127.0.0.1) and port; None when there is none.
    The port may not be one the network's replicas use for peers or clients: the replica would
    fail to listen, or (on another replica's port) keep that replica from starting."""
    if table is None:
        return None
    fields = _Fields(source, table, "metrics")
    fields.refuse_unknown(("host", "port"))
    host = check_host(fields.text("host", METRICS_HOST_DEFAULT), f"{source}: metrics.host")
    port = fields.integer("port", 1, 65535)
    own = network.replicas[replica_id]
    for replica in network.replicas:
        for kind, address in (("address", replica.address), ("client_address", replica.client_address)):
            # Its own ports clash whatever the host (both listen on this machine); another
            # replica's only on the same host, since replicas may run on other machines.
            if address.port == port and (replica is own or address.host == host):
                raise ConfigError(f"{source}: metrics.port: {port} is replica {replica.replica_id}'s {kind} ({address})")
    return Address(host, port)


def _retain_blocks(source: str, table: Any) -> int | None:
    """The replica's [storage] table: retain_blocks, a positive number of blocks, or absent (archive)."""
    if table is None:
        return None
    fields = _Fields(source, table, "storage")
    fields.refuse_unknown(("retain_blocks",))
    if not fields.has("retain_blocks"):
        return None
    return fields.integer("retain_blocks", 1, RETAIN_BLOCKS_MAX)


def load_replica_config(path: Path) -> ReplicaConfig:
    document = _read_toml(path)
    network = _network(str(path), document, "replica", ("metrics", "storage"))
    replica = _Fields(str(path), document.get("replica"), "replica")
    replica.refuse_unknown(("id", "key_file", "data_dir"))
    replica_id = replica.integer("id", 0, network.replica_count - 1)
    base = path.parent
    return ReplicaConfig(
        network,
        replica_id,
        base / replica.text("key_file"),
        base / replica.text("data_dir", f"data/replica-{replica_id}"),
        path,
        _metrics_address(str(path), document.get("metrics"), network, replica_id),
        _retain_blocks(str(path), document.get("storage")),
    )


def load_client_config(path: Path) -> ClientConfig:
    document = _read_toml(path)
    network = _network(str(path), document, "client")
    client = _Fields(str(path), document.get("client", {}), "client")
    client.refuse_unknown(("key_file",))
    return ClientConfig(network, path.parent / client.text("key_file", "client.key"), path)


# ---- generating a network from a template ----


@dataclass(frozen=True)
class Template:
    network_id: str
    addresses: tuple[tuple[Address, Address], ...]
    protocol: ProtocolSettings
    client_balance: int
    extra_balances: dict[bytes, int]
    # Each replica's metrics and /health address, written as its [metrics]; None: none written.
    metrics_addresses: tuple[Address, ...] | None = None


# A generated network uses 3 ports a replica: peers on base + 2i, clients on base + 2i + 1, and
# metrics on base + 2n + i (after every peer and client port, so no two can clash).
PORTS_PER_REPLICA = 3


def template_for(replica_count: int, network_id: str | None = None, host: str = "127.0.0.1", base_port: int = 7100) -> Template:
    if network_id is not None and not NETWORK_ID_PATTERN.fullmatch(network_id):
        raise ConfigError(f"network id {network_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if replica_count < REPLICAS_MIN:
        raise ConfigError(f"--replicas: {replica_count} replicas cannot tolerate a fault; at least {REPLICAS_MIN} needed")
    if replica_count > REPLICAS_MAX:
        raise ConfigError(f"--replicas: at most {REPLICAS_MAX} replicas are supported")
    if not 1 <= base_port <= 65535 - PORTS_PER_REPLICA * replica_count:
        raise ConfigError(
            f"--base-port: {base_port} leaves no room for {replica_count} replicas ({PORTS_PER_REPLICA} ports each, at most 65535)"
        )
    check_host(host, "--host")
    addresses = tuple(
        (Address(host, base_port + 2 * index), Address(host, base_port + 2 * index + 1)) for index in range(replica_count)
    )
    # Metrics on loopback whatever the replicas' host: exposing them is the operator's choice.
    metrics = tuple(Address(METRICS_HOST_DEFAULT, base_port + 2 * replica_count + index) for index in range(replica_count))
    return Template(network_id or f"local-{replica_count}", addresses, default_protocol(replica_count), 1_000_000, {}, metrics)


def load_template(path: Path, host: str | None = None, base_port: int | None = None) -> Template:
    source = str(path)
    document = _read_toml(path)
    _Fields(source, document, "").refuse_unknown(("network", "protocol", "genesis"))
    network = _Fields(source, document.get("network"), "network")
    network.refuse_unknown(("id", "addresses", "replicas", "host", "base_port"))
    network_id = network.network_id("id")
    if network.has("addresses"):
        if host is not None or base_port is not None:
            raise ConfigError(f"{source}: network.addresses lists every address: --host and --base-port cannot override it")
        raw = network.table["addresses"]
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{source}: network.addresses: expected a list of \"HOST:PORT\" strings")
        if len(raw) < REPLICAS_MIN:
            raise ConfigError(f"{source}: network.addresses: {len(raw)} replicas, at least {REPLICAS_MIN} needed")
        peers = [parse_address(item, f"{source}: network.addresses[{index}]") for index, item in enumerate(raw)]
        for index, peer in enumerate(peers):
            if peer.port >= 65535:
                raise ConfigError(f"{source}: network.addresses[{index}]: port {peer.port} leaves no room for the client port (port + 1)")
        addresses = tuple((peer, Address(peer.host, peer.port + 1)) for peer in peers)
        metrics_addresses = None  # no rule for free ports on hosts we know nothing of: add [metrics] by hand
    else:
        count = network.integer("replicas", 0, REPLICAS_MAX)
        if count < REPLICAS_MIN:
            raise ConfigError(f"{source}: network.replicas: {count} replicas cannot tolerate a fault; at least {REPLICAS_MIN} needed")
        generated = template_for(
            count,
            network_id,
            host if host is not None else check_host(network.text("host", "127.0.0.1"), f"{source}: network.host"),
            base_port if base_port is not None else network.integer("base_port", 1, 65000, 7100),
        )
        addresses = generated.addresses
        metrics_addresses = generated.metrics_addresses
    genesis = _Fields(source, document.get("genesis", {}), "genesis")
    client_balance = genesis.integer("client_balance", 0, SUPPLY_MAX, 1_000_000)
    extra_balances = _genesis_balances(source, document.get("genesis"), ("accounts", "client_balance"))
    if client_balance + sum(extra_balances.values()) > SUPPLY_MAX:
        raise ConfigError(f"{source}: genesis: balances add up to more than {SUPPLY_MAX}")
    protocol = _protocol_settings(source, document.get("protocol"), len(addresses))
    return Template(network_id, addresses, protocol, client_balance, extra_balances, metrics_addresses)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _network_toml(template: Template, keys: list[bytes], balances: dict[bytes, int]) -> str:
    lines = ["[network]", f"id = {_toml_value(template.network_id)}", "", "[protocol]"]
    for name in _PROTOCOL_LIMITS:
        lines.append(f"{name} = {getattr(template.protocol, name)}")
    for index, ((address, client_address), key) in enumerate(zip(template.addresses, keys, strict=True)):
        lines += [
            "",
            "[[replicas]]",
            f"id = {index}",
            f'public_key = "{key.hex()}"',
            f'address = "{address}"',
            f'client_address = "{client_address}"',
        ]
    for account, balance in sorted(balances.items()):
        lines += ["", "[[genesis.accounts]]", f'public_key = "{account.hex()}"', f"balance = {balance}"]
    return "\n".join(lines) + "\n"


def _metrics_toml(address: Address | None) -> str:
    if address is None:
        return (
            "# Prometheus metrics and /health over HTTP: off. To serve them, add\n"
            '# [metrics]\n# host = "127.0.0.1"\n# port = <a free port>\n\n'
        )
    return (
        "# Prometheus metrics (GET /metrics) and readiness (GET /health) over HTTP\n"
        f"[metrics]\nhost = {_toml_value(address.host)}\nport = {address.port}\n\n"
    )


def network_toml(network: NetworkConfig) -> str:
    """The shared part of a config file ([network], [protocol], [[replicas]], genesis) for `network`
    as given. The scenario runner writes each replica process a file of its own from it, with its
    peers' addresses pointing at the runner's link proxies: addresses are not part of the genesis,
    so replicas whose files differ only in peer addresses still agree on one network."""
    addresses = tuple((replica.address, replica.client_address) for replica in network.replicas)
    template = Template(network.network_id, addresses, network.protocol, 0, {})
    return _network_toml(template, list(network.replica_keys), network.genesis_balances)


# What `init` wrote into a directory, so `--force` replaces that and nothing else.
MANIFEST_NAME = ".init-manifest.json"
_MANIFEST_WRITER = "ledger-node init"
_MANIFEST_FILES_MAX = 4 * REPLICAS_MAX + 64
# What the replicas of a network `init` wrote add to it: their stores and `ledger-node up`'s logs.
_REPLICA_DIRECTORY = re.compile(r"replica-\d{1,3}")
_STORE_FILE = re.compile(r"ledger\.sqlite3(-wal|-shm|-journal)?|replica\.lock")
_LOG_FILE = re.compile(r"replica-\d{1,3}\.log")


def _manifest_files(out: Path) -> set[str]:
    """The names the manifest in `out` lists; ConfigError if there is none or it is not init's."""
    path = out / MANIFEST_NAME
    first = min(entry.name for entry in out.iterdir())
    refusal = (
        f"{out}: not written by `ledger-node init` (it holds {first!r} and no {MANIFEST_NAME}); "
        "--force replaces only what init wrote: choose another directory or empty it yourself"
    )
    if path.is_symlink() or not path.is_file():
        raise ConfigError(refusal)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(refusal) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        manifest.get("written_by") != _MANIFEST_WRITER
        or not isinstance(files, list)
        or len(files) > _MANIFEST_FILES_MAX
        or not all(isinstance(name, str) and name and "/" not in name and name not in (".", "..") for name in files)
    ):
        raise ConfigError(refusal)
    return set(files) | {MANIFEST_NAME}


def _removable(out: Path) -> list[Path]:
    """Everything in `out` that `init --force` may delete, deepest first; ConfigError naming the
    first entry that init (or the network it wrote) did not put there."""
    listed = _manifest_files(out)
    removable: list[Path] = []

    def foreign(path: Path) -> ConfigError:
        return ConfigError(
            f"{out}: {path.relative_to(out)} was not written by `ledger-node init`; --force replaces only what init wrote: move it aside first"
        )

    for entry in sorted(out.iterdir()):
        if entry.name in listed and (entry.is_symlink() or entry.is_file()):
            removable.append(entry)
        elif entry.name in ("data", "logs") and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                if entry.name == "logs":
                    if not (_LOG_FILE.fullmatch(inner.name) and inner.is_file() and not inner.is_symlink()):
                        raise foreign(inner)
                    removable.append(inner)
                    continue
                if not (_REPLICA_DIRECTORY.fullmatch(inner.name) and inner.is_dir() and not inner.is_symlink()):
                    raise foreign(inner)
                for store_file in sorted(inner.iterdir()):
                    if not (_STORE_FILE.fullmatch(store_file.name) and store_file.is_file() and not store_file.is_symlink()):
                        raise foreign(store_file)
                    removable.append(store_file)
                removable.append(inner)
            removable.append(entry)
        else:
            raise foreign(entry)
    return removable


def _remove_init_output(out: Path) -> None:
    for path in _removable(out):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError as error:
            raise ConfigError(f"{path}: cannot remove: {error.strerror}") from None


def record_in_manifest(out: Path, names: list[str]) -> None:
    """Add files written into a directory `init` made (the demo's account key) to what --force may replace."""
    files = sorted((_manifest_files(out) - {MANIFEST_NAME}) | set(names))
    _write_manifest(out, files)


def _write_manifest(out: Path, files: list[str]) -> None:
    manifest = {"written_by": _MANIFEST_WRITER, "files": files}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def write_network(template: Template, out: Path, force: bool = False) -> list[Path]:
    """Create keys and configs for every replica and one client; returns the files written.

    An existing non-empty directory is refused; with `force`, it is emptied first only if it holds
    nothing but what an earlier `init` wrote (its manifest) and that network's stores and logs."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out}: already exists and is not empty (use --force to replace what `ledger-node init` wrote there)")
        _remove_init_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{out}: cannot create the directory: {error.strerror}") from None
    names = [f"replica-{index}.{suffix}" for index in range(len(template.addresses)) for suffix in ("toml", "key")]
    # Written first: should init stop halfway, --force can still replace what it did write.
    _write_manifest(out, [*names, "client.toml", "client.key"])
    replica_keys = [SigningKey.generate() for _ in template.addresses]
    client_key = SigningKey.generate()
    balances = dict(template.extra_balances)
    balances[client_key.public_key] = balances.get(client_key.public_key, 0) + template.client_balance
    shared = _network_toml(template, [key.public_key for key in replica_keys], balances)
    written: list[Path] = []
    for index, key in enumerate(replica_keys):
        key_path = out / f"replica-{index}.key"
        write_key_file(key_path, key)
        config_path = out / f"replica-{index}.toml"
        header = (
            f"# Replica {index} of network {template.network_id}: run it with\n"
            f"#   ledger-node run {config_path.name}\n"
            f'[replica]\nid = {index}\nkey_file = "{key_path.name}"\ndata_dir = "data/replica-{index}"\n\n'
        )
        header += _metrics_toml(template.metrics_addresses[index] if template.metrics_addresses is not None else None)
        config_path.write_text(header + shared)
        written += [config_path, key_path]
    write_key_file(out / "client.key", client_key)
    client_header = (
        f"# A client of network {template.network_id}: use it with\n"
        f"#   ledger-client -c client.toml status\n"
        '[client]\nkey_file = "client.key"\n\n'
    )
    (out / "client.toml").write_text(client_header + shared)
    written += [out / "client.toml", out / "client.key"]
    return written
