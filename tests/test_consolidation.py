"""Sleep as math: facts taught online move into a user's weights, and only that user's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import preset
from model.consolidation import (METHODS, AnchorPull, Replay, SleepConfig, add_delta, cpu_weights, dense_delta, model_from,
                                 named_recipe, personal_delta, sleep)
from model.corpus import embedded_corpus
from model.evaluation import Fact, GateConfig, gate_failures, recalled
from model.fast_state import FastState
from model.generate import GenerationConfig, generate
from model.lm import ReverieLM

FACTS = [Fact(b"The secret word of Mira is ", b"tovak."), Fact(b"The secret word of Olan is ", b"resup."),
         Fact(b"The secret word of Kade is ", b"fimbo.")]
LATER_NIGHTS = [[Fact(b"The secret word of Tamo is ", b"gerul."), Fact(b"The secret word of Vesi is ", b"lumpa.")],
                [Fact(b"The secret word of Ruba is ", b"kesto."), Fact(b"The secret word of Nell is ", b"daruv.")]]
OTHER_USER = [Fact(b"The secret word of Pim is ", b"salvo.")]
TEST_SLEEP = dataclasses.replace(METHODS["reverie"], steps=80, rehearsal_weight=0.3)  # an untrained tiny model


def teach(model: ReverieLM, facts: list[Fact], state: FastState | None) -> tuple[list[bytes], FastState]:
    """Serving's path: each fact said to `model` online, written to fast memory. -> turns, state."""
    turns = []
    for fact in facts:
        reply, state = generate(model, fact.text(), state, GenerationConfig(max_new_bytes=8, temperature=0.0))
        turns.append(fact.text() + reply.response)
    return turns, state


@pytest.fixture(scope="module")
def corpus():
    return embedded_corpus()


