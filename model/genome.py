"""The architecture genome: the search space, mutation and crossover, and a candidate's fitness.

A `Genome` is the part of a `ModelConfig` that evolution may change (d_model, blocks, layers per
block, WM window, PM rank, EM slots and top-k, span P, feed-forward type, recurrence gate form);
everything else comes from the space's `base` config. A `SearchSpace` lists the allowed values of
every gene, in order, so mutation can step to a *neighbouring* value (d_model 64 -> 48 or 96, not
anywhere) as regularized evolution expects of small mutations.

Fitness is measured, not predicted: `evaluate_genome` trains the candidate for a fixed budget (or
distills it from a teacher), then reports held-out bits per byte, its parameter count and its
inference throughput. The search keeps every result; `pareto_front` picks the ones no other result
beats on both bits per byte and throughput.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig, preset
from model.corpus import Corpus, as_tensor, random_batch
from model.lm import ReverieLM, bits_per_byte
from model.training import (TrainConfig, autocast, clipped_step, evaluate_bpb, learning_rate, make_optimizer,
                            train)

GENES = ("d_model", "n_blocks", "layers_per_block", "window", "pm_rank", "em_slots", "em_topk", "span",
         "ff_type", "gate")
CATEGORICAL = ("ff_type", "gate")  # the others are ordered numbers


@dataclass(frozen=True)
class Genome:
    d_model: int
    n_blocks: int  # B
    layers_per_block: int  # L
    window: int  # W: working-memory window
    pm_rank: int  # r: procedural-memory slots per layer
    em_slots: int  # M: episodic-memory items per block
    em_topk: int  # k: items retrieved per query
    span: int  # P: plasticity span
    ff_type: str  # "dense" | "mixture"
    gate: str  # "sigmoid" | "exp"

    @property
    def key(self) -> str:
        """A readable, unique name: `d64-b2x1-w32-r4-m16k2-p16-dense-sigmoid`."""
        return (f"d{self.d_model}-b{self.n_blocks}x{self.layers_per_block}-w{self.window}-r{self.pm_rank}"
                f"-m{self.em_slots}k{self.em_topk}-p{self.span}-{self.ff_type}-{self.gate}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Genome:
        missing, unknown = sorted(set(GENES) - set(values)), sorted(set(values) - set(GENES))
        if missing or unknown:
            raise ValueError(f"a genome needs exactly the genes {list(GENES)}; missing {missing}, unknown {unknown}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Genome:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Genome:
        return cls(**{gene: getattr(config, gene) for gene in GENES})


@dataclass(frozen=True)
class SearchSpace:
    """Allowed values of every gene (ordered: mutation steps to a neighbour) and the fixed rest.

    n_heads is not a gene: it is d_model // head_dim, so every width keeps the same head size.
    max_params, when set, rejects genomes larger than that many parameters.
    """

    d_model: tuple[int, ...]
    n_blocks: tuple[int, ...]
    layers_per_block: tuple[int, ...]
    window: tuple[int, ...]
    pm_rank: tuple[int, ...]
    em_slots: tuple[int, ...]
    em_topk: tuple[int, ...]
    span: tuple[int, ...]
    ff_type: tuple[str, ...] = ("dense", "mixture")
    gate: tuple[str, ...] = ("sigmoid", "exp")
    head_dim: int = 16
    max_params: int | None = None
    base: ModelConfig = field(default_factory=lambda: preset("tiny"))

    def choices(self, gene: str) -> tuple:
        return getattr(self, gene)

    def size(self) -> int:
        """Number of gene combinations, valid or not."""
        return math.prod(len(self.choices(gene)) for gene in GENES)

    def to_config(self, genome: Genome) -> ModelConfig:
        """The full ModelConfig of `genome`; ValueError (from ModelConfig) if it cannot exist."""
        return dataclasses.replace(self.base, n_heads=max(1, genome.d_model // self.head_dim), **genome.to_dict())

    def problems(self, genome: Genome) -> list[str]:
        """Why `genome` is not allowed in this space (empty when it is)."""
        found = [f"{gene}={getattr(genome, gene)!r} is not one of {self.choices(gene)}"
                 for gene in GENES if getattr(genome, gene) not in self.choices(gene)]
        if genome.d_model % self.head_dim:
            found.append(f"d_model={genome.d_model} is not a multiple of head_dim={self.head_dim}")
        if genome.span > self.base.max_seq_len:
            found.append(f"span={genome.span} exceeds max_seq_len={self.base.max_seq_len}")
        try:
            config = self.to_config(genome)
        except ValueError as error:
            return found + [str(error)]
        if self.max_params is not None and not found and (params := count_params(config)) > self.max_params:
            found.append(f"{params:,} parameters exceed max_params={self.max_params:,}")
        return found

    def is_valid(self, genome: Genome) -> bool:
        return not self.problems(genome)


SPACES: dict[str, SearchSpace] = {
    # Candidates train in ~1-3 s on one CPU core: tests and the CPU benchmark.
    "tiny": SearchSpace(d_model=(16, 32, 48, 64), n_blocks=(1, 2), layers_per_block=(1, 2), window=(16, 32, 64),
                        pm_rank=(2, 4), em_slots=(8, 16), em_topk=(1, 2, 4), span=(8, 16, 32), head_dim=16,
                        base=preset("tiny")),
    # Around the `small` preset (~10M parameters): a GPU node per worker.
    "small": SearchSpace(d_model=(128, 192, 256, 384), n_blocks=(1, 2, 3, 4), layers_per_block=(1, 2, 3, 4, 6),
                         window=(64, 128, 256, 512), pm_rank=(4, 8, 16), em_slots=(64, 128, 256, 512),
                         em_topk=(2, 4, 8), span=(32, 64, 128), head_dim=64, max_params=30_000_000,
                         base=preset("small")),
}


def search_space(name: str | SearchSpace) -> SearchSpace:
    """A named space from SPACES; a SearchSpace passes through (custom spaces travel to workers whole)."""
    if isinstance(name, SearchSpace):
        return name
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown search space {name!r}; choose one of {sorted(SPACES)}") from None


@functools.lru_cache(maxsize=4096)
def count_params(config: ModelConfig) -> int:
    """Parameters of ReverieLM(config), counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return ReverieLM(config).num_params()


