"""The `ledger-node` and `ledger-client` command lines run as real processes: one-line errors with
the documented exit codes, options in any position, and no harm to files they did not write."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .local_network import (
    CLIENT_COMMAND,
    NODE_COMMAND,
    READY_LINE,
    CommandResult,
    LocalNetwork,
    pick_base_port,
    run_client_cli,
    run_command,
)

pytestmark = pytest.mark.integration

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INVALID_CHAIN = 4


def one_line_error(result: CommandResult, program: str, exit_code: int) -> str:
    """The single stderr line of a command that failed with `exit_code`, checked to be no traceback."""
    assert result.exit_code == exit_code, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith(f"{program}: "), result.describe()
    return lines[0]


def ready_lines(result: CommandResult) -> list[str]:
    """The lines where `ledger-node up` reported a replica listening."""
    return [line for line in result.stdout.splitlines() if READY_LINE.match(line)]


async def test_demo_refuses_a_directory_holding_someone_elses_files(tmp_path: Path) -> None:
    """Regression: `demo --dir D` passed `--force` to init, which deleted whatever D held."""
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "thesis.tex").write_text("years of work")
    base_port = pick_base_port(4, random.Random())
    result = await run_command([*NODE_COMMAND, "demo", "--dir", str(directory), "--base-port", str(base_port)])
    assert result.exit_code == EXIT_FAILED, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    assert "thesis.tex" in result.stdout + result.stderr
    assert (directory / "thesis.tex").read_text() == "years of work"
    assert sorted(path.name for path in directory.iterdir()) == ["thesis.tex"]


# ---- a data directory in use ----


@pytest.mark.parametrize("replica_count", [4])
async def test_a_second_run_of_a_running_replica_is_refused_naming_its_process(network: LocalNetwork) -> None:
    """Regression: a second process opened the same SQLite store while the first one ran."""
    assert network.run is not None
    holder = network.run.replica_pids[0]
    result = await run_command([*NODE_COMMAND, "run", str(network.replica_config_path(0))])
    line = one_line_error(result, "ledger-node", EXIT_FAILED)
    assert "in use" in line and f"process {holder}" in line, line
    assert network.replica_alive(0)


@pytest.mark.parametrize("replica_count", [4])
async def test_a_second_up_on_a_running_directory_is_refused_and_leaves_its_logs_alone(network: LocalNetwork) -> None:
    """Regression: a second `up` wrote into the first network's logs and reported its ports as its own."""
    assert network.run is not None
    holder = network.run.replica_pids[0]
    logs_before = [network.log_text(replica_id) for replica_id in range(4)]
    result = await run_command([*NODE_COMMAND, "up", str(network.directory)])
    line = one_line_error(result, "ledger-node", EXIT_FAILED)
    assert "replica 0" in line and f"process {holder}" in line, line
    assert not ready_lines(result), result.describe()
    for replica_id in range(4):
        assert network.log_text(replica_id).startswith(logs_before[replica_id])
        assert "in use" not in network.log_text(replica_id)
    assert all(network.replica_alive(replica_id) for replica_id in range(4))


@pytest.mark.parametrize("replica_count", [4])
async def test_a_taken_port_is_named_in_one_line(initialised_network: LocalNetwork) -> None:
    client_address = initialised_network.network.replicas[0].client_address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # Found flaky in a full run (EADDRINUSE here, not in the replica): the port, free when the
        # network was initialised, was left in TIME_WAIT by another test's connection. As for the
        # replica's own listener, a listening socket on the port still keeps the replica out.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((client_address.host, client_address.port))
        squatter.listen()
        result = await run_command([*NODE_COMMAND, "run", str(initialised_network.replica_config_path(0))])
    line = one_line_error(result, "ledger-node", EXIT_USAGE)
    assert f"{client_address} is already in use" in line, line


