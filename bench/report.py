"""Where a benchmark's figures go besides the screen: a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_json(path: Path | None, data: Any) -> None:
    """Write ``data`` to ``path`` as indented JSON (numpy scalars and the like as text); no
    path, nothing written."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