# --- operators -----------------------------------------------------------------------------------
MAX_TRIES = 100


def _first_valid(space: SearchSpace, propose: Callable[[], Genome], what: str) -> Genome:
    for _ in range(MAX_TRIES):
        genome = propose()
        if space.is_valid(genome):
            return genome
    raise ValueError(f"no valid genome after {MAX_TRIES} tries of {what}; the space is too constrained "
                     f"(check max_params and em_topk vs em_slots)")


def random_genome(space: SearchSpace, rng: random.Random) -> Genome:
    """Every gene drawn uniformly from its choices, redrawn until valid."""
    return _first_valid(space, lambda: Genome(**{g: rng.choice(space.choices(g)) for g in GENES}), "random sampling")


def mutate(genome: Genome, space: SearchSpace, rng: random.Random) -> Genome:
    """Change exactly one gene: a number moves to a neighbouring choice, a category to another one."""
    mutable = [g for g in GENES if len(space.choices(g)) > 1]
    if not mutable:
        raise ValueError("every gene of this space has a single choice: nothing can mutate")

    def propose() -> Genome:
        gene = rng.choice(mutable)
        options = space.choices(gene)
        current = getattr(genome, gene)
        if gene in CATEGORICAL or current not in options:
            value = rng.choice([v for v in options if v != current])
        else:
            i = options.index(current)
            value = options[rng.choice([j for j in (i - 1, i + 1) if 0 <= j < len(options)])]
        return dataclasses.replace(genome, **{gene: value})

    return _first_valid(space, propose, f"mutating {genome.key}")


def crossover(a: Genome, b: Genome, space: SearchSpace, rng: random.Random) -> Genome:
    """Uniform crossover: every gene from one parent or the other, redrawn until valid."""
    return _first_valid(space, lambda: Genome(**{g: getattr(rng.choice((a, b)), g) for g in GENES}),
                        f"crossing {a.key} with {b.key}")


