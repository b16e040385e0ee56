"""Run the app in Flower's simulation runtime from Python (tests, benchmarks).

`flwr run .` is the way to run the app; this wraps `flwr.simulation.run_simulation` so a test or
a benchmark can run N virtual SuperNodes in-process, with its own settings, and get the run
summary back as a dict. Ray gets `num_cpus` cores, one per ClientApp.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from federation import client_app, server_app


def simulate(num_clients: int, overrides: Mapping[str, Any] | None = None, num_cpus: int = 2,
             verbose: bool = False) -> dict[str, Any]:
    """Run the federation over `num_clients` simulated devices; return the server's run summary.

    overrides: run-config values (dashed keys, as in pyproject.toml). min-clients defaults to
    `num_clients`, so every round waits for all of them. Telemetry is off unless
    FLWR_TELEMETRY_ENABLED says otherwise.
    """
    import ray  # noqa: PLC0415
    from flwr.simulation import run_simulation  # noqa: PLC0415 - pulls in Ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; Flower's simulation would reuse it and "
                           "shut it down when it ends. Call ray.shutdown() first, or simulate in another process")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    pythonpath = os.environ.get("PYTHONPATH")  # Flower's Ray backend overwrites it for its workers
    with tempfile.TemporaryDirectory(prefix="reverie-federation-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        config = {"min-clients": num_clients, **(overrides or {}), "summary-path": str(summary_path)}
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                run_simulation(server_app=server_app.build(config), client_app=client_app.build(config),
                               num_supernodes=num_clients, backend_config=backend, verbose_logging=verbose)
        finally:
            if pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = pythonpath
        if not summary_path.exists():
            raise RuntimeError("the simulated ServerApp ended without a summary; see the log above")
        return json.loads(summary_path.read_text())
