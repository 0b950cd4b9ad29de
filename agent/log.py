"""Logging setup: structlog to stderr, readable on a terminal, JSON lines otherwise.

structlog's configuration is process-global, so only `agent.cli.main` calls `configure_logging`.
Library code (proto, engine) never configures anything: it takes an injected logger. Records from
third-party libraries using the stdlib `logging` module go through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor

__all__ = ["LEVELS", "configure_logging", "get_logger"]

LEVELS = ("debug", "info", "warning", "error", "critical")


class _AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Our stdlib handler, marked so that configuring again replaces it instead of adding one."""


class _NamedLogger(structlog.WriteLogger):
    """A WriteLogger to stderr that knows the name `get_logger` gave it."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stderr)
        self.name = name


def _named_logger(*args: Any) -> _NamedLogger:
    return _NamedLogger(str(args[0]) if args else "agent")


def _add_logger_name(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name and "logger" not in event_dict:
        event_dict["logger"] = name
    return event_dict


def _calling(hook: Callable[[], None]) -> Processor:
    def processor(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        hook()
        return event_dict

    return processor


def configure_logging(
    level: str = "info",
    *,
    json: bool | None = None,
    before_write: Callable[[], None] | None = None,
) -> None:
    """Send logs at `level` and above to stderr; JSON unless stderr is a TTY (`json` forces it).

    `before_write` runs before every line is written (`agent up` clears its waiting line)."""
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    numeric = cast(int, getattr(logging, name.upper()))
    if json is None:
        json = not sys.stderr.isatty()

    shared: list[Processor] = [
        *([_calling(before_write)] if before_write is not None else []),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,  # a plain traceback string: never locals
            renderer,
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail = [structlog.processors.StackInfoRenderer(), renderer]

    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_named_logger,
        cache_logger_on_first_use=False,
    )

    handler = _AgentHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AgentHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)


def get_logger(name: str, **context: Any) -> FilteringBoundLogger:
    """A logger whose lines carry `logger=name` (and any extra context).

    It is lazy: the configuration in force when it first logs applies, so module-level loggers
    created before `configure_logging` still follow it.
    """
    return cast(FilteringBoundLogger, structlog.get_logger(name, **context))
