"""The table every benchmark prints, appends with --markdown and saves with --record: one model, so the
printed table, the markdown and the recorded JSON cannot differ."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Table:
    """A markdown table with the lines around it.

    title    short name of the table (listed by the renderer, named in errors; not printed)
    columns  header cells
    rows     cells as displayed (already formatted numbers, units in the header or caption)
    caption  markdown line printed above the table (what it measures, units, how to read ratios)
    notes    markdown lines printed below it (n/a reasons, footnotes, a summary line)
    align    one letter per column: l (default) or r (right-aligned)
    """

    title: str
    columns: List[str]
    rows: List[List[str]]
    caption: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    align: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.columns:
            raise ValueError(f"table {self.title!r}: no columns")
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {i} has {len(row)} cells, the header {len(self.columns)}")
        if self.align is not None and (len(self.align) != len(self.columns) or set(self.align) - {"l", "r"}):
            raise ValueError(f"table {self.title!r}: align must be one letter (l or r) per column, got {self.align!r}")

    def markdown(self) -> str:
        """The caption, the table and the notes, separated by blank lines."""
        align = self.align or "l" * len(self.columns)
        lines = [
            _line(self.columns),
            "|" + "".join("---:|" if a == "r" else "---|" for a in align),
            *(_line(row) for row in self.rows),
        ]
        parts = ([self.caption] if self.caption else []) + ["\n".join(lines)]
        if self.notes:
            parts.append("\n".join(self.notes))
        return "\n\n".join(parts)


def _line(cells: List[str]) -> str:
    """One table line; a | inside a cell is escaped, an empty cell is one space."""
    escaped = (c.replace("|", "\\|") for c in cells)
    return "|" + "|".join(f" {c} " if c else " " for c in escaped) + "|"


def report(header: List[str], tables: List[Table]) -> str:
    """What a suite prints and appends with --markdown: its metadata lines as a code block, then the
    tables."""
    return "\n".join(["", "```", *header, "```", ""]) + "\n" + "\n\n".join(t.markdown() for t in tables) + "\n"
