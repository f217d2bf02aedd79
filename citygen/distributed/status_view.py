"""A rich table of a tile's block states (what ``citygen status`` prints)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rich.table import Table

STATE_STYLES = {"pending": "dim", "running": "cyan", "done": "green", "failed": "bold red"}


def status_table(status: dict[str, Any]) -> Table:
    """Render :func:`citygen.distributed.tile_status` output as a table, one row per block."""
    counts = ", ".join(f"{n} {s}" for s, n in status["counts"].items() if n)
    table = Table(title=f"{status['tile_dir']}: {status['total']} blocks ({counts})", title_justify="left")
    for column in ("block", "state", "attempts", "step", "host", "pid", "updated", "error"):
        table.add_column(column, justify="right" if column in ("attempts", "step", "pid") else "left")
    now = datetime.now(timezone.utc)
    for block in status["blocks"]:
        state = block["state"]
        label = f"[{STATE_STYLES[state]}]{state}[/]"
        if block.get("alive") is False:
            label += " [yellow](worker gone)[/]"
        if block.get("holder") is not None:
            lease = block["holder"]
            # the holder's pid and host fill those columns; its start time is in `status --json`
            label += f" [dim](held, heartbeat {_age(lease.get('heartbeat'), now) or '?'})[/]"
        step = block.get("last_checkpoint_step")
        table.add_row(block["block_id"], label, str(block.get("attempts", 0)), "" if step is None else str(step),
                      block.get("host") or "", str(block.get("pid") or ""), _age(block.get("updated"), now),
                      _short(block.get("error")))
    return table


def _age(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return ""
    seconds = (now - datetime.fromisoformat(stamp)).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return stamp[:19].replace("T", " ") + " UTC"


def _short(error: str | None, width: int = 60) -> str:
    if not error:
        return ""
    line = error.splitlines()[0]
    return line if len(line) <= width else line[: width - 1] + "…"
