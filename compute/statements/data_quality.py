"""The statement's data-quality section: the readings the compute engine quarantined.

``month_figures`` puts them in ``figures.quarantined`` (``compute.quarantine``), so verify
recomputes the list like every other figure; the PDF and CSV list them here. A month with any is
not Final (``compute.quarantine.quarantined`` is what the completeness check uses).
"""

from __future__ import annotations

from typing import Any

# The PDF lists this many; the JSON and the CSV list them all.
PDF_MAX: int = 12


def pdf_lines(doc: dict[str, Any]) -> list[str]:
    held = doc["figures"].get("quarantined", [])
    if not held:
        return ["", "Data quality: no reading quarantined (every reading within its meter's bounds)"]
    lines = [
        "",
        f"Data quality: {len(held)} readings quarantined, kept but left out of every figure:",
    ]
    lines += [
        f"  {q['ts']} {q['meter_id']} {q['quantity']} = {q['value']}: {q['reason']}" for q in held[:PDF_MAX]
    ]
    if len(held) > PDF_MAX:
        lines.append(f"  … and {len(held) - PDF_MAX} more (statement.json, statement.csv)")
    return lines


def csv_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(section, metric, value, unit, site): one row per quarantined reading."""
    return [
        (
            "quarantined",
            q["reason"],
            q["value"],
            f"{q['quantity']} at {q['ts']} ({q['meter_id']})",
            q["site_id"],
        )
        for q in doc["figures"].get("quarantined", [])
    ]
