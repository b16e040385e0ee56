"""Sleep as math: facts taught online move into a user's weights, and only that user's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import preset
from model.consolidation import (METHODS, Replay, SleepConfig, add_delta, cpu_weights, dense_delta, model_from,
                                 personal_delta, sleep)
from model.corpus import embedded_corpus
from model.evaluation import Fact, GateConfig, gate_failures, recalled
from model.generate import GenerationConfig, generate
from model.lm import ReverieLM

FACTS = [Fact(b"The secret word of Mira is ", b"tovak."), Fact(b"The secret word of Olan is ", b"resup."),
         Fact(b"The secret word of Kade is ", b"fimbo.")]
TEST_SLEEP = dataclasses.replace(METHODS["reverie"], steps=80, rehearsal_weight=0.3)  # an untrained tiny model


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus()


@pytest.fixture(scope="module")
def taught(corpus):
    """A tiny model, and the fast state of a user who taught FACTS online (serving's path)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    state = None
    for fact in FACTS:
        _, state = generate(model, fact.text(), state, GenerationConfig(max_new_bytes=8, temperature=0.0))
    assert int(state.writes.sum()) > 0, "teaching must write fast memory"
    return model, state


@pytest.fixture(scope="module")
def slept(taught, corpus):
    model, state = taught
    base = cpu_weights(model)
    result = sleep(model.config, base, base, [Replay([f.text() for f in FACTS], state)], corpus.train[:100_000],
                   TEST_SLEEP)
    tensors, meta = personal_delta(base, result.weights, "v0001")
    return base, tensors, meta, result


def test_facts_taught_online_are_recalled_after_sleep_with_fast_memory_wiped(taught, slept):
    model, _ = taught
    base, tensors, meta, _ = slept
    assert not any(recalled(model, FACTS)), "the base weights must not know the facts before sleep"
    personal = model_from(model.config, add_delta(base, dense_delta(tensors, meta)))
    assert sum(recalled(personal, FACTS)) >= 2


def test_another_user_without_the_delta_never_recalls_them(taught, slept):
    model, _ = taught
    base, _, _, _ = slept
    other = model_from(model.config, base)  # another user: the shared weights, no personal delta
    assert not any(recalled(other, FACTS))


def test_every_ingredient_reports_its_loss(slept):
    assert set(slept[3].metrics) == {"replay_bpb", "distill", "rehearsal_bpb", "anchor"}


def test_naive_recipe_turns_off_distill_rehearsal_and_anchor():
    naive = METHODS["naive_finetune"]
    assert (naive.distill, naive.rehearsal, naive.anchor) == (False, False, False)
    with pytest.raises(ValueError, match="replay or distill"):
        SleepConfig(replay=False, distill=False)


def test_bitdelta_personal_delta_round_trips_through_dense(slept, taught):
    model, _ = taught
    base, _, _, result = slept
    tensors, meta = personal_delta(base, result.weights, "v0001", kind="bitdelta")
    dense = dense_delta(tensors, meta)
    assert set(dense) and all(d.shape == base[n].shape for n, d in dense.items())


def test_gate_names_each_failing_threshold():
    reasons = gate_failures({"recall": 0.2, "bpb_rise": 0.5, "leakage": 0.0}, GateConfig())
    assert len(reasons) == 2 and reasons[0].startswith("recall=0.2000 below") and "bpb_rise" in reasons[1]