@pytest.mark.parametrize("replica_count", [4])
async def test_up_does_not_report_another_processs_port_as_its_replica(initialised_network: LocalNetwork) -> None:
    """Regression: readiness was "something accepts on the client port", so a port held by
    another process was reported as the replica listening there."""
    client_address = initialised_network.network.replicas[0].client_address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # Found flaky in a full run (EADDRINUSE here, not in the replica): the port, free when the
        # network was initialised, was left in TIME_WAIT by another test's connection. As for the
        # replica's own listener, a listening socket on the port still keeps the replica out.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((client_address.host, client_address.port))
        squatter.listen()
        result = await run_command([*NODE_COMMAND, "up", str(initialised_network.directory), "--only", "0"])
    assert result.exit_code == EXIT_FAILED, result.describe()
    assert not ready_lines(result), result.describe()
    assert "replica 0 exited with code 2" in result.stdout, result.describe()
    assert f"{client_address} is already in use" in initialised_network.log_text(0)


@pytest.mark.parametrize("replica_count", [4])
async def test_up_refuses_a_traitor_among_replicas_it_does_not_start(initialised_network: LocalNetwork) -> None:
    result = await run_command(
        [*NODE_COMMAND, "up", str(initialised_network.directory), "--only", "1,2,3", "--traitor", "0=equivocating_primary"]
    )
    line = one_line_error(result, "ledger-node", EXIT_USAGE)
    assert "replica 0 is not among the replicas started" in line, line
    assert not ready_lines(result), result.describe()


# ---- global options before or after the command ----


@pytest.mark.parametrize("replica_count", [4])
async def test_client_global_options_work_after_the_command(initialised_network: LocalNetwork, tmp_path: Path) -> None:
    """Regression: `status --json`, `whoami --key a.key` failed with "unrecognized arguments"."""
    config = str(initialised_network.client_config_path)
    key = tmp_path / "a.key"
    made = await run_command([*CLIENT_COMMAND, "keygen", "--out", str(key), "--json"])
    assert made.exit_code == 0, made.describe()
    account = made.json()["account"]
    after = await run_command([*CLIENT_COMMAND, "whoami", "-c", config, "--key", str(key), "--json"])
    assert after.exit_code == 0, after.describe()
    assert after.json() == {"account": account}
    before = await run_command([*CLIENT_COMMAND, "-c", config, "--key", str(key), "whoami"])
    assert before.stdout.strip() == account, before.describe()
    # Nothing runs: every replica is unreachable, and the JSON says so.
    status = await run_command([*CLIENT_COMMAND, "status", "--json", "--timeout", "1", "-c", config])
    assert status.exit_code == EXIT_UNAVAILABLE, status.describe()
    assert [replica["reachable"] for replica in status.json()["replicas"]] == [False] * 4


async def test_node_log_level_works_after_the_command_in_any_case(tmp_path: Path) -> None:
    """Regression: `ledger-node run CFG --log-level debug` failed with "unrecognized arguments"."""
    made = await run_command([*NODE_COMMAND, "init", "--replicas", "4", "--out", str(tmp_path / "net"), "--log-level", "WARNING"])
    assert made.exit_code == 0, made.describe()
    missing = await run_command([*NODE_COMMAND, "run", str(tmp_path / "net" / "replica-9.toml"), "--log-level", "Debug"])
    line = one_line_error(missing, "ledger-node", EXIT_USAGE)
    assert "no such file" in line, line
    before = await run_command([*NODE_COMMAND, "--log-level", "ERROR", "run", str(tmp_path / "nothing.toml")])
    assert "no such file" in one_line_error(before, "ledger-node", EXIT_USAGE)


