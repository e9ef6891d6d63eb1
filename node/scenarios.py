"""Attack scenario files (configs/scenarios/*.toml): the format, parsed and validated strictly.

A scenario names its traitors and their behaviours, a fault timeline, the client workload and the
verdict it expects, for one or both network sizes (4 and 7 replicas). Everything is checked here,
before anything runs: an unknown key, behaviour or parameter is refused with one line naming the
file and the key. Nothing here runs a network (node/scenario_sim.py does, node/verdict.py judges).
"""

from __future__ import annotations

import inspect
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.config import packaged_config
from node.traitors import BEHAVIOURS, BehaviourSpec, TraitorSpec

SCENARIO_DIRECTORY = packaged_config("scenarios")
REPLICA_COUNTS = (4, 7)
VERDICTS = ("holds", "breaks")
# join: the replica is not started with the others but at this time, with an empty store (a
# new replica; far enough behind, it joins by state sync). It must be the replica's first event.
EVENTS = ("kill", "stop", "restart", "partition", "slow", "heal", "join")
# Bounds on what a file may ask for (a scenario is a small, quick demonstration).
CLIENTS_MAX = 16
TRANSACTIONS_PER_CLIENT_MAX = 200
IN_FLIGHT_MAX = 8
TIME_LIMIT_MS_MAX = 600_000
DELAY_MS_MAX = 10_000
TIMELINE_EVENTS_MAX = 64
BEHAVIOURS_PER_TRAITOR_MAX = 8
EVIDENCE_MAX = 16
TEXT_MAX = 400
FILE_SIZE_MAX = 256 * 1024
SEED_MAX = 2**32
PARAMETER_NUMBER_MAX = 1_000_000
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
# The message kinds behaviours match by name (withhold, deaf).
MESSAGE_KINDS = ("PrePrepare", "Prepare", "Commit", "Checkpoint", "ViewChange", "NewView", "BatchContent", "Status", "Blocks", "Request")
# Parameters that take one of a few words (the behaviours in node/traitors.py read them).
PARAMETER_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("off_by_one", "target"): ("view", "sequence"),
    ("replay", "source"): ("sent", "received", "both"),
    ("forged_view_change", "mode"): ("collected", "stale", "fabricated"),
    ("extreme_timestamps", "choice"): ("any", "zero", "maximum", "past", "future"),
    ("lying_block_server", "mode"): ("any", "results", "transactions", "certificate", "link"),
}
REPLICA_LIST_PARAMETERS = ("peers", "side", "to")


class ScenarioError(ValueError):
    """A scenario file is not valid; the text is one line naming the file and the key."""


@dataclass(frozen=True)
class Expectation:
    safety: str
    liveness: str | None  # None when safety breaks: the run stops at the first broken invariant
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    clients: int = 3
    transactions_per_client: int = 6
    in_flight: int = 1


@dataclass(frozen=True)
class NetworkConditions:
    """What the simulated network does until `faults_until_ms`, when it heals."""

    loss_rate: float = 0.0
    duplicate_rate: float = 0.0
    delay_ms_min: int = 1
    delay_ms_max: int = 10
    faults_until_ms: int = 3_000
    time_limit_ms: int = 60_000


@dataclass(frozen=True)
class FaultEvent:
    at_ms: int
    event: str
    replicas: tuple[int, ...]
    delay_ms: int = 0  # a slow event: added to every message into or out of its replicas


