"""The ServerApp: runs N rounds of the robust BitDelta strategy and stores the result.

The run starts from the promoted slow weights, and ends by saving the sum of its aggregates to the
delta store under that base version (`deltas/<base>/aggregates/<name>`), where the next sleep
picks it up. The run summary (every round's accepted, rejected and bounded clients, metrics and
timings) goes into the stored delta's metadata and, if `summary-path` is set, to a JSON file.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from federation import LOGGER_NAME
from federation.settings import FederationSettings
from federation.store import load_base, save_aggregate
from federation.strategy import RobustBitDelta
from federation.task import round_version

log = logging.getLogger(LOGGER_NAME)


def build(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; `overrides` are run-config values (used by simulations, whose run config is empty)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, FederationSettings.from_run_config({**context.run_config, **(overrides or {})}))

    return app


def run_federation(grid: Grid, settings: FederationSettings) -> dict[str, Any]:
    """Rounds, then the aggregate to the delta store; returns the run summary."""
    started = time.perf_counter()
    base = load_base(settings.store, settings.base, settings.preset, settings.seed)
    run_tag = uuid.uuid4().hex[:8]
    strategy = RobustBitDelta(settings, base, run_tag)
    initial = ArrayRecord(base.weights)
    strategy.evaluate_initial(grid, initial)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.num_server_rounds,
                   timeout=settings.round_timeout)
    reports = strategy.report_dicts()
    summary: dict[str, Any] = {
        "run_tag": run_tag,
        "base_version": base.version,
        "final_version": round_version(base.version, run_tag, settings.num_server_rounds + 1),
        "initial_heldout_bpb": strategy.initial_heldout_bpb,
        "final_heldout_bpb": reports[-1]["heldout_bpb"] if reports else None,
        "matrices": len(strategy.shapes),
        "rounds": reports,
        "settings": settings.to_run_config(),
        "aggregate": None,
    }
    if any(r["accepted"] for r in reports):
        name = settings.aggregate_name or f"federated-{datetime.now(UTC):%Y%m%dT%H%M%S}-{run_tag}"
        meta = {"source": "flower", "format": "dense-fp32", "run_tag": run_tag, "rounds": reports,
                "initial_heldout_bpb": summary["initial_heldout_bpb"],
                "final_heldout_bpb": summary["final_heldout_bpb"], "settings": summary["settings"]}
        where = save_aggregate(settings.store, name, base.version, strategy.total, meta)
        summary["aggregate"] = {"name": name, "location": where}
        log.info("stored the run's aggregate (%d matrices) at %s", len(strategy.total), where)
    else:
        log.warning("no update was accepted in any round; nothing stored")
    summary["seconds"] = time.perf_counter() - started
    if settings.summary_path:
        path = Path(settings.summary_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


app = build()