# ---- one line, never a traceback ----


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        pytest.param(("keygen", "--out", "/missing/directory/a.key"), "cannot write", id="keygen-into-a-missing-directory"),
        pytest.param(("--timeout", "-1", "status"), "--timeout", id="negative-timeout"),
        pytest.param(("--timeout", "0", "status"), "--timeout", id="zero-timeout"),
        pytest.param(("--timeout", "nan", "status"), "--timeout", id="nan-timeout"),
        pytest.param(("status", "--bogus"), "unrecognized arguments: --bogus", id="unknown-option"),
    ],
)
async def test_client_argument_errors_are_one_line(arguments: tuple[str, ...], phrase: str) -> None:
    result = await run_command([*CLIENT_COMMAND, *arguments])
    line = one_line_error(result, "ledger-client", EXIT_USAGE)
    assert phrase in line, line


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        pytest.param(("demo", "--base-port", "70000"), "--base-port", id="demo-port-over-65535"),
        pytest.param(("demo", "--base-port", "65530"), "--base-port", id="demo-ports-past-65535"),
        pytest.param(("init", "--replicas", "4", "--out", "{tmp}/n", "--base-port", "0"), "--base-port", id="init-port-0"),
        pytest.param(("init", "--replicas", "4", "--out", "{tmp}/n", "--host", ""), "--host", id="init-empty-host"),
        pytest.param(("init", "--replicas", "4", "--out", "{tmp}/n", "--host", 'a"b'), "--host", id="init-host-with-a-quote"),
        pytest.param(("init", "--replicas", "4", "--out", "/proc/forbidden/net"), "cannot create", id="init-unwritable"),
        pytest.param(("simulate", "--seeds", "0"), "--seeds", id="simulate-no-seeds"),
        pytest.param(("up",), "required", id="up-without-directory"),
        pytest.param(("up", "{tmp}", "--traitor", "zero=silent"), "REPLICA=SPEC", id="up-traitor-without-replica-id"),
        pytest.param(("up", "{tmp}", "--traitor", "0=no_such_behaviour"), "unknown behaviour", id="up-traitor-unknown-behaviour"),
    ],
)
async def test_node_argument_errors_are_one_line(tmp_path: Path, arguments: tuple[str, ...], phrase: str) -> None:
    result = await run_command([*NODE_COMMAND, *(argument.format(tmp=tmp_path) for argument in arguments)])
    line = one_line_error(result, "ledger-node", EXIT_USAGE)
    assert phrase in line, line
    assert not (tmp_path / "n").exists()


