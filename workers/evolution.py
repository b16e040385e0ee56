"""Regularized (aging) evolution of the architecture genome, evaluated by a pool of Ray actors.

The algorithm (Real et al., 2019, in its asynchronous form): the population is a queue of the P
most recent successful evaluations. The first P candidates are random genomes; after that, each
time a worker is free, S members of the population are sampled, the one with the lowest objective
(`Fitness.objective`: bits per byte, less a bonus per doubling of throughput) is mutated, and the
child is sent to the worker. Every result joins the queue and pushes out the *oldest* member,
not the worst: a genome survives only by having good descendants, which keeps the search from
clinging to one lucky evaluation.

The coordinator (`Evolution`, in the driver) owns the population; the actors (`EvaluationWorker`)
only hold the corpus and the teacher and call `model.genome.evaluate_genome`.

- **Fault tolerance.** A candidate whose worker dies mid-evaluation (crash, OOM, `ray.kill`) goes
  back to the front of the queue with one more attempt, and a fresh worker takes the dead one's
  place. After `max_attempts` deaths on the same candidate it is recorded as failed, so a genome
  that kills workers cannot stall the search. A candidate that raises is recorded as failed.
- **Persistence and resume.** The coordinator appends every result to Parquet
  (`storage.search_results`) as soon as it arrives. The population is a function of the results
  in completion order, so a restarted run rebuilds it from those rows and continues; nothing
  recorded is evaluated again. Candidates that were in flight at the crash were never recorded
  and are simply proposed anew.
- **Duplicates.** Proposals avoid genomes already evaluated or in flight; when a tiny space leaves
  no choice, the earlier result is reused (a row with `reused_from`) instead of training again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from model.checkpoint import load_checkpoint, load_weights
from model.config import config_of_manifest
from model.corpus import Corpus, embedded_corpus
from model.genome import Fitness, Genome, SearchSpace, evaluate_genome, mutate, random_genome, search_space
from model.lm import ReverieLM
from model.training import TrainConfig
from storage.config import StorageConfig
from storage.search_results import SearchResults

log = logging.getLogger(__name__)

WORKER_DEATHS = (RayActorError, WorkerCrashedError, OutOfMemoryError)


def default_budget() -> TrainConfig:
    """A few seconds per tiny candidate on one CPU core."""
    return TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup=6, eval_batches=4, device="cpu",
                       progress=False)


@dataclass(frozen=True)
class EvaluationTask:
    """What every worker loads once: the space, the budget, the data and (to distill) a teacher.

    corpus: None = the embedded corpus; else a path or URI that `storage.corpus` reads.
    teacher: None = train each candidate from scratch; else distill it from this model: a
        `reverie train` checkpoint path, or `registry:current` / `registry:v0007` for a version of
        the checkpoint registry (whose manifest must record its `config`).
    """

    space: str | SearchSpace = "tiny"  # a name in model.genome.SPACES, or a space of your own
    budget: TrainConfig = field(default_factory=default_budget)
    corpus: str | None = None
    teacher: str | None = None
    threads: int = 1  # torch threads (and Ray CPUs) per worker
    storage: StorageConfig | None = None


@dataclass(frozen=True)
class EvolutionConfig:
    task: EvaluationTask = field(default_factory=EvaluationTask)
    population: int = 8  # P: members of the aging population
    sample: int = 3  # S: tournament size
    evaluations: int = 32  # total candidates of the run, initial population included
    workers: int = 2
    throughput_weight: float = 0.1  # bits per byte that a doubling of throughput is worth
    seed: int = 0
    max_attempts: int = 3  # worker deaths one candidate may cause before it is recorded as failed
    max_worker_restarts: int = 8

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in
                    ("population", "sample", "evaluations", "workers", "max_attempts") if getattr(self, name) < 1]
        if self.throughput_weight < 0:
            problems.append(f"throughput_weight must be >= 0, got {self.throughput_weight}")
        search_space(self.task.space)  # raises on an unknown space
        if problems:
            raise ValueError("invalid EvolutionConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    genome: Genome
    parent_id: str | None  # None for the random initial population
    attempts: int = 1


@dataclass
class EvolutionStats:
    evaluated: int = 0  # results received from workers by this process
    reused: int = 0  # identical genomes answered from earlier results
    failed: int = 0
    requeued: int = 0  # candidates sent again after their worker died
    worker_deaths: int = 0


# --- what the actor delegates to (plain functions, callable without Ray) --------------------------
def load_corpus(spec: str | None, storage: StorageConfig | None = None) -> Corpus:
    if spec is None:
        return embedded_corpus()
    from storage.corpus import read_documents

    return Corpus.split(read_documents(spec, storage))


def load_teacher(spec: str | None, storage: StorageConfig | None = None) -> ReverieLM | None:
    """The model candidates distill from (see `EvaluationTask.teacher`), or None to train from scratch."""
    if spec is None:
        return None
    if spec.startswith("registry:"):
        from storage.checkpoints import CheckpointRegistry

        registry = CheckpointRegistry(None, storage)
        version = spec.removeprefix("registry:")
        if version == "current":
            version = registry.current()
            if version is None:
                raise ValueError("teacher registry:current was asked for, but no checkpoint is promoted yet")
        tensors, manifest = registry.load(version)
        teacher = ReverieLM(config_of_manifest(manifest))
        load_weights(teacher, tensors, source=f"checkpoint {version}")
    else:
        teacher, _ = load_checkpoint(spec)
    return teacher.eval().requires_grad_(False)


def evaluate_outcome(genome_json: str, space: str | SearchSpace, corpus: Corpus, budget: TrainConfig,
                     teacher: ReverieLM | None) -> dict[str, Any]:
    """Evaluate one genome; a candidate that raises becomes a 'failed' outcome, not a crash."""
    try:
        fitness = evaluate_genome(Genome.from_json(genome_json), search_space(space), corpus, budget, teacher)
    except Exception as error:  # noqa: BLE001 - any failure of a candidate is a result to record
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    return {"status": "ok", **dataclasses.asdict(fitness)}


@ray.remote(max_restarts=0)
class EvaluationWorker:
    """Holds the corpus and the teacher; evaluates one genome per call."""

    def __init__(self, task: EvaluationTask, name: str) -> None:
        torch.set_num_threads(task.threads)
        self.task, self.name = task, name
        self.corpus = load_corpus(task.corpus, task.storage)
        self.teacher = load_teacher(task.teacher, task.storage)

    def evaluate(self, genome_json: str) -> dict[str, Any]:
        return {**evaluate_outcome(genome_json, self.task.space, self.corpus, self.task.budget, self.teacher),
                "worker": self.name}


# --- the coordinator ------------------------------------------------------------------------------
def fitness_of(row: dict[str, Any]) -> Fitness:
    return Fitness(bpb=row["bpb"], params=row["params"], bytes_per_s=row["bytes_per_s"],
                   train_seconds=row["train_seconds"])


def best_row(rows: list[dict[str, Any]], throughput_weight: float) -> dict[str, Any]:
    """The successful evaluation with the lowest objective."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        raise ValueError("no candidate of this run was evaluated successfully; see the 'error' column")
    return min(ok, key=lambda r: fitness_of(r).objective(throughput_weight))


