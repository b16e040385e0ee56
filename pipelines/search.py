"""The `search` flow: evolve student architectures on Ray, publish the Pareto front, keep the best genome.

The story of a run: evolve (regularized evolution on a pool of Ray actors, `workers.evolution`; a
rerun with the same run id resumes from the results already in Parquet) -> the Pareto front of
held-out bits per byte against inference throughput, drawn as a PNG in the store and published as
a table artifact -> the best genome (lowest `objective`) saved as
`search/<run_id>/best_genome.json`, which a sleep run with `student="search"` (`reverie sleep
--student search`) reads with `load_best_genome` to get the student architecture it distills into.
"""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from model.genome import Fitness, Genome, pareto_front, search_space
from pipelines.settings import Settings
from storage.config import StorageConfig
from storage.search_results import SearchResults
from workers.evolution import EvaluationTask, EvolutionConfig, best_row, default_budget, fitness_of, run_evolution

FRONT_PNG = "pareto_front.png"


def new_run_id() -> str:
    return "search-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def front_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The successful evaluations that no other one beats on both bits per byte and throughput."""
    return pareto_front([r for r in rows if r["status"] == "ok"], fitness_of)


def plot_front(rows: list[dict[str, Any]], best: dict[str, Any], title: str) -> bytes:
    """PNG of every evaluation (bits per byte vs throughput), the front and the chosen genome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    front = sorted(front_rows(rows), key=lambda r: r["bytes_per_s"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    initial = [r for r in ok if r["parent_id"] is None]
    children = [r for r in ok if r["parent_id"] is not None]
    ax.scatter([r["bytes_per_s"] for r in initial], [r["bpb"] for r in initial], s=18, c="tab:gray",
               label="initial population")
    ax.scatter([r["bytes_per_s"] for r in children], [r["bpb"] for r in children], s=18, c="tab:blue", alpha=0.7,
               label="children")
    ax.step([r["bytes_per_s"] for r in front], [r["bpb"] for r in front], where="pre", c="tab:red", lw=1.2,
            marker="o", ms=5, label="Pareto front")
    for r in front:
        ax.annotate(r["genome_key"], (r["bytes_per_s"], r["bpb"]), fontsize=5.5, xytext=(3, 3),
                    textcoords="offset points")
    ax.scatter([best["bytes_per_s"]], [best["bpb"]], marker="*", s=220, c="gold", edgecolors="k", zorder=5,
               label="chosen (lowest objective)")
    ax.set_xscale("log")
    ax.set_xlabel("inference throughput (bytes/s, measured)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    return buffer.getvalue()


def best_genome_document(best: dict[str, Any], config: EvolutionConfig) -> dict[str, Any]:
    genome = Genome.from_json(best["genome"])
    fitness: Fitness = fitness_of(best)
    return {"candidate_id": best["candidate_id"], "genome_key": genome.key, "genome": genome.to_dict(),
            "config": search_space(config.task.space).to_config(genome).to_dict(),
            "fitness": dataclasses.asdict(fitness), "objective": fitness.objective(config.throughput_weight),
            "throughput_weight": config.throughput_weight,
            "space": config.task.space if isinstance(config.task.space, str) else "custom",
            "budget": dataclasses.asdict(config.task.budget),
            "mode": "distill" if config.task.teacher else "train", "teacher": config.task.teacher}


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def evolve(config: EvolutionConfig, storage: StorageConfig, run_id: str, ray_address: str | None
           ) -> list[dict[str, Any]]:
    """Run or resume the evolution; a retry resumes from the rows already recorded."""
    return run_evolution(config, storage.root, run_id, ray_address)


@task(cache_policy=NO_CACHE)
def publish_front(rows: list[dict[str, Any]], best: dict[str, Any], results: SearchResults) -> str:
    """Store the front's PNG beside the results and publish the front as a table artifact."""
    front = front_rows(rows)
    title = f"search {results.run_id}: {len(rows)} evaluations, {len(front)} on the front"
    key = f"{results.prefix}/{FRONT_PNG}"
    results.store.write_bytes(key, plot_front(rows, best, title))
    table = [{"genome": r["genome_key"], "bits_per_byte": round(r["bpb"], 4), "bytes_per_s": round(r["bytes_per_s"]),
              "params": r["params"], "candidate": r["candidate_id"]} for r in front]
    create_table_artifact(table=table, key="search-pareto-front",
                          description=f"Pareto front of {results.run_id}; plot: {results.store.uri_of(key)}")
    return key


@task(cache_policy=NO_CACHE)
def save_best(best: dict[str, Any], config: EvolutionConfig, results: SearchResults) -> str:
    document = best_genome_document(best, config)
    key = results.save_best_genome(document)
    create_markdown_artifact(key="search-best-genome", markdown=(
        f"### Best genome of {results.run_id}\n\n`{document['genome_key']}`: {document['fitness']['bpb']:.3f} "
        f"bits per byte, {document['fitness']['bytes_per_s']:,.0f} bytes/s, {document['fitness']['params']:,} "
        f"parameters.\n\nSaved at `{results.store.uri_of(key)}`; distill the served model into it with "
        f"`reverie sleep --student search:{results.run_id}`."))
    return key


@flow(name="search", log_prints=True)
def search(run_id: str | None = None, space: str = "tiny", evaluations: int = 32, population: int = 8,
           sample: int = 3, workers: int = 2, steps: int = 60, batch_size: int = 8, seq_len: int = 64,
           throughput_weight: float = 0.1, teacher: str | None = None, corpus: str | None = None, seed: int = 0,
           data_root: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Evolve architectures in `space`; rerun with the same `run_id` to resume or extend a run.

    teacher: None trains each candidate for `steps`; a checkpoint path or `registry:current`
    distills it from that model instead. data_root: where results go (default: the settings').
    """
    logger = get_run_logger()
    settings = Settings.load()
    storage = dataclasses.replace(settings.storage, root=data_root) if data_root else settings.storage
    run_id = run_id or new_run_id()
    budget = dataclasses.replace(default_budget(), steps=steps, batch_size=batch_size, seq_len=seq_len,
                                 warmup=max(1, steps // 10))
    config = EvolutionConfig(task=EvaluationTask(space=space, budget=budget, corpus=corpus, teacher=teacher,
                                                 storage=storage),
                             population=population, sample=sample, evaluations=evaluations, workers=workers,
                             throughput_weight=throughput_weight, seed=seed)
    results = SearchResults(storage.root, run_id, storage)
    rows = evolve(config, storage, run_id, ray_address or settings.ray_address)
    best = best_row(rows, throughput_weight)
    png_key = publish_front(rows, best, results)
    best_key = save_best(best, config, results)
    logger.info("run %s: best %s at %.3f bits per byte, %.0f bytes/s; front at %s", run_id, best["genome_key"],
                best["bpb"], best["bytes_per_s"], results.store.uri_of(png_key))
    return {"run_id": run_id, "evaluations": len(rows), "front": front_rows(rows), "best": best,
            "front_png": results.store.uri_of(png_key), "best_genome": results.store.uri_of(best_key)}