@pytest.fixture(scope="module")
def taught(corpus):
    """A tiny model, and the fast state of a user who taught FACTS online (serving's path)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    _, state = teach(model, FACTS, None)
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


@pytest.fixture(scope="module")
def third_night(taught, slept, corpus):
    """The user of `slept` teaches two more facts on each of two more days, each night replaying
    their earlier turns (as the nightly flow does). -> their weights and metrics after night 3."""
    model, state = taught
    weights, earlier = slept[3].weights, [f.text() for f in FACTS]
    for night, facts in enumerate(LATER_NIGHTS, start=2):
        turns, state = teach(model_from(model.config, weights), facts, state.soft_reset(0.5))
        result = sleep(model.config, weights, weights, [Replay(turns, state, earlier)], corpus.train[:100_000],
                       dataclasses.replace(TEST_SLEEP, seed=night))
        weights, earlier = result.weights, earlier + turns
    return result


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


def test_facts_of_night_one_are_still_recalled_after_night_three(taught, slept, third_night):
    model, _ = taught
    after_one = recalled(model_from(model.config, slept[3].weights), FACTS)
    after_three = model_from(model.config, third_night.weights)
    assert sum(after_one) >= 2
    assert recalled(after_three, FACTS) == after_one, "a later night forgot (or newly guessed) night-1 facts"
    assert sum(recalled(after_three, [f for night in LATER_NIGHTS for f in night])) >= 3


def test_another_users_personal_weights_do_not_recall_them(taught, third_night, corpus):
    model, _ = taught
    taught_so_far = FACTS + [f for night in LATER_NIGHTS for f in night]
    known = [f for f, hit in zip(taught_so_far, recalled(model_from(model.config, third_night.weights), taught_so_far),
                                 strict=True) if hit]
    base = cpu_weights(model)
    turns, state = teach(model, OTHER_USER, None)
    other = model_from(model.config, sleep(model.config, base, base, [Replay(turns, state)], corpus.train[:100_000],
                                           TEST_SLEEP).weights)
    assert all(recalled(other, OTHER_USER)), "the other user must have learned their own fact"
    assert known and not any(recalled(other, known))


def test_every_ingredient_reports_its_loss(slept, third_night):
    assert set(slept[3].metrics) == {"replay_bpb", "distill", "rehearsal_bpb", "anchor"}  # night 1: no earlier turns
    assert set(third_night.metrics) == {"replay_bpb", "distill", "earlier_bpb", "rehearsal_bpb", "anchor"}


def test_naive_recipe_turns_off_distill_earlier_replay_rehearsal_and_anchor():
    naive = METHODS["naive_finetune"]
    assert (naive.distill, naive.earlier_replay, naive.rehearsal, naive.anchor) == (False, False, False, False)
    with pytest.raises(ValueError, match="replay or distill"):
        SleepConfig(replay=False, distill=False)


def test_a_lean_sleep_reads_a_share_of_the_earlier_and_rehearsal_rows(corpus):
    """earlier_fraction and rehearsal_fraction cut the rows of their streams, not the replayed ones,
    and every ingredient still reports its loss."""
    import random

    from model.consolidation import _step_losses, step_rows
    from model.corpus import as_tensor

    lean = dataclasses.replace(METHODS["reverie_lean"], batch_size=8, seq_len=16)
    torch.manual_seed(0)
    student, teacher = ReverieLM(preset("tiny")), ReverieLM(preset("tiny")).eval()
    read = []
    student.register_forward_pre_hook(lambda module, args: read.append(tuple(args[0].shape)))
    replay = Replay(texts=[fact.text() for fact in FACTS], earlier=[fact.text() for fact in OTHER_USER])
    rows = step_rows(replay, as_tensor(corpus.train[:5000]), lean, random.Random(0), torch.Generator().manual_seed(0))
    assert rows.streams == {"replay": slice(0, 8), "earlier": slice(8, 10), "rehearsal": slice(10, 12)}
    parts = _step_losses(student, teacher, rows.data, rows.streams, None, lean)
    assert read == [(8 + 2 + 2, 16)]
    assert set(parts) == {"replay_bpb", "earlier_bpb", "rehearsal_bpb", "distill"}
    half_rehearsal = dataclasses.replace(lean, earlier_fraction=1.0, rehearsal_fraction=0.5)
    rows = step_rows(replay, as_tensor(corpus.train[:5000]), half_rehearsal, random.Random(0),
                     torch.Generator().manual_seed(0))
    assert rows.streams == {"replay": slice(0, 8), "earlier": slice(8, 16), "rehearsal": slice(16, 20)}
    with pytest.raises(ValueError, match="rehearsal_fraction"):
        SleepConfig(rehearsal_fraction=0.0)
    with pytest.raises(ValueError, match="earlier_fraction"):
        SleepConfig(earlier_fraction=1.5)


def test_a_step_whose_loss_is_not_finite_is_skipped_and_named(taught, corpus):
    """A NaN (here injected into the student's logits at step 3) writes nothing into the weights:
    the optimizer skips that step on the device, and the sleep, which reads each step's check one
    step late, raises naming it; steps before it still reached `on_step`."""
    from model.consolidation import consolidate

    model, state = taught
    student, teacher = model_from(model.config, cpu_weights(model)), model_from(model.config, cpu_weights(model))
    calls, reported = [], []

    def poison(module, args, output):
        calls.append(1)
        return (output[0] * float("nan"), output[1]) if len(calls) == 4 else output
    student.register_forward_hook(poison)
    with pytest.raises(FloatingPointError, match=r"sleep loss at step 3 was nan.*skipped.*lower SleepConfig.lr"):
        consolidate(student, teacher, [Replay([f.text() for f in FACTS], state)], corpus.train[:5000],
                    dataclasses.replace(TEST_SLEEP, steps=8, batch_size=2, seq_len=16),
                    on_step=lambda step, loss: reported.append(step))
    assert reported == [0, 1, 2]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_a_graphed_night_off_cuda_runs_eagerly_and_says_why(taught, corpus, caplog):
    """SleepConfig.cuda_graph is a request: where no graph can run (here a CPU) the night still runs,
    eagerly, and the log says why."""
    from model.consolidation import consolidate

    model, state = taught
    student, teacher = model_from(model.config, cpu_weights(model)), model_from(model.config, cpu_weights(model))
    night = dataclasses.replace(TEST_SLEEP, steps=5, batch_size=2, seq_len=16, cuda_graph=True)
    with caplog.at_level("WARNING", logger="model.consolidation"):
        metrics = consolidate(student, teacher, [Replay([f.text() for f in FACTS], state)], corpus.train[:5000], night)
    assert "running the steps eagerly, since the device is not CUDA" in caplog.text
    assert set(metrics) >= {"replay_bpb", "distill", "anchor"}


def test_the_anchor_pull_adds_the_gradient_of_the_squared_distance_to_the_anchor():
    """`AnchorPull` outside autograd: its value and the gradient it adds equal autograd's of
    sum ||p - anchor||^2, and a parameter the loss never reached (grad None) keeps no gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    anchor = {name: p.detach() + 0.1 * torch.randn_like(p) for name, p in model.named_parameters()}
    weight = 0.3
    loss = model(torch.randn(5, 3))[:, 0].sum()
    penalty = sum((p - anchor[name]).pow(2).sum() for name, p in model.named_parameters())
    expected = torch.autograd.grad(loss + weight * penalty, list(model.parameters()), retain_graph=True)
    pull = AnchorPull(model, anchor, torch.device("cpu"))
    torch.testing.assert_close(pull.value, penalty.detach())
    loss.backward()
    model[1].bias.grad = None  # as if forward had not used it
    pull.add_gradient(weight)
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        if name == "1.bias":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, want)


def test_bitdelta_personal_delta_round_trips_through_dense(slept, taught):
    model, _ = taught
    base, _, _, result = slept
    tensors, meta = personal_delta(base, result.weights, "v0001", kind="bitdelta")
    dense = dense_delta(tensors, meta)
    assert set(dense) and all(d.shape == base[n].shape for n, d in dense.items())


def test_gate_names_each_failing_threshold():
    reasons = gate_failures({"recall": 0.2, "bpb_rise": 0.5, "leakage": 0.0}, GateConfig())
    assert len(reasons) == 2 and reasons[0].startswith("recall=0.2000 below") and "bpb_rise" in reasons[1]


def test_a_named_recipe_is_its_fields_then_the_changes_given():
    """How the flow, `reverie sleep --recipe` and REVERIE_SLEEP_RECIPE choose a night: a change given
    on top of the recipe wins, and a wrong name or field is an error that says what is known."""
    fast = named_recipe("reverie_fast", steps=40)
    assert (fast.lr, fast.anchor_weight, fast.earlier_weight, fast.rehearsal_fraction, fast.steps) == (3e-3, 2e-2, 4.0, 0.25, 40)
    assert named_recipe("reverie") == SleepConfig()
    with pytest.raises(ValueError, match="unknown sleep recipe 'fast'; known: .*reverie_fast"):
        named_recipe("fast")
    with pytest.raises(ValueError, match=r"unknown SleepConfig fields \['stepz'\]"):
        named_recipe("reverie", stepz=3)
    with pytest.raises(ValueError, match="lr must be > 0"):
        named_recipe("reverie_fast", lr=0.0)
