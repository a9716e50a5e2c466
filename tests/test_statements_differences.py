"""``statements verify`` and re-issue compare figures with ``compute.statements.document.differences``:
every key figure and every site's Scope 1/2 must be compared, each beyond the tolerance reported
with its old and new value, and nothing within it. Pure and fast (no services): the module's
mutation tests and the guarantee "verify detects any figure that does not reproduce" (issue 17)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from compute.statements.document import KEY_FIGURES, REL_TOL, close, differences, figure


def figures() -> dict[str, Any]:
    """A statement's stated content: its figures (the rest of the document is compared the same way)."""
    return {"figures": {
        "totals": {
            "scope1": 10.0, "scope2_location": 20.0, "scope2_market": 15.0,
            "total_location": 30.0, "total_market": 25.0, "energy_kwh": 1000.0,
        },
        "renewable_share": 0.25,
        "coverage": {"measured_share": 0.99, "bucket_share": 0.98},
        "per_site": {
            "site-a": {"scope1": 4.0, "scope2_location": 8.0, "scope2_market": 6.0},
            "site-b": {"scope1": 6.0, "scope2_location": 12.0, "scope2_market": 9.0},
        },
    }}


def changed(doc: dict[str, Any], path: str, value: float) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


PATHS = [f"figures.{k}" for k in KEY_FIGURES] + [
    f"figures.per_site.{s}.{k}"
    for s in ("site-a", "site-b")
    for k in ("scope1", "scope2_location", "scope2_market")
]


def test_same_figures_have_no_differences() -> None:
    assert differences(figures(), figures()) == []


@pytest.mark.parametrize("path", PATHS)
def test_every_figure_that_does_not_reproduce_is_reported(path: str) -> None:
    old = figures()
    a = figure(old, path)
    b = a * 1.001 + 0.5
    assert differences(old, changed(old, path, b)) == [{"figure": path, "old": a, "new": b, "delta": b - a}]


def test_a_site_missing_on_one_side_counts_as_zero() -> None:
    old, new = figures(), figures()
    del new["figures"]["per_site"]["site-b"]
    assert [d["figure"] for d in differences(old, new)] == [
        "figures.per_site.site-b.scope1", "figures.per_site.site-b.scope2_location",
        "figures.per_site.site-b.scope2_market",
    ]
    first = {"figure": "figures.per_site.site-b.scope1", "old": 6.0, "new": 0.0, "delta": -6.0}
    assert differences(old, new)[0] == first
    assert [d["old"] for d in differences(new, old)] == [0.0, 0.0, 0.0]


def test_the_tolerance_is_relative_and_tiny() -> None:
    assert close(1000.0, 1000.0 * (1 + REL_TOL / 2))
    assert not close(1000.0, 1000.0 * (1 + REL_TOL * 4))
    assert close(0.0, 1e-10) and not close(0.0, 1e-8)  # near zero: an absolute floor of 1e-9
    old = figures()
    assert differences(old, changed(old, "figures.totals.scope1", 10.0 * (1 + REL_TOL / 2))) == []