class Evolution:
    """Runs one search run to `config.evaluations` recorded results; see the module docstring."""

    def __init__(self, config: EvolutionConfig, results: SearchResults) -> None:
        self.config, self.results = config, results
        self.space = search_space(config.task.space)
        self.stats = EvolutionStats()
        self.dispatched: list[str] = []  # candidate ids sent to workers by this process, repeats included
        self._lock = threading.Lock()
        self._in_flight: dict[ray.ObjectRef, tuple[Any, Candidate]] = {}
        self._workers_started = 0

    # -- state rebuilt from the recorded rows --------------------------------------------------
    def _load(self) -> None:
        self.rows = self.results.rows()
        self.population: deque[dict[str, Any]] = deque(maxlen=self.config.population)
        self.evaluated: dict[str, dict[str, Any]] = {}  # genome key -> first successful row
        self.seen: set[str] = set()  # genome keys recorded, failed ones included
        for row in self.rows:
            self._remember(row)
        self.initial_proposed = sum(1 for r in self.rows if r["parent_id"] is None)

    def _remember(self, row: dict[str, Any]) -> None:
        self.seen.add(row["genome_key"])
        if row["status"] == "ok":
            self.population.append(row)
            self.evaluated.setdefault(row["genome_key"], row)

    def objective(self, row: dict[str, Any]) -> float:
        return fitness_of(row).objective(self.config.throughput_weight)

    # -- proposals -----------------------------------------------------------------------------
    def _novel(self, propose: Callable[[], Genome], tries: int = 20) -> Genome:
        with self._lock:
            busy = {c.genome.key for _, c in self._in_flight.values()}
        for _ in range(tries):
            genome = propose()
            if genome.key not in self.seen and genome.key not in busy:
                return genome
        return genome

    def _propose(self, rng: random.Random) -> Candidate:
        candidate_id = f"c{rng.getrandbits(48):012x}"
        if self.initial_proposed < self.config.population or not self.population:
            self.initial_proposed += 1
            return Candidate(candidate_id, self._novel(lambda: random_genome(self.space, rng)), None)
        contenders = rng.sample(list(self.population), min(self.config.sample, len(self.population)))
        parent = min(contenders, key=self.objective)
        parent_genome = Genome.from_json(parent["genome"])
        child = self._novel(lambda: mutate(parent_genome, self.space, rng))
        return Candidate(candidate_id, child, parent["candidate_id"])

    # -- results -------------------------------------------------------------------------------
    def _record(self, candidate: Candidate, outcome: dict[str, Any], reused_from: str | None = None) -> None:
        row = {"candidate_id": candidate.candidate_id, "seq": len(self.rows), "genome_key": candidate.genome.key,
               "genome": candidate.genome.to_json(), "parent_id": candidate.parent_id,
               "attempts": candidate.attempts, "reused_from": reused_from, "status": outcome["status"],
               "worker": outcome.get("worker"), "error": outcome.get("error")}
        if outcome["status"] == "ok":
            row.update({k: outcome[k] for k in ("bpb", "params", "bytes_per_s", "train_seconds")})
            row["objective"] = self.objective(row)
        else:
            row.update(bpb=None, params=None, bytes_per_s=None, train_seconds=None, objective=None)
            self.stats.failed += 1
            log.warning("candidate %s (%s) failed: %s", candidate.candidate_id, candidate.genome.key, row["error"])
        self.results.append([row])  # durable before it influences the search
        self.rows.append(row)
        self._remember(row)
        log.info("result %d/%d: %s %s bpb=%s", len(self.rows), self.config.evaluations, candidate.genome.key,
                 row["status"], row["bpb"])

    # -- workers -------------------------------------------------------------------------------
    def _start_worker(self) -> Any:
        if self._workers_started >= self.config.workers + self.config.max_worker_restarts:
            raise RuntimeError(f"{self.stats.worker_deaths} evaluation workers died "
                               f"(max_worker_restarts={self.config.max_worker_restarts}); check the Ray "
                               f"worker logs for the cause (out of memory? a teacher that fails to load?)")
        name = f"evolution-{self.results.run_id}-{self._workers_started}"
        self._workers_started += 1
        task = self.config.task
        return EvaluationWorker.options(num_cpus=task.threads).remote(task, name)

    def in_flight(self) -> list[tuple[Any, Candidate]]:
        """(actor, candidate) pairs being evaluated now; safe to call from another thread."""
        with self._lock:
            return list(self._in_flight.values())

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Evaluate until the run has `config.evaluations` results; returns every row of the run."""
        self._load()
        target = self.config.evaluations
        if len(self.rows) >= target:
            return list(self.rows)
        rng = random.Random(f"{self.config.seed}:{self.results.run_id}:{len(self.rows)}")
        idle = deque(self._start_worker() for _ in range(min(self.config.workers, target - len(self.rows))))
        workers = set(idle)
        requeued: deque[Candidate] = deque()
        try:
            while len(self.rows) < target:
                while idle and (requeued or len(self.rows) + len(self._in_flight) < target):
                    candidate = requeued.popleft() if requeued else self._propose(rng)
                    earlier = self.evaluated.get(candidate.genome.key)
                    if earlier is not None:  # identical genome: reuse its result, train nothing
                        self.stats.reused += 1
                        reused = {k: earlier[k] for k in ("status", "bpb", "params", "bytes_per_s", "train_seconds")}
                        self._record(dataclasses.replace(candidate, attempts=0), reused,
                                     reused_from=earlier["candidate_id"])
                        continue
                    actor = idle.popleft()
                    with self._lock:
                        self._in_flight[actor.evaluate.remote(candidate.genome.to_json())] = (actor, candidate)
                    self.dispatched.append(candidate.candidate_id)
                if not self._in_flight:
                    continue
                [ready], _ = ray.wait(list(self._in_flight), num_returns=1)
                with self._lock:
                    actor, candidate = self._in_flight.pop(ready)
                try:
                    outcome = ray.get(ready)
                except WORKER_DEATHS as death:
                    self.stats.worker_deaths += 1
                    workers.discard(actor)
                    ray.kill(actor)  # make sure it is gone before replacing it
                    replacement = self._start_worker()
                    workers.add(replacement)
                    idle.append(replacement)
                    if candidate.attempts < self.config.max_attempts:
                        self.stats.requeued += 1
                        requeued.appendleft(dataclasses.replace(candidate, attempts=candidate.attempts + 1))
                        log.warning("worker died evaluating %s; re-queued (attempt %d)", candidate.candidate_id,
                                    candidate.attempts + 1)
                    else:
                        self._record(candidate, {"status": "failed", "error": f"its worker died "
                                                 f"{candidate.attempts} times: {type(death).__name__}"})
                    continue
                except RayTaskError as error:
                    outcome = {"status": "failed", "error": str(error)[:2000]}
                idle.append(actor)
                self.stats.evaluated += 1
                self._record(candidate, outcome)
        finally:
            with self._lock:
                self._in_flight.clear()
            for actor in workers:
                ray.kill(actor)
        return self.results.rows()  # as stored: what a resumed run will see


def ensure_ray(address: str | None = None) -> bool:
    """Connect to Ray (None = start a local one); True if this call started it."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False)
    return True


def run_evolution(config: EvolutionConfig, store_or_uri: Any, run_id: str,
                  ray_address: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) search run `run_id` on Ray; returns every recorded row of the run."""
    started = ensure_ray(ray_address)
    try:
        return Evolution(config, SearchResults(store_or_uri, run_id, config.task.storage)).run()
    finally:
        if started:
            ray.shutdown()