# --- fitness -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fitness:
    bpb: float  # held-out bits per byte after the budget (lower is better)
    params: int
    bytes_per_s: float  # inference throughput, measured (higher is better)
    train_seconds: float

    def objective(self, throughput_weight: float) -> float:
        """The scalar evolution minimises: bits per byte, less `throughput_weight` per doubling of throughput."""
        return self.bpb - throughput_weight * math.log2(max(self.bytes_per_s, 1e-9))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, soft_weight: float = 0.5) -> torch.Tensor:
    """(1-w) * cross-entropy on the bytes + w * T^2 * KL(teacher_T || student_T), in bits.

    student, teacher: (b, T, 256) logits; targets: (b, T).
    """
    hard = bits_per_byte(student, targets)
    soft = F.kl_div(F.log_softmax(student.float() / temperature, -1).flatten(0, 1),
                    F.log_softmax(teacher.float() / temperature, -1).flatten(0, 1),
                    log_target=True, reduction="batchmean") * temperature ** 2 / math.log(2.0)
    return (1.0 - soft_weight) * hard + soft_weight * soft


def distill(student: ReverieLM, teacher: ReverieLM, corpus: Corpus, config: TrainConfig) -> float:
    """Train `student` in place towards `teacher` on corpus.train; returns the seconds it took.

    The teacher runs with an empty fast state and writes nothing: its slow weights are what a
    new architecture has to absorb.
    """
    device = config.resolved_device()
    student.to(device).train()
    teacher.to(device).eval()
    generator = torch.Generator().manual_seed(config.seed)
    data = as_tensor(corpus.train)
    optimizer = make_optimizer(student, config)
    started = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        inputs, targets = (t.to(device) for t in random_batch(data, config.batch_size, config.seq_len, generator))
        with autocast(device, config.amp):
            with torch.no_grad():
                teacher_logits, _ = teacher(inputs, learn=False)
            logits, _ = student(inputs)
            loss = distillation_loss(logits, teacher_logits, targets)
        clipped_step(loss, student, optimizer, config.grad_clip, "distillation loss", step, "lower the lr")
    return time.perf_counter() - started


@torch.no_grad()
def measure_throughput(model: ReverieLM, seq_len: int, batch_size: int = 4, repeats: int = 5) -> float:
    """Bytes per second of a served forward (empty fast state, memory writes on).

    The fastest of `repeats` runs: on a shared machine noise only ever adds time.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = torch.randint(0, 256, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    model(tokens)  # warm-up: allocator, kernels
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    model.train(was_training)
    return tokens.numel() / min(seconds)


def evaluate_genome(genome: Genome, space: SearchSpace, corpus: Corpus, budget: TrainConfig,
                    teacher: ReverieLM | None = None) -> Fitness:
    """Train (or, with a teacher, distill) `genome` for `budget`, then measure it.

    Deterministic for a given genome, corpus and budget.seed, apart from the throughput timing.
    """
    problems = space.problems(genome)
    if problems:
        raise ValueError(f"genome {genome.key} is not in the search space: {'; '.join(problems)}")
    config = space.to_config(genome)
    if budget.seq_len > config.max_seq_len:
        raise ValueError(f"budget seq_len={budget.seq_len} exceeds the space's max_seq_len={config.max_seq_len}")
    torch.manual_seed(budget.seed)
    model = ReverieLM(config)
    budget = dataclasses.replace(budget, progress=False)
    if teacher is None:
        result = train(model, corpus, budget)
        seconds, bpb = result.seconds, result.heldout_bpb
    else:
        seconds = distill(model, teacher, corpus, budget)
        bpb = evaluate_bpb(model, corpus.heldout, budget.seq_len, budget.batch_size, budget.eval_batches, budget.amp)
    if not math.isfinite(bpb):
        raise FloatingPointError(f"genome {genome.key} ended training with held-out bits per byte {bpb}")
    return Fitness(bpb=bpb, params=model.num_params(), bytes_per_s=measure_throughput(model, budget.seq_len),
                   train_seconds=seconds)


# --- Pareto front --------------------------------------------------------------------------------
def dominates(a: Fitness, b: Fitness) -> bool:
    """a is no worse than b on bits per byte and throughput, and better on at least one."""
    return (a.bpb <= b.bpb and a.bytes_per_s >= b.bytes_per_s) and (a.bpb < b.bpb or a.bytes_per_s > b.bytes_per_s)


def pareto_front(items: Sequence[Any], fitness: Callable[[Any], Fitness] = lambda item: item) -> list[Any]:
    """The items no other item dominates, sorted by throughput (fastest first)."""
    scored = [(item, fitness(item)) for item in items]
    front = [(item, f) for item, f in scored if not any(dominates(g, f) for _, g in scored)]
    return [item for item, f in sorted(front, key=lambda pair: -pair[1].bytes_per_s)]
