"""What the launcher's supervisor knows about the processes it runs, shared with the edge's
/health: `<data_dir>/run/status.json` maps each process that is not up to its state,
`restarting` (exited, started again or about to be, not answering yet) or `failed` (given up on
after too many restarts; it stays down until the platform is restarted). A process that serves is
absent. The edge cannot probe the PG Gateway or Caddy over gRPC, so this file is how /health
learns of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

STATUS_FILE = Path("run") / "status.json"
RESTARTING = "restarting"
FAILED = "failed"


def write_status(data_dir: Path, states: dict[str, str]) -> None:
    """Replace the file at once: a reader never sees half of it."""
    path = data_dir / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(sorted(states.items()))) + "\n")
    os.replace(tmp, path)


def read_status(data_dir: Path) -> dict[str, str]:
    """The states written by the launcher; empty when no launcher supervises this data dir."""
    try:
        raw = json.loads((data_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v in (RESTARTING, FAILED)}
