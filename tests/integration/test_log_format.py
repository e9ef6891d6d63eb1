"""`ledger-node run` log lines carry ISO UTC timestamps with milliseconds, as text or as JSON."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from .local_network import NODE_COMMAND, pick_base_port, run_command

pytestmark = pytest.mark.integration

ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
READY_DEADLINE_S = 30.0


async def replica_lines_until_ready(tmp_path: Path, before: list[str], after: list[str]) -> list[str]:
    """Start replica 0 of a new network alone (with these options before and after `run CONFIG`),
    return its log lines up to its "ready" line, and stop it."""
    base_port = pick_base_port(4, random.Random())
    made = await run_command([*NODE_COMMAND, "init", "--replicas", "4", "--base-port", str(base_port), "--out", str(tmp_path / "net")])
    assert made.exit_code == 0, made.describe()
    process = await trio.lowlevel.open_process(
        [*NODE_COMMAND, *before, "run", str(tmp_path / "net" / "replica-0.toml"), *after],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        buffered = b""
        with trio.fail_after(READY_DEADLINE_S):
            while not any(" ready: " in line for line in lines):
                chunk = await process.stderr.receive_some(65536)
                assert chunk, f"replica exited before it was ready: {lines}"
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                lines.extend(line.decode() for line in complete)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
    return lines


async def test_text_log_lines_start_with_an_iso_utc_timestamp_with_milliseconds(tmp_path: Path) -> None:
    """Regression: text lines began with a local HH:MM:SS, without date, milliseconds or zone."""
    lines = await replica_lines_until_ready(tmp_path, [], [])
    for line in lines:
        time, logger, level, _message = line.split(" ", 3)
        assert ISO_TIME.match(time), line
        assert logger.startswith("node."), line
        assert level in {"DEBUG", "INFO", "WARNING", "ERROR"}, line


@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(["--log-format", "json"], [], id="before-the-command"),
        pytest.param([], ["--log-format", "JSON", "--log-level", "info"], id="after-the-command-any-case"),
    ],
)
async def test_json_log_format_writes_one_object_a_line(tmp_path: Path, before: list[str], after: list[str]) -> None:
    lines = await replica_lines_until_ready(tmp_path, before, after)
    for line in lines:
        entry = json.loads(line)
        assert set(entry) == {"time", "level", "logger", "message"}, line
        assert ISO_TIME.match(entry["time"]), line
        assert entry["level"] in {"debug", "info", "warning", "error"}, line
        assert entry["logger"].startswith("node."), line
    assert any(json.loads(line)["message"].startswith("replica 0 of ") for line in lines)


async def test_unknown_log_format_is_a_one_line_usage_error() -> None:
    result = await run_command([*NODE_COMMAND, "--log-format", "xml", "simulate", "--seeds", "1"])
    assert result.exit_code == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert len(result.stderr.splitlines()) == 1 and "--log-format" in result.stderr, result.describe()
