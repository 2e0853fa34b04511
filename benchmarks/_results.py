"""What the benchmark scripts share: a JSON-lines store of results that a rerun resumes from."""
from __future__ import annotations

import json
from pathlib import Path


class Results:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    def get(self, **key):
        return next((r for r in self.rows if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row
