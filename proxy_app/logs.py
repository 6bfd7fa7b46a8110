"""JSON logs: one line per event, to stdout (journald) and optionally to a file."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


_second: list[Any] = [-1, ""]


def _timestamp(now: float) -> str:
    # The formatted second is cached: one log line per request would otherwise pay for
    # strftime every time.
    sec = int(now)
    if sec != _second[0]:
        _second[0] = sec
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int(now % 1 * 1000):03d}Z"


class JsonLog:
    """Writes each record as one JSON line with a single write(2), so lines never interleave."""

    def __init__(self, level: str = "info", file: Path | None = None) -> None:
        self.level = LEVELS[level]
        self._fds = [sys.stdout.fileno()]
        self._file_fd: int | None = None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            self._file_fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._fds.append(self._file_fd)

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.level

    def write(self, record: dict[str, Any]) -> None:
        """Write one record as it is (callers put ts, level and event in it)."""
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE, default=str)
        for fd in self._fds:
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                # A closed stdout must not take requests down with it.
                pass

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Log an event at ``level`` with extra fields."""
        if LEVELS[level] < self.level:
            return
        now = time.time()
        self.write({"ts": _timestamp(now), "level": level, "event": event, **fields})

    def close(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
            self._fds.remove(self._file_fd)
            self._file_fd = None

    def stdlib_handler(self) -> logging.Handler:
        """A logging handler that sends uvicorn's and asyncio's records through this log."""
        return _Handler(self)


class _Handler(logging.Handler):
    def __init__(self, log: JsonLog) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            fields: dict[str, Any] = {
                "ts": _timestamp(record.created),
                "level": level if level in LEVELS else "error",
                "event": "log",
                "logger": record.name,
                "message": record.getMessage(),
            }
            if record.exc_info:
                fields["exc"] = logging.Formatter().formatException(record.exc_info)
            self._log.write(fields)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    return _timestamp(now)


def error_text(e: BaseException) -> str:
    """An exception for the log: its class and message ("ResponseError: BUSY ..."). Not
    repr(): redis-py 8's repr of its errors names a category and the class only."""
    return f"{type(e).__name__}: {e}"
