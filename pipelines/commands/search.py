"""`reverie search`: evolve student architectures on Ray and keep the Pareto front and the best genome."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "search", help="evolutionary architecture search",
        description="Regularized evolution over the architecture genome, candidates evaluated by Ray "
                    "actors. Results go to <data root>/search/<run id>/ as Parquet; the Pareto front "
                    "(bits per byte vs throughput) as pareto_front.png and the best genome as "
                    "best_genome.json, which `reverie sleep --student search` distills the served model into. "
                    "Rerun with the same --run-id to resume or extend a run.")
    parser.add_argument("--run-id", help="name of the run (default: search-<UTC time>); reuse it to resume")
    parser.add_argument("--space", default="tiny", help="search space: tiny or small")
    parser.add_argument("--evaluations", type=int, default=32, help="candidates in all, initial population included")
    parser.add_argument("--population", type=int, default=8, help="size of the aging population")
    parser.add_argument("--sample", type=int, default=3, help="tournament size")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors evaluating in parallel")
    parser.add_argument("--steps", type=int, default=60, help="training steps per candidate")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--throughput-weight", type=float, default=0.1,
                        help="bits per byte that a doubling of throughput is worth when choosing parents and the best")
    parser.add_argument("--teacher", help="distill candidates from this checkpoint (path, or registry:current)")
    parser.add_argument("--data", help="corpus for training candidates (default: the embedded corpus)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # As `reverie sleep`: the ephemeral Prefect server may need more than 20 s to start on a busy
    # small machine; a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from pipelines.search import search  # noqa: PLC0415 - Prefect loads slowly
    from pipelines.settings import Settings  # noqa: PLC0415

    settings = Settings.load(args.config)
    summary = search(run_id=args.run_id, space=args.space, evaluations=args.evaluations,
                     population=args.population, sample=args.sample, workers=args.workers, steps=args.steps,
                     batch_size=args.batch_size, seq_len=args.seq_len, throughput_weight=args.throughput_weight,
                     teacher=args.teacher, corpus=args.data, seed=args.seed, data_root=settings.storage.root,
                     ray_address=settings.ray_address)
    print(f"{'genome':<46}{'bits/byte':>10}{'bytes/s':>10}{'params':>10}")
    for row in summary["front"]:
        print(f"{row['genome_key']:<46}{row['bpb']:>10.3f}{row['bytes_per_s']:>10,.0f}{row['params']:>10,}")
    best = summary["best"]
    print(json.dumps({"run_id": summary["run_id"], "evaluations": summary["evaluations"],
                      "best": best["genome_key"], "best_bpb": round(best["bpb"], 4),
                      "front_png": summary["front_png"], "best_genome": summary["best_genome"]}, indent=2))
    return 0
