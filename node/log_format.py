"""Log line formats of the replica processes: text with ISO UTC timestamps, or one JSON object a line."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

LOG_FORMATS = ("text", "json")


def iso_timestamp(created_s: float) -> str:
    """`created_s` (seconds since the epoch) as ISO 8601 UTC with milliseconds, e.g. 2026-12-01T21:30:05.123Z."""
    whole_s = int(created_s)
    milliseconds = int((created_s - whole_s) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole_s)) + f".{milliseconds:03d}Z"


class TextFormatter(logging.Formatter):
    """`<time> <logger> <LEVEL> <message>`; the time in UTC so lines from several hosts sort together."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return iso_timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line with time, level, logger and message (and exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": iso_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii keeps a line one line whatever a peer managed to put into a logged string.
        return json.dumps(entry, ensure_ascii=True)


def configure_logging(level: str, log_format: str) -> None:
    """Send every log record to stderr at `level` ("debug" ... "error") in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


class LogRateLimit:
    """Allows at most `per_second` lines a second, so a flood of bad input cannot flood the log;
    the first line allowed in a later second is preceded by how many were left out."""

    def __init__(self, logger: logging.Logger, per_second: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.per_second, self.clock = logger, per_second, clock
        self.second = -1
        self.logged = 0
        self.suppressed = 0

    def allowed(self) -> bool:
        second = int(self.clock())
        if second != self.second:
            if self.suppressed:
                self.logger.warning("%d more such lines not logged in the last second", self.suppressed)
            self.second, self.logged, self.suppressed = second, 0, 0
        if self.logged < self.per_second:
            self.logged += 1
            return True
        self.suppressed += 1
        return False
