"""Turns a benchmark's markdown output (what `sparseadapter bench ... --markdown FILE` appends, or its
printed report pasted into a file) into a result record, for runs made without --record.

The text holds the run's metadata lines as a code block (fenced, or indented by four spaces), then its
tables; the paragraph right above a table is its caption, the paragraph right below it (unless that is
the next table's caption) its notes. A table's title is the caption's bold part (else its first clause).

    python scripts/record_from_markdown.py run.md --kind decode \\
        --command "sparseadapter bench decode --batch 1 16" --output benchmarks/results/decode-2026-12-05.json
"""

import argparse
import os
import re
import sys
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), ROOT]  # this checkout's package, not an installed one

from sparseadapter.bench.machine import meta_from_header  # noqa: E402
from sparseadapter.bench.record import KINDS, Record, write_record  # noqa: E402
from sparseadapter.bench.table import Table  # noqa: E402


def _cells(line: str) -> List[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _paragraphs(lines: List[str]) -> List[Tuple[str, List[str]]]:
    """("code" | "table" | "text", lines) blocks, split at blank lines and code fences."""
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.strip() == "```" or line.startswith("```"):
            end = next((k for k in range(i + 1, len(lines)) if lines[k].strip() == "```"), None)
            if end is None:
                raise ValueError(f"line {i + 1}: a code block that is never closed")
            blocks.append(("code", lines[i + 1 : end]))
            i = end + 1
        else:
            kind = "table" if line.startswith("|") else "code" if line.startswith("    ") else "text"
            end = i
            while end < len(lines) and lines[end].strip() and (lines[end].startswith("|") == (kind == "table")):
                end += 1
            block = lines[i:end]
            blocks.append((kind, [b[4:] for b in block] if kind == "code" else block))
            i = end
    return blocks


def _title(caption: Optional[str], index: int) -> str:
    if caption is None:
        return f"table {index}"
    bold = re.match(r"\*\*(.+?)\*\*", caption)
    return bold.group(1) if bold else re.split(r"[:;—]", caption)[0].strip()[:80]


def parse(text: str) -> Tuple[List[str], List[Table]]:
    """(the metadata lines, the tables) of a report."""
    blocks = _paragraphs(text.splitlines())
    header: Optional[List[str]] = next((b for kind, b in blocks if kind == "code"), None)
    if not header:
        raise ValueError("no metadata lines (a code block starting with 'date: ...') found")
    tables: List[Table] = []
    for n, (kind, block) in enumerate(blocks):
        if kind != "table":
            continue
        if len(block) < 2 or not re.fullmatch(r"\|(\s*-+:?\s*\|)+", block[1].strip()):
            raise ValueError(f"table {len(tables)}: its second line is not a |---| separator: {block[:2]}")
        before = blocks[n - 1] if n else None
        after = blocks[n + 1] if n + 1 < len(blocks) else None
        after_next = blocks[n + 2][0] if n + 2 < len(blocks) else None
        caption = " ".join(before[1]) if before and before[0] == "text" else None
        notes = after[1] if after and after[0] == "text" and after_next != "table" else []
        align = "".join("r" if c.endswith(":") else "l" for c in _cells(block[1]))
        tables.append(
            Table(
                _title(caption, len(tables)),
                _cells(block[0]),
                [_cells(x) for x in block[2:]],
                caption,
                notes,
                None if set(align) == {"l"} else align,
            )
        )
    if not tables:
        raise ValueError("no markdown table found")
    return header, tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the markdown output of one run")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--command", required=True, help="the command that produced it")
    p.add_argument("--output", required=True, help="the record to write (benchmarks/results/NAME.json)")
    args = p.parse_args(argv)
    try:
        with open(args.input, encoding="utf-8") as f:
            header, tables = parse(f.read())
        meta = meta_from_header(header)
        if meta["date"] is None:
            raise ValueError("the metadata lines have no 'date: ...' line")
        meta["header"] = header
        write_record(args.output, Record(args.kind, args.command, meta, tables))
    except (ValueError, OSError) as err:
        print(f"record_from_markdown: error: {args.input}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {len(tables)} table(s): " + "; ".join(t.title for t in tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
