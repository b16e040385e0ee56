"""The demo's report: a table on the terminal, and the same numbers as JSON and a PNG beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def table(report: dict[str, Any]) -> str:
    """The report as two aligned columns, in the order of the story."""
    versions, recall, bpb, fed = report["versions"], report["recall"], report["bpb"], report["federation"]
    rows = [
        ("versions", f"{versions['initial']} -> {_fmt(versions['promoted'])} "
                     f"(replies by day: {', '.join(versions['served_by_day'])}; "
                     f"after the sleep: {_fmt(versions['served_after_sleep'])})"),
        ("day", f"{report['day']['users']} users, {report['day']['turns']} turns, p50 {report['day']['p50_ms']} ms"),
        ("gate", "passed" if report["gate"]["passed"] else "FAILED: " + "; ".join(report["gate"]["failures"])),
        ("recall, memory wiped, no sleep", _fmt(recall["before_sleep"], ".2f")),
        ("recall, memory wiped, after sleep", _fmt(recall.get("after_sleep"), ".2f")),
        ("  same facts, other users' weights", _fmt(recall.get("shared_after_sleep"), ".2f")),
        ("held-out bits/byte before", _fmt(bpb["base_bpb"], ".4f")),
        ("held-out bits/byte after (shared)", _fmt(bpb["shared_bpb"], ".4f")),
        ("bits/byte drift shared / personal (max)",
         f"{_fmt(bpb['bpb_rise'], '+.2%')} / {_fmt(bpb['personal_bpb_rise'], '+.2%')}"),
    ]
    if fed:
        rows += [
            ("federation", f"{fed['clients']} clients x {fed['rounds']} round(s), accepted {fed['accepted']}"),
            ("  bytes uploaded per client", f"{_fmt(fed['upload_bytes_per_client'], ',')} "
                                            f"(dense fp16 delta: {_fmt(fed['dense_fp16_bytes'], ',')})"),
            ("  device held-out bits/byte", f"{_fmt(fed['device_heldout_bpb_before'], '.3f')} -> "
                                            f"{_fmt(fed['device_heldout_bpb_after'], '.3f')}"),
        ]
    rows += [(f"time: {name}", f"{seconds:.1f} s") for name, seconds in report["timings_s"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Recall before/after, bits per byte before/after, and where the time went."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    recall, bpb, timings = report["recall"], report["bpb"], dict(report["timings_s"])
    timings.pop("total", None)
    fig, (ax_recall, ax_bpb, ax_time) = plt.subplots(1, 3, figsize=(13, 3.8))
    bars = {"no sleep": recall["before_sleep"], "after sleep": recall.get("after_sleep") or 0.0,
            "other users\nafter sleep": recall.get("shared_after_sleep") or 0.0}
    ax_recall.bar(list(bars), list(bars.values()), color=["#999999", "#2a7ab0", "#d08c2f"])
    ax_recall.set_ylim(0, 1.05)
    ax_recall.set_title("recall, fast memory wiped")
    if bpb["base_bpb"] is not None:
        values = {"before": bpb["base_bpb"], "after\n(shared)": bpb["shared_bpb"],
                  "after, personal\n(worst user)": bpb["base_bpb"] * (1 + bpb["personal_bpb_rise"])}
        ax_bpb.bar(list(values), list(values.values()), color=["#999999", "#2a7ab0", "#2a7ab0"])
        ax_bpb.set_ylim(min(values.values()) * 0.9, max(values.values()) * 1.02)
    ax_bpb.set_title("held-out bits per byte")
    ax_time.barh(list(timings), list(timings.values()), color="#2a7ab0")
    ax_time.invert_yaxis()
    ax_time.set_xlabel("seconds")
    ax_time.set_title(f"phases ({report['timings_s']['total']:.0f} s in all)")
    versions = report["versions"]
    fig.suptitle(f"reverie demo, {report['config']['preset']}: {versions['initial']} -> {versions['promoted']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], directory: Path) -> dict[str, str]:
    """report.json and report.png in `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"json": str(directory / "report.json"), "png": str(directory / "report.png")}
    plot(report, Path(files["png"]))
    Path(files["json"]).write_text(json.dumps({**report, "files": files}, indent=2) + "\n")
    return files
