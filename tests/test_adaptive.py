"""Adaptive compute: the complexity estimator, the depth policy, early exit and its metrics."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model.adaptive import AdaptiveDepth, DepthPolicy, calibrate, complexity, exit_bpb, tokens_complexity
from model.config import ModelConfig, preset
from model.corpus import Corpus, embedded_corpus
from model.lm import ReverieLM
from model.training import TrainConfig, train

DEEP = ModelConfig(d_model=64, n_blocks=2, layers_per_block=3, n_heads=2, span=16, window=64, pm_rank=4,
                   em_slots=16, em_topk=2, ff_mult=2, max_seq_len=512)
PROSE = (b"Return the number of items in a container. The argument may be a sequence (such as a string, "
         b"bytes, tuple, list, or range) or a collection (such as a dictionary, set, or frozen set).")[:128]
REPETITIVE = (b"ok 200 GET /index.html\n" * 8)[:128]
NOISE = random.Random(0).randbytes(128)


def tokens_of(data: bytes) -> torch.Tensor:
    return torch.tensor(list(data))[None]


@pytest.fixture(scope="module")
def deep_model() -> ReverieLM:
    torch.manual_seed(0)
    return ReverieLM(DEEP).eval()


# --- early exit ----------------------------------------------------------------------------------
@torch.no_grad()
def test_full_depth_path_reproduces_the_normal_forward_exactly(deep_model):
    tokens = tokens_of(PROSE)
    logits, state = deep_model(tokens)
    for run in (lambda: deep_model(tokens, active_layers=DEEP.n_layers),
                lambda: AdaptiveDepth(deep_model, DepthPolicy.full_depth(DEEP.n_layers))(tokens)):
        exit_logits, exit_state = run()
        assert torch.equal(exit_logits, logits)
        assert all(torch.equal(a, b) for a, b in zip(exit_state.tensors().values(), state.tensors().values()))


@torch.no_grad()
def test_fewer_layers_means_fewer_active_params(deep_model):
    reported = []
    for k in range(1, DEEP.n_layers + 1):
        deep_model(tokens_of(PROSE), active_layers=k)
        assert deep_model.last_metrics["active_layers"] == k
        reported.append(deep_model.last_metrics["active_params"])
    assert all(a < b for a, b in zip(reported, reported[1:]))
    assert reported[-1] == deep_model.num_params()


@torch.no_grad()
def test_fewer_layers_means_less_arithmetic(deep_model):
    """Exiting after one layer skips the other layers' arithmetic (counted, so the test does not
    depend on the machine's load; bench/adaptive_compute.py measures the latency it saves)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = tokens_of(PROSE)

    def flops(k: int) -> int:
        with FlopCounterMode(display=False) as counter:
            deep_model(tokens, active_layers=k)
        return counter.get_total_flops()

    one, all_layers = flops(1), flops(DEEP.n_layers)
    assert 0 < one < 0.75 * all_layers


# --- the estimator -------------------------------------------------------------------------------
def test_complexity_orders_repetitive_below_prose_below_noise():
    assert complexity(REPETITIVE) < complexity(PROSE) < complexity(NOISE)
    assert tokens_complexity(torch.stack([tokens_of(REPETITIVE)[0], tokens_of(NOISE)[0]])) == complexity(NOISE)
    with pytest.raises(ValueError, match="empty"):
        complexity(b"")


@torch.no_grad()
def test_estimator_runs_none_of_the_models_arithmetic():
    """The estimator deflates the bytes; it never touches the model. Counted rather than timed, so
    the test does not depend on the machine's load: bench/adaptive_compute.py measures its latency
    against a full forward (`estimator_fraction_of_full_forward`)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = ReverieLM(preset("tiny")).eval()
    adaptive = AdaptiveDepth(model, DepthPolicy.full_depth(model.config.n_layers))
    tokens = tokens_of((PROSE * 2)[:256])
    with FlopCounterMode(display=False) as counter:
        score, layers = adaptive.plan(tokens)
    assert counter.get_total_flops() == 0
    assert score == complexity((PROSE * 2)[:256]) and layers == model.config.n_layers


# --- the policy ----------------------------------------------------------------------------------
def test_policy_maps_complexity_to_layers_monotonically():
    policy = DepthPolicy(4, (-math.inf, 2.0, 5.0))
    assert [policy.layers_for(c) for c in (0.5, 2.0, 3.0, 5.0, 7.9)] == [2, 2, 3, 3, 4]
    assert DepthPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="non-decreasing"):
        DepthPolicy(3, (4.0, 2.0))


@torch.no_grad()
def test_calibration_follows_its_tolerance(deep_model):
    heldout = embedded_corpus().heldout
    texts = [heldout[i:i + 33] for i in range(0, 33 * 6, 33)] + [REPETITIVE[:33], NOISE[:33]]
    lenient = calibrate(deep_model, texts, tolerance=math.inf)
    assert all(lenient.layers_for(complexity(t[:-1])) == 1 for t in texts)
    assert lenient.tolerance == math.inf and len(lenient.limits) == DEEP.n_layers - 1
    with pytest.raises(ValueError, match="tolerance"):
        calibrate(deep_model, texts, tolerance=-0.1)
    assert exit_bpb(deep_model, texts[:2]).shape == (2, DEEP.n_layers)


@torch.no_grad()
def test_adaptive_forward_reports_complexity_and_runs_the_planned_depth(deep_model):
    policy = DepthPolicy(DEEP.n_layers, (complexity(REPETITIVE),) * (DEEP.n_layers - 1))
    adaptive = AdaptiveDepth(deep_model, policy)
    adaptive(tokens_of(REPETITIVE))
    metrics = deep_model.last_metrics
    assert metrics["active_layers"] == 1 and metrics["complexity"] == complexity(REPETITIVE)
    assert metrics["active_params"] == deep_model.active_params(1) and metrics["estimator_ms"] >= 0
    adaptive(tokens_of(PROSE))
    assert deep_model.last_metrics["active_layers"] == DEEP.n_layers
    with pytest.raises(ValueError, match="calibrated for 3 layers"):
        AdaptiveDepth(deep_model, DepthPolicy.full_depth(3))


# --- the auxiliary loss --------------------------------------------------------------------------
def test_early_exit_loss_makes_shallow_exits_better():
    # Four narrow layers: without the auxiliary loss the head has never read layer 1's output.
    config = ModelConfig(d_model=32, n_blocks=1, layers_per_block=4, n_heads=2, span=16, window=32, pm_rank=2,
                         em_slots=8, em_topk=1, ff_mult=2, max_seq_len=128)
    full = embedded_corpus()
    corpus = Corpus(train=full.train[:200_000], heldout=full.heldout)
    texts = [corpus.heldout[i:i + 65] for i in range(0, 65 * 8, 65)]
    exit_one = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = ReverieLM(config)
        train(model, corpus, TrainConfig(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup=3, eval_batches=1,
                                         device="cpu", progress=False, early_exit_weight=weight))
        exit_one[weight] = exit_bpb(model, texts)[:, 0].mean()
    assert exit_one[1.0] < exit_one[0.0] - 0.2
