"""The architecture genome: search space, operators, validity, genome <-> config, fitness."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from model.config import ModelConfig, preset
from model.corpus import Corpus, embedded_corpus
from model.genome import (GENES, SPACES, Fitness, Genome, SearchSpace, count_params, crossover, distillation_loss,
                          dominates, evaluate_genome, mutate, pareto_front, random_genome, search_space)
from model.lm import ReverieLM, bits_per_byte
from model.training import TrainConfig

TINY = search_space("tiny")
QUICK = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=2, eval_batches=2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    full = embedded_corpus()
    return Corpus(train=full.train[:200_000], heldout=full.heldout)


def genomes(space: SearchSpace, count: int, seed: int = 0) -> list[Genome]:
    rng = random.Random(seed)
    return [random_genome(space, rng) for _ in range(count)]


@pytest.mark.parametrize("name", sorted(SPACES))
def test_random_genomes_are_valid_and_build_their_config(name):
    space = search_space(name)
    for genome in genomes(space, 10):
        assert space.problems(genome) == []
        config = space.to_config(genome)
        assert Genome.from_config(config) == genome
        assert config.d_model // config.n_heads == space.head_dim


def test_mutation_changes_exactly_one_gene_to_a_neighbouring_choice():
    rng = random.Random(1)
    for parent in genomes(TINY, 40):
        child = mutate(parent, TINY, rng)
        changed = [g for g in GENES if getattr(child, g) != getattr(parent, g)]
        assert len(changed) == 1 and TINY.is_valid(child)
        gene = changed[0]
        if gene not in ("ff_type", "gate"):
            options = TINY.choices(gene)
            assert abs(options.index(getattr(child, gene)) - options.index(getattr(parent, gene))) == 1


def test_crossover_takes_every_gene_from_one_parent():
    rng = random.Random(2)
    pairs = zip(genomes(TINY, 20, seed=3), genomes(TINY, 20, seed=4))
    for a, b in pairs:
        child = crossover(a, b, TINY, rng)
        assert TINY.is_valid(child)
        assert all(getattr(child, g) in (getattr(a, g), getattr(b, g)) for g in GENES)


def test_validity_names_each_problem():
    good = genomes(TINY, 1)[0]
    off_grid = dataclasses.replace(good, d_model=40)
    assert any("d_model=40 is not one of" in p for p in TINY.problems(off_grid))
    too_many = dataclasses.replace(good, em_slots=8, em_topk=16)
    space = dataclasses.replace(TINY, em_slots=(8,), em_topk=(16,))
    assert any("em_topk=16 exceeds em_slots=8" in p for p in space.problems(too_many))
    small = dataclasses.replace(TINY, max_params=10_000)
    assert any("exceed max_params" in p for p in small.problems(dataclasses.replace(good, d_model=64)))
    with pytest.raises(ValueError, match="not in the search space"):
        evaluate_genome(off_grid, TINY, embedded_corpus(), QUICK)


def test_genome_round_trips_through_json_and_config():
    for genome in genomes(TINY, 10):
        assert Genome.from_json(genome.to_json()) == genome
        assert Genome.from_config(TINY.to_config(genome)) == genome
    assert Genome.from_config(preset("small")).key == "d256-b2x6-w256-r8-m256k4-p64-dense-sigmoid"
    with pytest.raises(ValueError, match="missing"):
        Genome.from_dict({"d_model": 64})


def test_count_params_matches_the_built_model():
    for genome in genomes(TINY, 5):
        config = TINY.to_config(genome)
        assert count_params(config) == ReverieLM(config).num_params()


def test_impossible_mutation_is_an_error_that_says_why():
    frozen = SearchSpace(d_model=(32,), n_blocks=(1,), layers_per_block=(1,), window=(16,), pm_rank=(2,),
                         em_slots=(8,), em_topk=(1,), span=(16,), ff_type=("dense",), gate=("sigmoid",))
    with pytest.raises(ValueError, match="single choice"):
        mutate(random_genome(frozen, random.Random(0)), frozen, random.Random(0))


def test_pareto_front_keeps_exactly_the_undominated():
    points = [Fitness(4.0, 1, 100.0, 0), Fitness(3.0, 1, 50.0, 0), Fitness(4.5, 1, 90.0, 0),
              Fitness(2.5, 1, 10.0, 0), Fitness(3.0, 1, 40.0, 0)]
    front = pareto_front(points)
    assert front == [points[0], points[1], points[3]]  # fastest first
    assert dominates(points[0], points[2]) and not dominates(points[0], points[1])


def test_objective_trades_bits_for_doublings_of_throughput():
    slow, fast = Fitness(3.0, 1, 1000.0, 0), Fitness(3.05, 1, 2000.0, 0)
    assert slow.objective(0.0) < fast.objective(0.0)
    assert math.isclose(fast.objective(0.1) - slow.objective(0.1), 0.05 - 0.1)


def test_distillation_towards_itself_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 256), torch.randint(0, 256, (2, 5))
    loss = distillation_loss(logits, logits, targets, soft_weight=0.5)
    assert torch.allclose(loss, 0.5 * bits_per_byte(logits, targets), atol=1e-5)


def test_evaluate_genome_trains_and_measures(corpus):
    genome = genomes(TINY, 1, seed=5)[0]
    fitness = evaluate_genome(genome, TINY, corpus, QUICK)
    assert 0 < fitness.bpb < 9 and fitness.bytes_per_s > 0 and fitness.train_seconds > 0
    assert fitness.params == count_params(TINY.to_config(genome))


def test_evaluate_genome_distills_from_a_teacher_of_another_shape(corpus):
    teacher = ReverieLM(ModelConfig(d_model=32, n_blocks=1, layers_per_block=1, n_heads=2, span=16, window=16,
                                    pm_rank=2, em_slots=8, em_topk=1, ff_mult=2, max_seq_len=128)).eval()
    genome = genomes(TINY, 1, seed=6)[0]
    fitness = evaluate_genome(genome, TINY, corpus, QUICK, teacher=teacher)
    assert math.isfinite(fitness.bpb) and fitness.params == count_params(TINY.to_config(genome))
