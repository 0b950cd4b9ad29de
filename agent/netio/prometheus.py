"""Prometheus text exposition format 0.0.4: the one renderer behind the node's `/metrics` and
the relay's `/debug/metrics`.

Families come out in the order first declared, each with its HELP and TYPE lines once, then its
samples; label values are escaped as the format requires (backslash, newline, double quote).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

__all__ = ["CONTENT_TYPE", "Exposition"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Families in order; HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self._families: dict[str, list[str]] = {}

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Declare a family (HELP and TYPE lines) even if it gets no sample."""
        if name not in self._families:
            self._families[name] = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def add(
        self,
        name: str,
        kind: str,
        help_text: str,
        value: float,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.family(name, kind, help_text)
        label_text = ""
        if labels:
            label_text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"
        self._families[name].append(f"{name}{label_text} {_number(value)}")

    def text(self) -> str:
        return "".join(line + "\n" for lines in self._families.values() for line in lines)