def test_processes_the_suite_starts_take_ctrl_c_even_when_the_suite_ignores_it() -> None:
    """Regression: `make test` started in the background without job control ignored SIGINT, its
    children inherited that, and the Ctrl-C tests here waited for their deadlines (conftest's
    `children_take_ctrl_c` undoes it). A child that ignores SIGINT itself still may."""
    probe = "import signal, sys; sys.exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 1)"
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
    ignoring = "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); " + (
        "import subprocess; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    )
    # The case the fixture exists for: under a parent that ignores SIGINT, a child does too.
    assert subprocess.run([sys.executable, "-c", ignoring, probe], check=False).returncode == 1


@pytest.mark.parametrize("replica_count", [4])
async def test_ctrl_c_on_a_waiting_client_exits_130_quietly(initialised_network: LocalNetwork) -> None:
    """Regression: Ctrl-C while the client waited printed an exception group's traceback."""
    address = initialised_network.network.replicas[0].client_address
    listener = trio.socket.socket()
    await listener.bind((address.host, address.port))
    listener.listen()
    process = await trio.lowlevel.open_process(
        [*CLIENT_COMMAND, "-c", str(initialised_network.client_config_path), "get", "greeting"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(30):
            connection, _ = await listener.accept()  # the client is inside its event loop, waiting
            process.send_signal(signal.SIGINT)
            assert process.stdout is not None and process.stderr is not None
            stdout = await receive_all(process.stdout)
            stderr = await receive_all(process.stderr)
            exit_code = await process.wait()
        connection.close()
    finally:
        listener.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert exit_code == 130, (stdout, stderr)
    assert stderr.strip() == b"" and b"Traceback" not in stdout, (stdout, stderr)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


# ---- input the client can check itself ----


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        pytest.param(("put", "", "x"), "key is empty", id="empty-key"),
        pytest.param(("put", "k" * 257, "x"), "257 characters", id="key-over-256"),
        pytest.param(("put", "k", "v" * 4097), "4097 characters", id="value-over-4096"),
        pytest.param(("transfer", "00" * 32, "5"), "all-zero account", id="transfer-to-the-zero-account"),
    ],
)
@pytest.mark.parametrize("replica_count", [4])
async def test_the_client_refuses_what_it_can_check_without_waiting(
    initialised_network: LocalNetwork, arguments: tuple[str, ...], phrase: str
) -> None:
    """Regression: these waited for the timeout and ended in "network unavailable" (exit 3)."""
    result = await run_command(
        [*CLIENT_COMMAND, "-c", str(initialised_network.client_config_path), "--timeout", "5", *arguments]
    )
    line = one_line_error(result, "ledger-client", EXIT_USAGE)
    assert phrase in line, line


@pytest.mark.parametrize("replica_count", [4])
async def test_a_key_file_readable_by_others_is_refused_with_the_fix(initialised_network: LocalNetwork) -> None:
    key_path = initialised_network.directory / "client.key"
    key_path.chmod(0o644)
    result = await run_command([*CLIENT_COMMAND, "-c", str(initialised_network.client_config_path), "whoami"])
    line = one_line_error(result, "ledger-client", EXIT_USAGE)
    assert "readable by others" in line and f"chmod 600 {key_path}" in line, line
    initialised_network.replica_key_path(0).chmod(0o640)
    replica = await run_command([*NODE_COMMAND, "run", str(initialised_network.replica_config_path(0))])
    assert "chmod 600" in one_line_error(replica, "ledger-node", EXIT_USAGE)


@pytest.mark.parametrize("command", [("put", "k", "v"), ("transfer", "replica-0.key", "5"), ("get", "k"), ("balance",)])
@pytest.mark.parametrize("replica_count", [4])
async def test_timeout_bounds_every_command_and_says_so(initialised_network: LocalNetwork, command: tuple[str, ...]) -> None:
    """Regression: a write's nonce lookup waited its own 15 s, and the error said nothing."""
    arguments = [str(initialised_network.directory / argument) if argument.endswith(".key") else argument for argument in command]
    result = await run_command([*CLIENT_COMMAND, "-c", str(initialised_network.client_config_path), "--timeout", "1", *arguments])
    line = one_line_error(result, "ledger-client", EXIT_UNAVAILABLE)
    assert "network unavailable" in line and "within 1s" in line, line


# ---- blocks ----


@pytest.mark.parametrize("replica_count", [4])
async def test_block_above_the_height_says_so_and_block_alone_shows_the_latest(network: LocalNetwork) -> None:
    """Regression: `block 999` waited, then printed "network unavailable"; `block` needed a height."""
    put = await run_client_cli(network, "--json", "put", "greeting", "hello")
    assert put.exit_code == 0, put.describe()
    height = put.json()["height"]
    missing = await run_client_cli(network, "block", "999")
    line = one_line_error(missing, "ledger-client", EXIT_FAILED)
    assert line.startswith("ledger-client: no block 999 (height "), line
    assert int(line.rsplit(" ", 1)[1].rstrip(")")) >= height
    latest = await run_client_cli(network, "--json", "block")
    assert latest.exit_code == 0, latest.describe()
    assert latest.json()["height"] >= height


@pytest.mark.parametrize("replica_count", [4])
async def test_up_with_fewer_replicas_than_a_quorum_warns(initialised_network: LocalNetwork) -> None:
    """Regression: `up --only 0` started one replica of four without a word that it cannot commit."""
    # The replica's client port is taken, so it exits by itself and `up` ends without a signal.
    client_address = initialised_network.network.replicas[0].client_address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # Found flaky in a full run (EADDRINUSE here, not in the replica): the port, free when the
        # network was initialised, was left in TIME_WAIT by another test's connection. As for the
        # replica's own listener, a listening socket on the port still keeps the replica out.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((client_address.host, client_address.port))
        squatter.listen()
        result = await run_command([*NODE_COMMAND, "up", str(initialised_network.directory), "--only", "0"])
    assert "warning: 1 of 4 replicas is fewer than a quorum (3)" in result.stdout, result.describe()


# ---- config drift ----

LOG_DEADLINE_S = 30.0


@pytest.mark.parametrize("replica_count", [4])
async def test_replicas_whose_protocol_settings_differ_refuse_each_other_naming_the_setting(
    initialised_network: LocalNetwork,
) -> None:
    """Regression: protocol settings were in neither the genesis hash nor the handshake, so one
    replica's edited file silently ran other rules than the rest."""
    path = initialised_network.replica_config_path(3)
    text = path.read_text()
    assert "request_timeout_ms = 2000\n" in text
    path.write_text(text.replace("request_timeout_ms = 2000\n", "request_timeout_ms = 2500\n"))
    await initialised_network.start()
    expected = "replica 3's config differs from this one's: it has protocol.request_timeout_ms = 2500, this replica has 2000"
    with trio.fail_after(LOG_DEADLINE_S):
        while expected not in initialised_network.log_text(0):
            await trio.sleep(0.05)
    assert "connected to replica 3" not in initialised_network.log_text(0)
