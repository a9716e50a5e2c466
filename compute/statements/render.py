"""Renderings of a statement document: a three-page A4 PDF (matplotlib) and a long-format CSV.

Both are pure functions of the document, so re-rendering a stored JSON gives the same content.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from compute.statements import data_quality

A4 = (8.27, 11.69)
INK = "#1f2933"
MUTED = "#616e7c"
COLORS = {"scope1": "#c05621", "scope2_location": "#2b6cb0", "scope2_market": "#38a169"}
LABELS = {
    "scope1": "Scope 1",
    "scope2_location": "Scope 2 location-based",
    "scope2_market": "Scope 2 market-based",
}


def t(kg: float) -> str:
    """kg → tonnes CO2e, three decimals."""
    return f"{kg / 1000:,.3f}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f} %"


def _page(title: str, doc: dict[str, Any], page: int) -> Figure:
    fig = plt.figure(figsize=A4)
    fig.text(0.06, 0.965, title, fontsize=15, weight="bold", color=INK)
    sup = doc["supplier"]
    fig.text(
        0.06,
        0.945,
        f"{sup['name']}  ·  {doc['month']}  ·  version {doc['version']}",
        fontsize=9.5,
        color=MUTED,
    )
    fig.add_artist(Line2D([0.06, 0.94], [0.937, 0.937], color="#cbd2d9", lw=0.8))
    key = (doc.get("signing_key") or {}).get("fingerprint", "unsigned")
    foot = f"{doc['statement_id']}  ·  inputs sha256 {doc['inputs_digest'][:32]}…  ·  page {page}/3"
    fig.text(0.06, 0.02, foot, fontsize=7, color=MUTED)
    fig.text(0.06, 0.034, f"Signed with Ed25519 key {key}", fontsize=6, color=MUTED, family="monospace")
    if doc["provisional"]:
        fig.text(
            0.5,
            0.5,
            "PROVISIONAL",
            fontsize=90,
            color="#c53030",
            alpha=0.12,
            ha="center",
            va="center",
            rotation=35,
            weight="bold",
        )
        fig.text(
            0.94,
            0.945,
            "PROVISIONAL — not final",
            fontsize=10,
            color="#c53030",
            weight="bold",
            ha="right",
        )
    fig.text(0.94, 0.02, "scopemeter", fontsize=7, color=MUTED, ha="right")
    return fig


def _table(
    fig: Figure, top: float, height: float, title: str, header: list[str], rows: list[list[str]]
) -> None:
    fig.text(0.06, top, title, fontsize=10.5, weight="bold", color=INK)
    ax = fig.add_axes((0.06, top - height - 0.005, 0.88, height))
    ax.axis("off")
    if not rows:
        ax.text(0, 0.9, "none", fontsize=8.5, color=MUTED, va="top")
        return
    # Column widths follow the longest text in each column, so nothing is clipped.
    longest = [max(len(str(x)) for x in col) + 2 for col in zip(header, *rows, strict=True)]
    widths = [n / sum(longest) for n in longest]
    tab = ax.table(
        cellText=rows, colLabels=header, colWidths=widths, loc="upper center", cellLoc="left", colLoc="left"
    )
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.25)
    for (r, _c), cell in tab.get_celld().items():
        cell.set_edgecolor("#e4e7eb")
        if r == 0:
            cell.set_facecolor("#f0f4f8")
            cell.set_text_props(weight="bold", color=INK)


def _summary_page(doc: dict[str, Any]) -> Figure:
    f = doc["figures"]
    tot = f["totals"]
    kind = "Annual" if doc["figures"].get("period_kind") == "year" else "Monthly"
    fig = _page(f"{kind} GHG emission statement (Scope 1 and 2)", doc, 1)
    period = "year" if doc["figures"].get("period_kind") == "year" else "month"
    status = (
        f"PROVISIONAL — {period} incomplete (see notes)" if doc["provisional"] else f"Final for the {period}"
    )
    if doc.get("audience", "supplier") != "supplier":
        mine = doc["allocation"][0]["customer_name"] if doc["allocation"] else doc["audience"]
        status += f"  ·  for {mine}"
    if doc["supersedes"]:
        status += f"  ·  supersedes version {doc['supersedes']['version']}"
    fig.text(0.06, 0.915, f"Issued {doc['issued_at'][:19]}Z  ·  {status}", fontsize=8.5, color=MUTED)
    mom = doc["month_on_month"] or {}

    def change(key: str) -> str:
        return pct(mom[key]["change_pct"]) if key in mom else "n/a"

    key_rows = [
        ["Scope 1 (direct combustion)", t(tot["scope1"]), "t CO2e", change("scope1")],
        ["Scope 2 location-based", t(tot["scope2_location"]), "t CO2e", change("scope2_location")],
        ["Scope 2 market-based", t(tot["scope2_market"]), "t CO2e", change("scope2_market")],
        ["Total, location-based", t(tot["total_location"]), "t CO2e", change("total_location")],
        ["Total, market-based", t(tot["total_market"]), "t CO2e", change("total_market")],
        ["Energy consumed", f"{tot['energy_kwh']:,.1f}", "kWh", change("energy_kwh")],
        ["Renewable share of electricity", f"{f['renewable_share'] * 100:.1f}", "%", ""],
        ["Data coverage (measured energy)", f"{f['coverage']['measured_share'] * 100:.1f}", "%", ""],
        ["15-min intervals with data", f"{f['coverage']['bucket_share'] * 100:.1f}", "%", ""],
    ]
    if doc["intensity"]:
        i = doc["intensity"]
        key_rows.append(
            [f"Intensity, location (per {i['unit']})", f"{i['kg_co2e_per_unit_location']:.4f}", "kg CO2e", ""]
        )
        key_rows.append(
            [f"Intensity, market (per {i['unit']})", f"{i['kg_co2e_per_unit_market']:.4f}", "kg CO2e", ""]
        )
    prev = doc["month_on_month"]["previous_month"] if doc["month_on_month"] else None
    _table(
        fig,
        0.885,
        0.27,
        "Key figures",
        ["Figure", "Value", "Unit", f"vs {prev or 'previous month'}"],
        key_rows,
    )
    sites = [
        [s["site_id"], s["name"], s["grid_region"], s["timezone"], str(s["meters"]), ", ".join(s["carriers"])]
        for s in f["boundary"]
    ]
    _table(
        fig,
        0.57,
        0.03 + 0.022 * len(sites),
        "Organisational boundary (sites)",
        ["Site", "Name", "Grid region", "Time zone", "Meters", "Carriers"],
        sites,
    )
    top = 0.5 - 0.022 * len(sites)
    energy = [
        [c, f"{e['amount']:,.1f}", f"{e['estimated']:,.1f}", e["unit"]]
        for c, e in f["energy_by_carrier"].items()
    ]
    _table(
        fig,
        top,
        0.03 + 0.022 * len(energy),
        "Energy by carrier",
        ["Carrier", "Consumed", "of which estimated", "Unit"],
        energy,
    )
    top -= 0.08 + 0.022 * len(energy)
    fuels = [[c, t(kg)] for c, kg in f["scope1_by_fuel"].items()]
    _table(fig, top, 0.03 + 0.022 * max(1, len(fuels)), "Scope 1 by fuel", ["Fuel", "t CO2e"], fuels)
    top -= 0.08 + 0.022 * max(1, len(fuels))
    notes = [f"Not final: {r}" for r in doc.get("incomplete_reasons", [])]
    basis_names = {
        "residual-mix": "residual-mix factor",
        "excl-market-nonfossil": "grid factor excluding market-traded non-fossil power",
        "location": "location-based grid factor (no residual factor published)",
        "none": "no factor",
    }
    for site, bases in f.get("market_residual_basis", {}).items():
        used = ", ".join(f"{basis_names.get(b, b)} ({kwh:,.0f} kWh)" for b, kwh in bases.items() if kwh > 0)
        if used:
            notes.append(f"Market-based, {site}: consumption not covered by instruments uses the {used}.")
    if f["market_fallback_sites"]:
        notes.append(
            "Market-based Scope 2 equals location-based for sites without contractual instruments: "
            + ", ".join(f["market_fallback_sites"])
            + "."
        )
    if f["coverage"]["buckets_without_factor"]:
        notes.append(
            f"{f['coverage']['buckets_without_factor']} intervals had no emission factor and carry no "
            "emissions."
        )
    notes.append("Method: GHG Protocol Corporate Standard and Scope 2 Guidance; 15-minute metered energy.")
    for n, line in enumerate(notes):
        fig.text(0.06, top - 0.02 * n, line, fontsize=7.5, color=MUTED, wrap=True)
    return fig


def _charts_page(doc: dict[str, Any]) -> Figure:
    f = doc["figures"]
    fig = _page("Emissions charts", doc, 2)
    days: Any = [date.fromisoformat(d["date"]) for d in f["daily"]]
    ax: Axes = fig.add_axes((0.1, 0.62, 0.84, 0.25))
    s1 = [d["scope1"] / 1000 for d in f["daily"]]
    s2 = [d["scope2_location"] / 1000 for d in f["daily"]]
    ax.bar(days, s1, color=COLORS["scope1"], label=LABELS["scope1"])
    ax.bar(days, s2, bottom=s1, color=COLORS["scope2_location"], label=LABELS["scope2_location"])
    ax.plot(
        days,
        [a + d["scope2_market"] / 1000 for a, d in zip(s1, f["daily"], strict=True)],
        color=COLORS["scope2_market"],
        marker=".",
        lw=1.2,
        label="Total, market-based",
    )
    ax.set_title("Daily emissions (site-local days)", fontsize=10, loc="left", color=INK, pad=20)
    ax.set_ylabel("t CO2e")
    ax.legend(fontsize=7, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3)
    ax.tick_params(labelsize=7)
    fig.autofmt_xdate(rotation=45)

    sites = sorted(f["per_site"])
    ax = fig.add_axes((0.1, 0.32, 0.84, 0.2))
    width = 0.27
    for k, key in enumerate(("scope1", "scope2_location", "scope2_market")):
        ax.barh(
            [i + (k - 1) * width for i in range(len(sites))],
            [f["per_site"][s][key] / 1000 for s in sites],
            height=width,
            color=COLORS[key],
            label=LABELS[key],
        )
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_title("Per-site breakdown", fontsize=10, loc="left", color=INK)
    ax.set_xlabel("t CO2e", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)

    tot = f["totals"]
    ax = fig.add_axes((0.1, 0.07, 0.36, 0.19))
    ax.bar(
        ["Scope 1", "Scope 2\n(location)"],
        [tot["scope1"] / 1000, tot["scope2_location"] / 1000],
        color=[COLORS["scope1"], COLORS["scope2_location"]],
    )
    ax.set_title("Scope 1 vs Scope 2", fontsize=10, loc="left", color=INK)
    ax.set_ylabel("t CO2e", fontsize=8)
    ax.tick_params(labelsize=7)
    ax = fig.add_axes((0.58, 0.07, 0.36, 0.19))
    ax.bar(
        ["Location-based", "Market-based"],
        [tot["scope2_location"] / 1000, tot["scope2_market"] / 1000],
        color=[COLORS["scope2_location"], COLORS["scope2_market"]],
    )
    ax.set_title("Scope 2: location vs market", fontsize=10, loc="left", color=INK)
    ax.tick_params(labelsize=7)
    return fig


def _detail_page(doc: dict[str, Any]) -> Figure:
    f = doc["figures"]
    fig = _page("Allocation to customers, data sources and integrity", doc, 3)
    alloc = [
        [
            a["customer_name"],
            f"{a['share'] * 100:.1f} % ({a['basis']})",
            t(a["scope1_kg"]),
            t(a["scope2_location_kg"]),
            t(a["scope2_market_kg"]),
            t(a["total_market_kg"]),
        ]
        for a in doc["allocation"]
    ]
    _table(
        fig,
        0.91,
        0.03 + 0.022 * max(1, len(alloc)),
        "Allocation for customers' Scope 3 (cat. 1 purchased goods), t CO2e",
        ["Customer", "Share", "Scope 1", "S2 location", "S2 market", "Total (market)"],
        alloc,
    )
    top = 0.83 - 0.022 * max(1, len(alloc))
    factors = [
        [
            x["factor_id"],
            x["publisher"],
            x["series"],
            f"{x['kg_co2e_per_unit']:.4f}/{x['unit']}",
            f"v{x['version']}",
            f"{x['valid_from']}…{x['valid_to']}",
        ]
        for x in f["factors"]
    ]
    _table(
        fig,
        top,
        0.03 + 0.022 * max(1, len(factors)),
        "Emission factors (sources and versions)",
        ["Factor", "Publisher", "Series", "kg CO2e", "Ver.", "Validity"],
        factors,
    )
    top -= 0.08 + 0.022 * max(1, len(factors))
    instruments = [
        [
            x["instrument_id"],
            x["site_id"],
            x["kind"].upper(),
            f"{x['claimed_mwh']:,.3f}",
            f"{x['mwh']:,.3f}",
            x.get("serials") or x["reference"],
            x["market_boundary"],
            f"{x['period_start']}…{x['period_end']}" + (" hourly" if x["hourly"] else ""),
        ]
        for x in f["instruments"]
    ]
    _table(
        fig,
        top,
        0.03 + 0.022 * max(1, len(instruments)),
        "Contractual instruments claimed this month (market-based Scope 2)",
        ["Instrument", "Site", "Kind", "Claimed MWh", "of MWh", "Serials / contract", "Market", "Generated"],
        instruments,
    )
    top -= 0.08 + 0.022 * max(1, len(instruments))
    cov = [
        [
            c["site_id"],
            c["carrier"],
            f"{c['measured']:,.1f} {c['unit']}",
            f"{c['estimated']:,.1f} {c['unit']}",
            f"{c['buckets_with_data']}/{c['buckets_in_month']}",
        ]
        for c in f["coverage"]["by_site_carrier"]
    ]
    _table(
        fig,
        top,
        0.03 + 0.022 * max(1, len(cov)),
        "Data coverage (measured vs estimated)",
        ["Site", "Carrier", "Measured", "Estimated", "15-min intervals"],
        cov,
    )
    top -= 0.08 + 0.022 * max(1, len(cov))
    if doc["supersedes"]:
        s = doc["supersedes"]
        rows = [
            [c["figure"], f"{c['old']:,.3f}", f"{c['new']:,.3f}", f"{c['delta']:+,.3f}"]
            for c in s["changes"][:12]
        ]
        if len(s["changes"]) > 12:
            rows.append([f"… {len(s['changes']) - 12} more (CSV and JSON list all)", "", "", ""])
        _table(
            fig,
            top,
            0.03 + 0.022 * max(1, len(rows)),
            f"Changes since version {s['version']} (issued {s['issued_at'][:19]}Z; late data)",
            ["Figure", "Old", "New", "Difference"],
            rows,
        )
        top -= 0.08 + 0.022 * max(1, len(rows))
    r = doc["inputs"]["readings"]
    lines = [
        "Integrity",
        f"Inputs digest (SHA-256): {doc['inputs_digest']}",
        f"Readings: {r['count']:,} rows, SHA-256 {r['sha256']}",
        "Signature: Ed25519 over the canonical JSON statement (statement.json), which lists the SHA-256 of",
        "this PDF and of the CSV. Check the files as received with the supplier's public key:",
        "`scopemeter statements verify --offline --public-key KEY.pub FILES… [index.json]`.",
        f"Statement id: {doc['statement_id']}",
    ]
    lines += data_quality.pdf_lines(doc)
    for n, line in enumerate(lines):
        fig.text(
            0.06,
            max(top, 0.2) - 0.018 * n,
            line,
            fontsize=10.5 if n == 0 else 7.5,
            weight="bold" if n == 0 else "normal",
            color=INK if n == 0 else MUTED,
            family=None if n == 0 else "monospace",
        )
    return fig


def write_pdf(doc: dict[str, Any], path: Path) -> None:
    with PdfPages(
        path,
        metadata={
            "Title": f"GHG statement {doc['statement_id']}",
            "Creator": "scopemeter",
            "CreationDate": None,
        },
    ) as pdf:
        for build in (_summary_page, _charts_page, _detail_page):
            fig = build(doc)
            pdf.savefig(fig)
            plt.close(fig)


# Every row names its statement (supplier, period, version) so rows from many statements can be
# stacked in one table without losing where they came from.
CSV_HEADER = [
    "supplier_id",
    "period",
    "version",
    "section",
    "site_id",
    "customer",
    "carrier",
    "scope",
    "method",
    "date",
    "metric",
    "value",
    "unit",
]


def csv_text(doc: dict[str, Any]) -> str:
    """One row per figure: easy to load into a customer's Scope 3 tooling."""
    f = doc["figures"]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_HEADER)

    ident = [doc["supplier"]["id"], doc["month"], doc["version"]]

    def row(section: str, metric: str, value: Any, unit: str, **kw: Any) -> None:
        w.writerow(
            [
                *ident,
                section,
                kw.get("site", ""),
                kw.get("customer", ""),
                kw.get("carrier", ""),
                kw.get("scope", ""),
                kw.get("method", ""),
                kw.get("day", ""),
                metric,
                repr(value) if isinstance(value, float) else value,
                unit,
            ]
        )

    for k, v in f["totals"].items():
        row("totals", k, v, "kWh" if k == "energy_kwh" else "kg CO2e")
    row("totals", "renewable_share", f["renewable_share"], "fraction")
    row("totals", "measured_share", f["coverage"]["measured_share"], "fraction")
    for carrier, e in f["energy_by_carrier"].items():
        row("energy", "consumed", e["amount"], e["unit"], carrier=carrier)
        row("energy", "estimated", e["estimated"], e["unit"], carrier=carrier)
    for fuel, kg in f["scope1_by_fuel"].items():
        row("scope1", "kg_co2e", kg, "kg CO2e", carrier=fuel, scope=1)
    row("status", "provisional", int(doc["provisional"]), "1 = not final")
    for reason in doc.get("incomplete_reasons", []):
        row("status", "incomplete", reason, "reason")
    for x in f["instruments"]:
        row(
            "instrument",
            x["instrument_id"],
            x["claimed_mwh"],
            "MWh claimed in the month",
            site=x["site_id"],
            carrier=x["carrier"],
            scope=2,
        )
    for site, bases in f.get("market_residual_basis", {}).items():
        for basis, kwh in bases.items():
            row("market_residual_basis", basis, kwh, "kWh", site=site, scope=2, method="market")
    for ln in f["lines"]:
        row(
            "site",
            "activity",
            ln["kwh"],
            ln["unit"],
            site=ln["site_id"],
            carrier=ln["carrier"],
            scope=ln["scope"],
            method=ln["method"],
        )
        row(
            "site",
            "kg_co2e",
            ln["kg_co2e"],
            "kg CO2e",
            site=ln["site_id"],
            carrier=ln["carrier"],
            scope=ln["scope"],
            method=ln["method"],
        )
    for a in f.get("not_metered", []):
        what = a["gas"] or a["carrier"] or ""
        row(
            "not_metered",
            f"{a['kind']}:{a['record_id']}",
            a["amount"],
            a["unit"],
            site=a["site_id"],
            carrier=what,
        )
        if a["kg_co2e"] is not None:
            row(
                "not_metered",
                f"{a['kind']}:{a['record_id']}",
                a["kg_co2e"],
                "kg CO2e",
                site=a["site_id"],
                scope=1,
            )
    for d in f["daily"]:
        for k in ("scope1", "scope2_location", "scope2_market"):
            row("daily", k, d[k], "kg CO2e", day=d["date"])
    for a in doc["allocation"]:
        for k in (
            "share",
            "scope1_kg",
            "scope2_location_kg",
            "scope2_market_kg",
            "total_location_kg",
            "total_market_kg",
        ):
            row("allocation", k, a[k], "fraction" if k == "share" else "kg CO2e", customer=a["customer"])
    if doc["intensity"]:
        i = doc["intensity"]
        row("intensity", "kg_co2e_per_unit_location", i["kg_co2e_per_unit_location"], f"kg CO2e/{i['unit']}")
        row("intensity", "kg_co2e_per_unit_market", i["kg_co2e_per_unit_market"], f"kg CO2e/{i['unit']}")
    for section, metric, value, unit, site in data_quality.csv_rows(doc):
        row(section, metric, value, unit, site=site)
    for c in (doc["supersedes"] or {}).get("changes", []):
        row("changes", c["figure"], c["delta"], "difference vs superseded version")
    return out.getvalue()
