"""Rich tables: one per suite, with the machine in the caption."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kaggletrain.bench.runner import suite_module, subtitle


def _note(r: dict) -> str:
    if "skip" in r:
        return f"[dim]skipped: {r['skip']}[/]"
    if r.get("oom"):
        return "[yellow]out of memory[/]"
    if "error" in r:
        return f"[red]{r['error']}[/]"
    return ""


def render(doc: dict, console: Console) -> None:
    for name, entry in doc["suites"].items():
        mod = suite_module(name)
        rows = entry["rows"]
        notes = [_note(r) for r in rows]
        caption = f"{subtitle(doc)}; times: median ±half the min-max range of {doc['settings']['repeats']} runs"
        table = Table(title=f"[bold]{name}[/]: {entry['title']}", caption=caption, title_justify="left")
        for i, col in enumerate(mod.COLUMNS):
            table.add_column(col, justify="left" if i == 0 else "right")
        if any(notes):
            table.add_column("note")
        for r, note in zip(rows, notes):
            cells = mod.table_row(r)
            table.add_row(*cells, *([note] if any(notes) else []))
        console.print(table)
        if entry.get("chart"):
            console.print(f"  chart: {entry['chart']}")
