"""A real architecture search on CPU: the `search` flow over the tiny space, start to finish.

Runs the Prefect flow (Ray actors evaluate candidates, results in Parquet under a data root), then
copies its Pareto front to bench/results/search.json and its plot to bench/results/search.png,
with the figures that say whether evolution helped: the worst, median and best of the random
initial population against the best child.

    python bench/search.py                      # ~32 candidates, 2 workers: a few minutes on 2 cores
    python bench/search.py --evaluations 64 --data-root /tmp/reverie-search
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=32)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--sample", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--throughput-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", help="where the run's Parquet goes (default: a temporary directory)")
    parser.add_argument("--run-id", default="bench-tiny")
    args = parser.parse_args()

    # The flow runs on Prefect's temporary local server; on a busy 2-core machine it needs longer
    # than the default 20 s to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from pipelines.search import front_rows, search
    from storage.search_results import SearchResults

    data_root = args.data_root or tempfile.mkdtemp(prefix="reverie-search-")
    started = time.perf_counter()
    summary = search(run_id=args.run_id, space="tiny", evaluations=args.evaluations, population=args.population,
                     sample=args.sample, workers=args.workers, steps=args.steps,
                     throughput_weight=args.throughput_weight, seed=args.seed, data_root=data_root)
    seconds = time.perf_counter() - started

    results = SearchResults(data_root, summary["run_id"])
    rows = results.rows()
    ok = [r for r in rows if r["status"] == "ok"]
    initial = [r["bpb"] for r in ok if r["parent_id"] is None]
    children = [r["bpb"] for r in ok if r["parent_id"] is not None]
    keep = ("seq", "candidate_id", "parent_id", "genome_key", "status", "bpb", "bytes_per_s", "params",
            "train_seconds", "objective", "attempts", "reused_from")
    report = {
        "space": "tiny", "run_id": summary["run_id"], "seconds": seconds,
        "settings": {k: getattr(args, k) for k in ("evaluations", "population", "sample", "workers", "steps",
                                                   "throughput_weight", "seed")},
        "evaluations": len(rows), "failed": len(rows) - len(ok),
        "reused": sum(r["reused_from"] is not None for r in rows),
        "initial_population_bpb": {"worst": max(initial), "median": statistics.median(initial), "best": min(initial)},
        "best_child_bpb": min(children) if children else None,
        "best": results.read_json("best_genome.json"),
        "front": [{k: r[k] for k in keep} for r in front_rows(rows)],
        "all": [{k: r[k] for k in keep} for r in rows],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "search.png").write_bytes(results.store.read_bytes(f"{results.prefix}/pareto_front.png"))
    print(f"{len(rows)} evaluations in {seconds:.0f} s; initial population bpb worst/median/best "
          f"{report['initial_population_bpb']['worst']:.3f}/{report['initial_population_bpb']['median']:.3f}/"
          f"{report['initial_population_bpb']['best']:.3f}, best child {report['best_child_bpb']}")
    for row in report["front"]:
        print(f"  {row['genome_key']:<46}{row['bpb']:>8.3f}{row['bytes_per_s']:>10,.0f} B/s{row['params']:>9,}")
    print(f"wrote {RESULTS / 'search.json'} and {RESULTS / 'search.png'}")


if __name__ == "__main__":
    main()
