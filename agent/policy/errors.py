"""The one error the policy layer raises: a refused policy, with where and why.

Syntax errors carry `line:column`; semantic errors carry the path of the offending value
(`acls[2].dst[0]`) and, when the document was parsed from text, its position too. The message
is written for the operator who wrote the file, so `str(err)` is what the CLI prints.
"""

from __future__ import annotations

__all__ = ["PolicyError", "Position", "format_path"]

Position = tuple[int, int]  # (line, column), both 1-based, column counted in characters
PathItem = str | int


def format_path(path: tuple[PathItem, ...]) -> str:
    """`("acls", 2, "dst", 0)` -> `acls[2].dst[0]`."""
    out = ""
    for item in path:
        if isinstance(item, int):
            out += f"[{item}]"
        elif out:
            out += f".{item}"
        else:
            out = item
    return out


class PolicyError(ValueError):
    """A policy (or its HuJSON text) was refused; nothing derived from it may be used."""

    def __init__(
        self,
        message: str,
        *,
        path: tuple[PathItem, ...] = (),
        position: Position | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.position = position
        super().__init__(self._render())

    def _render(self) -> str:
        where = format_path(self.path)
        if where:
            text = f"{where}: {self.message}"
            if self.position is not None:
                text += f" (line {self.position[0]}, column {self.position[1]})"
            return text
        if self.position is not None:
            return f"{self.position[0]}:{self.position[1]}: {self.message}"
        return self.message