@dataclass(frozen=True)
class Setup:
    """What happens in a network of `replica_count` replicas."""

    replica_count: int
    traitors: tuple[TraitorSpec, ...]
    timeline: tuple[FaultEvent, ...]
    collusion_side: tuple[int, ...] = ()

    @property
    def faults_tolerated(self) -> int:
        return (self.replica_count - 1) // 3

    def intervals(self, start_event: str, end_events: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
        """(replica, from_ms, until_ms) for every `start_event` closed by one of `end_events`."""
        opened: dict[int, int] = {}
        found = []
        for event in sorted(self.timeline, key=lambda event: event.at_ms):
            if event.event == start_event:
                for replica in event.replicas:
                    opened[replica] = event.at_ms
            elif event.event in end_events:
                for replica in event.replicas:
                    if replica in opened:
                        found.append((replica, opened.pop(replica), event.at_ms))
        return tuple(sorted(found))

    def late_joins(self) -> tuple[tuple[int, int], ...]:
        """(replica, at_ms) for every join event: the replica starts then, with an empty store."""
        return tuple(sorted((replica, event.at_ms) for event in self.timeline if event.event == "join" for replica in event.replicas))

    def slow_links(self) -> tuple[tuple[int, int, int, int], ...]:
        """(replica, from_ms, until_ms, delay_ms) for every slow event, until the heal that ends it."""
        delays = {(event.at_ms, replica): event.delay_ms for event in self.timeline if event.event == "slow" for replica in event.replicas}
        return tuple(
            (replica, start, end, delays[(start, replica)]) for replica, start, end in self.intervals("slow", ("heal",))
        )


@dataclass(frozen=True)
class ScenarioFile:
    name: str
    path: Path
    description: str
    shows: str
    seed: int
    expect: Expectation
    workload: Workload
    network: NetworkConditions
    setups: dict[int, Setup]
    needs: tuple[str, ...] = ()

    @property
    def replica_counts(self) -> tuple[int, ...]:
        return tuple(sorted(self.setups))

    @property
    def missing_behaviours(self) -> tuple[str, ...]:
        """Behaviours this scenario needs that this build does not have (then it is skipped)."""
        return tuple(name for name in self.needs if name not in BEHAVIOURS)

    def setup(self, replica_count: int | None = None) -> Setup:
        if replica_count is None:
            return self.setups[self.replica_counts[0]]
        if replica_count not in self.setups:
            counts = " or ".join(str(count) for count in self.replica_counts)
            raise ScenarioError(f"{self.path}: scenario {self.name} is written for {counts} replicas, not {replica_count}")
        return self.setups[replica_count]

    def expected_text(self) -> str:
        text = f"safety {self.expect.safety}"
        if self.expect.liveness is not None:
            text += f", liveness {self.expect.liveness}"
        return text


class _Reader:
    """Reads one table, refusing unknown keys and wrong types with the file and the key named."""

    def __init__(self, path: Path, table: dict[str, Any], where: str) -> None:
        self.path, self.table, self.where = path, table, where

    def error(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.path}: {self.where}{key}: {problem}")

    def refuse_unknown(self, known: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in known:
                raise self.error(key, f"unknown key (known here: {', '.join(known)})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "missing")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are not numbers here, whatever Python thinks.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {names}, got {value!r}")
        return value

    def integer(self, key: str, minimum: int, maximum: int, default: int | None = None, required: bool = False) -> int:
        value = self.get(key, int, default, required)
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def rate(self, key: str, default: float) -> float:
        value = float(self.get(key, (int, float), default))
        if not 0.0 <= value <= 1.0:
            raise self.error(key, f"must be between 0 and 1, got {value}")
        return value

    def text(self, key: str, required: bool = False, default: str = "") -> str:
        value = self.get(key, str, default, required)
        if len(value) > TEXT_MAX:
            raise self.error(key, f"longer than {TEXT_MAX} characters")
        return value

    def table_at(self, key: str) -> _Reader:
        value = self.get(key, dict, {})
        return _Reader(self.path, value, f"{self.where}{key}.")

    def replica_list(self, key: str, replica_count: int, required: bool = True) -> tuple[int, ...]:
        value = self.get(key, list, None if required else [], required)
        replicas = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < replica_count:
                raise self.error(key, f"expected replica numbers 0..{replica_count - 1}, got {item!r}")
            if item in replicas:
                raise self.error(key, f"replica {item} is listed twice")
            replicas.append(item)
        return tuple(replicas)


def scenario_path(name: str, directory: Path = SCENARIO_DIRECTORY) -> Path:
    return directory / f"{name}.toml"


def scenario_names(directory: Path = SCENARIO_DIRECTORY) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.toml"))


def load_scenario(path: Path) -> ScenarioFile:
    try:
        with open(path, "rb") as file:
            data = file.read(FILE_SIZE_MAX + 1)
        if len(data) > FILE_SIZE_MAX:
            raise ScenarioError(f"{path}: larger than {FILE_SIZE_MAX} bytes")
        document = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ScenarioError(f"{path}: {error}") from None
    return parse_scenario(path, document)


def parse_scenario(path: Path, document: dict[str, Any]) -> ScenarioFile:
    name = path.stem
    if not NAME_PATTERN.match(name):
        raise ScenarioError(f"{path}: a scenario's file name must be lower-case letters, digits and dashes")
    top = _Reader(path, document, "")
    top.refuse_unknown(("description", "shows", "seed", "needs", "expect", "workload", "network", "replicas"))
    needs_value = top.get("needs", list, [])
    if not all(isinstance(item, str) for item in needs_value):
        raise top.error("needs", "expected a list of behaviour names")
    needs = tuple(needs_value)
    expect = _parse_expectation(top.table_at("expect"))
    workload_reader = top.table_at("workload")
    workload_reader.refuse_unknown(("clients", "transactions_per_client", "in_flight"))
    defaults = Workload()
    workload = Workload(
        workload_reader.integer("clients", 1, CLIENTS_MAX, defaults.clients),
        workload_reader.integer("transactions_per_client", 1, TRANSACTIONS_PER_CLIENT_MAX, defaults.transactions_per_client),
        workload_reader.integer("in_flight", 1, IN_FLIGHT_MAX, defaults.in_flight),
    )
    network = _parse_network(top.table_at("network"))
    replicas_reader = top.table_at("replicas")
    setups = {}
    for key in replicas_reader.table:
        if key not in {str(count) for count in REPLICA_COUNTS}:
            raise replicas_reader.error(key, f"unknown key (a network of {' or '.join(map(str, REPLICA_COUNTS))} replicas)")
        setups[int(key)] = _parse_setup(replicas_reader.table_at(key), int(key), network, needs)
    if not setups:
        raise top.error("replicas", "missing: give [replicas.4] and/or [replicas.7]")
    return ScenarioFile(
        name,
        path,
        top.text("description", required=True),
        top.text("shows", required=True),
        top.integer("seed", 0, SEED_MAX, 1),
        expect,
        workload,
        network,
        setups,
        needs,
    )


def _parse_expectation(reader: _Reader) -> Expectation:
    reader.refuse_unknown(("safety", "liveness", "evidence"))
    if not reader.table:
        raise reader.error("safety", "missing: every scenario states the verdict it expects ([expect] safety = \"holds\")")
    safety = reader.text("safety", required=True)
    if safety not in VERDICTS:
        raise reader.error("safety", f"expected one of {', '.join(VERDICTS)}, got {safety!r}")
    liveness: str | None
    if safety == "breaks":
        if "liveness" in reader.table:
            raise reader.error("liveness", "not judged when safety breaks (the run stops at the first broken invariant)")
        liveness = None
    else:
        liveness = reader.text("liveness", required=True)
        if liveness not in VERDICTS:
            raise reader.error("liveness", f"expected one of {', '.join(VERDICTS)}, got {liveness!r}")
    evidence = reader.get("evidence", list, [])
    if len(evidence) > EVIDENCE_MAX or not all(isinstance(item, str) and 0 < len(item) <= TEXT_MAX for item in evidence):
        raise reader.error("evidence", f"expected at most {EVIDENCE_MAX} short texts")
    return Expectation(safety, liveness, tuple(evidence))


def _parse_network(reader: _Reader) -> NetworkConditions:
    reader.refuse_unknown(("loss_rate", "duplicate_rate", "delay_ms_min", "delay_ms_max", "faults_until_ms", "time_limit_ms"))
    defaults = NetworkConditions()
    time_limit_ms = reader.integer("time_limit_ms", 1_000, TIME_LIMIT_MS_MAX, defaults.time_limit_ms)
    delay_ms_min = reader.integer("delay_ms_min", 0, DELAY_MS_MAX, defaults.delay_ms_min)
    delay_ms_max = reader.integer("delay_ms_max", 0, DELAY_MS_MAX, defaults.delay_ms_max)
    if delay_ms_max < delay_ms_min:
        raise reader.error("delay_ms_max", f"is below delay_ms_min ({delay_ms_min})")
    faults_until_ms = reader.integer("faults_until_ms", 0, time_limit_ms, defaults.faults_until_ms)
    return NetworkConditions(
        reader.rate("loss_rate", defaults.loss_rate),
        reader.rate("duplicate_rate", defaults.duplicate_rate),
        delay_ms_min,
        delay_ms_max,
        faults_until_ms,
        time_limit_ms,
    )


def _parse_setup(reader: _Reader, replica_count: int, network: NetworkConditions, needs: tuple[str, ...]) -> Setup:
    reader.refuse_unknown(("traitors", "timeline", "collusion_side"))
    traitors = []
    for position, item in enumerate(reader.get("traitors", list, [])):
        if not isinstance(item, dict):
            raise reader.error(f"traitors[{position}]", "expected a table { replica = ..., behaviours = [...] }")
        traitor = _parse_traitor(_Reader(reader.path, item, f"{reader.where}traitors[{position}]."), replica_count, network, needs)
        if any(other.replica_id == traitor.replica_id for other in traitors):
            raise reader.error(f"traitors[{position}].replica", f"replica {traitor.replica_id} is already a traitor")
        traitors.append(traitor)
    timeline = _parse_timeline(reader, replica_count, network)
    collusion_side = reader.replica_list("collusion_side", replica_count, required=False)
    traitor_ids = {traitor.replica_id for traitor in traitors}
    if collusion_side:
        if not traitor_ids:
            raise reader.error("collusion_side", "needs traitors to collude")
        overlap = sorted(set(collusion_side) & traitor_ids)
        if overlap:
            raise reader.error("collusion_side", f"lists the honest replicas shown the second history; {overlap} are traitors")
    return Setup(replica_count, tuple(traitors), timeline, collusion_side)


def _parse_traitor(reader: _Reader, replica_count: int, network: NetworkConditions, needs: tuple[str, ...]) -> TraitorSpec:
    reader.refuse_unknown(("replica", "behaviours"))
    replica_id = reader.integer("replica", 0, replica_count - 1, required=True)
    items = reader.get("behaviours", list, [])
    if len(items) > BEHAVIOURS_PER_TRAITOR_MAX:
        raise reader.error("behaviours", f"at most {BEHAVIOURS_PER_TRAITOR_MAX} behaviours on one traitor")
    behaviours = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise reader.error(f"behaviours[{position}]", "expected a table { name = ..., start_ms = ..., parameters... }")
        behaviour_reader = _Reader(reader.path, item, f"{reader.where}behaviours[{position}].")
        behaviours.append(_parse_behaviour(behaviour_reader, replica_id, replica_count, network, needs))
    return TraitorSpec(replica_id, tuple(behaviours))


def _parse_behaviour(
    reader: _Reader, replica_id: int, replica_count: int, network: NetworkConditions, needs: tuple[str, ...]
) -> BehaviourSpec:
    name = reader.text("name", required=True)
    start_ms = reader.integer("start_ms", 0, network.time_limit_ms, 0)
    if name not in BEHAVIOURS:
        if name in needs:
            # A behaviour another build adds: kept as written, checked when it exists.
            return BehaviourSpec(name, start_ms, tuple(sorted((k, v) for k, v in reader.table.items() if k not in ("name", "start_ms"))))
        raise reader.error("name", f"unknown behaviour {name!r} (known: {', '.join(sorted(BEHAVIOURS))}; "
                           "list a behaviour this build lacks under needs = [...] to skip the scenario)")
    known = _behaviour_parameters(name)
    reader.refuse_unknown(("name", "start_ms", *known))
    for key, default in known.items():
        if default is inspect.Parameter.empty and key not in reader.table:
            raise reader.error(key, f"missing: behaviour {name} needs it")
    parameters = []
    for key in sorted(reader.table):
        if key in ("name", "start_ms"):
            continue
        parameters.append((key, _parameter_value(reader, name, key, known[key], replica_id, replica_count)))
    return BehaviourSpec(name, start_ms, tuple(parameters))


def _behaviour_parameters(name: str) -> dict[str, Any]:
    """A behaviour's parameters and their defaults, read from its constructor."""
    signature = inspect.signature(BEHAVIOURS[name])
    return {
        parameter.name: parameter.default
        for parameter in signature.parameters.values()
        if parameter.name not in ("self", "start_ms") and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
    }


def _parameter_value(reader: _Reader, behaviour: str, key: str, default: Any, replica_id: int, replica_count: int) -> Any:
    value = reader.table[key]
    if key in REPLICA_LIST_PARAMETERS:
        replicas = reader.replica_list(key, replica_count)
        if replica_id in replicas:
            raise reader.error(key, f"replica {replica_id} cannot list itself")
        return tuple(sorted(replicas))
    if key == "kinds":
        kinds = reader.get(key, list)
        for kind in kinds:
            if kind not in MESSAGE_KINDS:
                raise reader.error(key, f"unknown message kind {kind!r} (known: {', '.join(MESSAGE_KINDS)})")
        return tuple(kinds)
    choices = PARAMETER_CHOICES.get((behaviour, key))
    if choices is not None:
        word = reader.text(key)
        if word not in choices:
            raise reader.error(key, f"expected one of {', '.join(choices)}, got {word!r}")
        return word
    if default is inspect.Parameter.empty:
        default = value  # a parameter without a default: its type is whatever the file gives, checked below
    if isinstance(default, bool):
        return reader.get(key, bool)
    if isinstance(default, float):
        if key == "rate":
            return reader.rate(key, default)
        number = float(reader.get(key, (int, float)))
        if not 0 <= number <= PARAMETER_NUMBER_MAX:
            raise reader.error(key, f"must be between 0 and {PARAMETER_NUMBER_MAX}, got {number}")
        return number
    if isinstance(default, int):
        minimum = -PARAMETER_NUMBER_MAX if key == "delta" else 0
        return reader.integer(key, minimum, PARAMETER_NUMBER_MAX)
    if isinstance(default, str):
        return reader.text(key)
    raise reader.error(key, f"this parameter cannot be set from a file (got {value!r})")


def _parse_timeline(reader: _Reader, replica_count: int, network: NetworkConditions) -> tuple[FaultEvent, ...]:
    items = reader.get("timeline", list, [])
    if len(items) > TIMELINE_EVENTS_MAX:
        raise reader.error("timeline", f"at most {TIMELINE_EVENTS_MAX} events")
    events = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise reader.error(f"timeline[{position}]", "expected a table { at_ms = ..., event = ..., replicas = [...] }")
        event_reader = _Reader(reader.path, item, f"{reader.where}timeline[{position}].")
        event_reader.refuse_unknown(("at_ms", "event", "replicas", "delay_ms"))
        at_ms = event_reader.integer("at_ms", 0, network.time_limit_ms, required=True)
        if at_ms > network.faults_until_ms:
            raise event_reader.error("at_ms", f"{at_ms} is after the network heals at {network.faults_until_ms} (network.faults_until_ms)")
        event = event_reader.text("event", required=True)
        if event not in EVENTS:
            raise event_reader.error("event", f"expected one of {', '.join(EVENTS)}, got {event!r}")
        replicas = event_reader.replica_list("replicas", replica_count, required=event != "heal")
        if event == "slow":
            delay_ms = event_reader.integer("delay_ms", 1, DELAY_MS_MAX, required=True)
        elif "delay_ms" in event_reader.table:
            raise event_reader.error("delay_ms", "only a slow event has a delay")
        else:
            delay_ms = 0
        events.append(FaultEvent(at_ms, event, replicas, delay_ms))
    return _check_timeline(reader, events)


def _check_timeline(reader: _Reader, events: list[FaultEvent]) -> tuple[FaultEvent, ...]:
    """Each replica is up, killed or stopped, connected or cut off, and slow or not; every fault ends
    (a heal ends a replica's partition and its slowness)."""
    state: dict[int, str] = {}
    cut_off: set[int] = set()
    slowed: set[int] = set()
    resolved = []
    named: set[int] = set()  # replicas an earlier event named
    for event in sorted(events, key=lambda event: event.at_ms):
        replicas = event.replicas
        if event.event == "heal" and not replicas:
            replicas = tuple(sorted(cut_off | slowed))
        for replica in replicas:
            where = f"timeline event {event.event} at {event.at_ms} ms"
            first_event = replica not in named
            named.add(replica)
            if event.event == "join":
                if not first_event:
                    raise reader.error("timeline", f"{where}: a join must be replica {replica}'s first event (it starts then)")
            elif event.event in ("kill", "stop"):
                if replica in state:
                    raise reader.error("timeline", f"{where}: replica {replica} is already {state[replica]}")
                state[replica] = "killed" if event.event == "kill" else "stopped"
            elif event.event == "restart":
                if replica not in state:
                    raise reader.error("timeline", f"{where}: replica {replica} is neither killed nor stopped")
                del state[replica]
            elif event.event == "partition":
                if replica in cut_off:
                    raise reader.error("timeline", f"{where}: replica {replica} is already cut off")
                cut_off.add(replica)
            elif event.event == "slow":
                if replica in slowed:
                    raise reader.error("timeline", f"{where}: replica {replica} is already slow")
                slowed.add(replica)
            elif replica not in cut_off and replica not in slowed:
                raise reader.error("timeline", f"{where}: replica {replica} is neither cut off nor slow")
            else:
                cut_off.discard(replica)
                slowed.discard(replica)
        resolved.append(FaultEvent(event.at_ms, event.event, replicas, event.delay_ms))
    for replica, what in sorted(state.items()):
        raise reader.error("timeline", f"replica {replica} is {what} and never restarted (every fault ends before the network heals)")
    for replica in sorted(cut_off):
        raise reader.error("timeline", f"replica {replica} is cut off and never healed (every fault ends before the network heals)")
    for replica in sorted(slowed):
        raise reader.error("timeline", f"replica {replica} is slow and never healed (every fault ends before the network heals)")
    return tuple(resolved)
