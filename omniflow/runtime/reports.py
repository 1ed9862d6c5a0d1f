"""Files written for people and tools: JSON replaced atomically, markdown tables. No torch: the grid runner and
generate_text.py use them before (or without) loading a model."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, value) -> Path:
    """Write ``value`` as JSON through a temporary file, so that a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def markdown_table(columns: list[str], records: list[dict]) -> str:
    def cell(value) -> str:
        text = " / ".join(map(str, value)) if isinstance(value, list) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(key, "")) for key in columns) + " |" for r in records])
