"""Plain-text tables for terminal output."""
from __future__ import annotations


def print_table(rows: list[dict], columns: list[str], indent: str = "") -> None:
    if not rows:
        print(f"{indent}(none)")
        return
    cells = [[("-" if r.get(c) in (None, "") else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(indent + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print(indent + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
