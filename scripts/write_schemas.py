"""Write the published JSON Schemas (docs/schemas/) from the ones llmctl enforces.

Run after changing a schema: `.venv/bin/python scripts/write_schemas.py`; tests fail while they differ."""

from __future__ import annotations

import json
from pathlib import Path

from manager.charts import CHART_SCHEMA
from manager.manifest import SCHEMA
from manager.policy import POLICY_SCHEMA
from manager.stack import STACK_SCHEMA

OUT = Path(__file__).resolve().parent.parent / "docs" / "schemas"

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, schema in (
        ("model-v1", SCHEMA),
        ("trust-policy-v1", POLICY_SCHEMA),
        ("chart-v1", CHART_SCHEMA),
        ("stack-v1", STACK_SCHEMA),
    ):
        (OUT / f"{name}.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {OUT / name}.json")
