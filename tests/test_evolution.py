"""Aging evolution on a local Ray cluster: it improves, it survives dead workers, it resumes from Parquet."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import ray

from model.config import ModelConfig
from model.genome import Genome, SearchSpace
from model.training import TrainConfig
from storage.errors import NotFoundError
from storage.search_results import SearchResults, load_best_genome
from workers.evolution import (EvaluationTask, Evolution, EvolutionConfig, best_row, evaluate_outcome,
                               load_corpus)

# 16 genomes; d_model 8 against 32 makes some clearly worse than others after a short budget.
SPACE = SearchSpace(d_model=(8, 32), n_blocks=(1,), layers_per_block=(1, 2), window=(16,), pm_rank=(2,),
                    em_slots=(8,), em_topk=(1, 2), span=(16,), ff_type=("dense",), gate=("sigmoid", "exp"),
                    head_dim=8, base=ModelConfig(d_model=32, n_blocks=1, layers_per_block=1, n_heads=4, span=16,
                                                 window=16, pm_rank=2, em_slots=8, em_topk=1, ff_mult=2,
                                                 max_seq_len=128))
BUDGET = TrainConfig(steps=25, batch_size=8, seq_len=32, lr=5e-3, warmup=3, eval_batches=2, device="cpu",
                     progress=False)


def config(evaluations: int, population: int = 4, steps: int = BUDGET.steps, **overrides) -> EvolutionConfig:
    task = EvaluationTask(space=SPACE, budget=dataclasses.replace(BUDGET, steps=steps))
    return EvolutionConfig(task=task, population=population, sample=2, evaluations=evaluations, workers=2,
                           throughput_weight=0.0, **overrides)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


# --- without Ray ---------------------------------------------------------------------------------
def row(candidate_id: str, seq: int, bpb: float | None = 4.0, status: str = "ok") -> dict:
    genome = Genome(32, 1, 1, 16, 2, 8, 1, 16, "dense", "sigmoid")
    return {"candidate_id": candidate_id, "seq": seq, "genome_key": genome.key, "genome": genome.to_json(),
            "parent_id": None, "status": status, "bpb": bpb, "params": 1000, "bytes_per_s": 100.0,
            "train_seconds": 1.0, "attempts": 1}


def test_results_come_back_in_completion_order_without_duplicates(tmp_path):
    results = SearchResults(tmp_path.as_uri(), "run-a")
    results.append([row("c2", 1), row("c1", 0)])
    results.append([row("c1", 0)])  # at-least-once: the same candidate again
    assert [r["candidate_id"] for r in results.rows()] == ["c1", "c2"]
    assert SearchResults(tmp_path.as_uri(), "run-b").rows() == []
    with pytest.raises(ValueError, match="unknown search result columns"):
        results.append([{**row("c3", 2), "colour": "red"}])


def test_best_genome_is_saved_and_loaded_as_a_model_config(tmp_path):
    results = SearchResults(tmp_path.as_uri(), "run-a")
    with pytest.raises(NotFoundError, match="run `reverie search` first"):
        load_best_genome(tmp_path.as_uri())
    genome = Genome(32, 1, 2, 16, 2, 8, 2, 16, "dense", "exp")
    results.save_best_genome({"genome": genome.to_dict(), "config": SPACE.to_config(genome).to_dict()})
    assert load_best_genome(tmp_path.as_uri()) == SPACE.to_config(genome)
    assert load_best_genome(tmp_path.as_uri(), run_id="run-a").layers_per_block == 2


def test_best_row_minimises_the_objective_over_successful_rows():
    rows = [row("a", 0, 4.0), row("b", 1, None, status="failed"), row("c", 2, 3.5)]
    assert best_row(rows, 0.0)["candidate_id"] == "c"
    with pytest.raises(ValueError, match="no candidate"):
        best_row([rows[1]], 0.0)


def test_a_candidate_that_raises_is_a_failed_outcome_not_a_crash():
    bad = Genome(24, 1, 1, 16, 2, 8, 1, 16, "dense", "sigmoid")  # d_model 24 is not in SPACE
    outcome = evaluate_outcome(bad.to_json(), SPACE, load_corpus(None), BUDGET, None)
    assert outcome["status"] == "failed" and "d_model=24" in outcome["error"]


# --- on Ray --------------------------------------------------------------------------------------
def test_evolution_finds_a_genome_better_than_the_worst_of_its_initial_population(ray_cluster, tmp_path):
    evolution = Evolution(config(evaluations=10), SearchResults(tmp_path.as_uri(), "improve"))
    rows = evolution.run()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows)
    initial = [r for r in rows if r["parent_id"] is None]
    children = [r for r in rows if r["parent_id"] is not None]
    assert len(initial) == 4 and children
    assert min(r["bpb"] for r in children) < max(r["bpb"] for r in initial)
    ids = {r["candidate_id"] for r in rows}
    assert all(r["parent_id"] in ids for r in children)


def test_killing_a_worker_mid_evaluation_loses_no_candidate(ray_cluster, tmp_path):
    evolution = Evolution(config(evaluations=6, population=3, steps=150), SearchResults(tmp_path.as_uri(), "kill"))
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("rows", evolution.run()))
    runner.start()
    deadline = time.monotonic() + 120
    while not evolution.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let it get into training
    actor, victim = evolution.in_flight()[0]
    ray.kill(actor)
    runner.join(timeout=300)
    assert not runner.is_alive()

    rows = outcome["rows"]
    ids = [r["candidate_id"] for r in rows]
    assert len(rows) == 6 and len(set(ids)) == 6
    assert set(evolution.dispatched) <= set(ids)  # every candidate sent to a worker has its result
    assert evolution.stats.worker_deaths == 1 and evolution.stats.requeued == 1
    assert [r["attempts"] for r in rows].count(2) == 1 and all(r["status"] == "ok" for r in rows)
    assert victim.candidate_id in ids


def test_resumed_run_continues_from_parquet_without_re_evaluating(ray_cluster, tmp_path):
    results = SearchResults(tmp_path.as_uri(), "resume")
    first = Evolution(config(evaluations=5), results).run()

    extended = Evolution(config(evaluations=8), SearchResults(tmp_path.as_uri(), "resume"))
    rows = extended.run()
    assert rows[:5] == first
    assert len(rows) == 8 and len({r["candidate_id"] for r in rows}) == 8
    assert extended.stats.evaluated + extended.stats.reused == 3
    assert set(extended.dispatched).isdisjoint(r["candidate_id"] for r in first)

    finished = Evolution(config(evaluations=8), SearchResults(tmp_path.as_uri(), "resume"))
    assert finished.run() == rows
    assert finished.stats.evaluated == 0 and finished.dispatched == []


def test_teacher_from_the_registry_reads_a_version_a_sleep_wrote(tmp_path):
    """Sleeps record their architecture as "model_config", `reverie train` as "config": both load."""
    from model.config import preset
    from model.lm import ReverieLM
    from storage.checkpoints import CheckpointRegistry
    from storage.config import StorageConfig
    from workers.evolution import load_teacher

    storage = StorageConfig(root=tmp_path.as_uri())
    registry = CheckpointRegistry(None, storage)
    weights = {k: v.detach().contiguous() for k, v in ReverieLM(preset("tiny")).state_dict().items()}
    first = registry.save(weights, {"config": preset("tiny").to_dict()}, parent=None)
    slept = registry.save(weights, {"model_config": preset("tiny").to_dict(), "night": "2026-01-05"}, parent=first)
    registry.promote(slept, expected_current=None)
    assert load_teacher("registry:current", storage).config == preset("tiny")
    assert load_teacher(f"registry:{first}", storage).config == preset("tiny")
