"""Fast paths against their references: the batched span reads, and the GPU suite's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.lm
from model.config import preset
from model.fast_state import FastState
from model.lm import ReverieLM
from model.memory import (EpisodicMemory, ProceduralMemory, Segment, Slots, Trace, run_over_spans,
                          run_over_spans_reference, span_segments)

ROOT = Path(__file__).resolve().parents[1]
BATCH, SLOTS, D, SPAN = 3, 6, 8, 8


def make_memory(kind: str, seed: int):
    torch.manual_seed(seed)
    memory = ProceduralMemory(0.9, 3.0) if kind == "pm" else EpisodicMemory(D, topk=2, decay=0.95, budget=4.0)
    with torch.no_grad():  # a neuromodulator that writes for some users and skips others
        memory.neuromodulator.net[2].weight.normal_(0.0, 3.0)
        memory.neuromodulator.net[2].bias.fill_(0.0)
    return memory.double()


def random_inputs(length: int, seed: int):
    """Unit queries (b, T, d), values, half-used slots and a trace in progress, all float64."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    queries = F.normalize(randn(BATCH, length, D), dim=-1)
    strengths = torch.rand(BATCH, SLOTS, generator=g, dtype=torch.float64)
    strengths = strengths * (torch.rand(BATCH, SLOTS, generator=g) < 0.5)
    slots = Slots(F.normalize(randn(BATCH, SLOTS, D), dim=-1), randn(BATCH, SLOTS, D), strengths)
    return queries, randn(BATCH, length, D), slots, Trace(randn(BATCH, D), randn(BATCH, D))


def assert_same_results(fast, reference):
    reads, slots, trace, writes = fast
    ref_reads, ref_slots, ref_trace, ref_writes = reference
    torch.testing.assert_close(reads, ref_reads, rtol=1e-9, atol=1e-9)
    for got, want in zip((*slots, *trace), (*ref_slots, *ref_trace)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(writes, ref_writes)


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("learn", [True, False])
@pytest.mark.parametrize("phase, length", [(0, 1), (0, 5), (3, 5), (0, 8), (0, 37), (5, 37), (7, 1), (7, 17)])
def test_batched_span_reads_equal_the_reference_loop(kind, learn, phase, length):
    memory = make_memory(kind, seed=length + phase)
    queries, values, slots, trace = random_inputs(length, seed=100 * phase + length)
    segments = span_segments(phase, length, SPAN)
    fast = run_over_spans(memory, queries, values, slots, trace, segments, SPAN, learn)
    reference = run_over_spans_reference(memory, queries, values, slots, trace, segments, SPAN, learn)
    assert_same_results(fast, reference)
    if learn and kind == "em" and (phase, length) == (0, 37):  # four spans close: some write, some skip
        assert 0 < int(fast[3].sum()) < 4 * BATCH


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_users_at_different_span_offsets_write_only_where_their_span_ends(kind):
    memory = make_memory(kind, seed=7)
    queries, values, slots, trace = random_inputs(1, seed=7)
    closes = torch.tensor([True, False, True])
    segments = [Segment(0, 1, closes_span=closes)]
    fast = run_over_spans(memory, queries, values, slots, trace, segments, SPAN, True)
    assert_same_results(fast, run_over_spans_reference(memory, queries, values, slots, trace, segments, SPAN, True))
    torch.testing.assert_close(fast[2].keys[1], trace.keys[1] + queries[1, 0])  # row 1 keeps its trace
    assert torch.equal(fast[1].keys[1], slots.keys[1])


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_per_row_closes_inside_a_longer_grid_equal_the_reference(kind):
    """A (b,) mask in the first segment of several: snapshots taken after a partial write."""
    memory = make_memory(kind, seed=11)
    queries, values, slots, trace = random_inputs(3 + 2 * SPAN + 4, seed=11)
    segments = [Segment(0, 3, torch.tensor([False, True, True])), Segment(3, 3 + SPAN, True),
                Segment(3 + SPAN, 3 + 2 * SPAN, True), Segment(3 + 2 * SPAN, 3 + 2 * SPAN + 4, False)]
    fast = run_over_spans(memory, queries, values, slots, trace, segments, SPAN, True)
    assert_same_results(fast, run_over_spans_reference(memory, queries, values, slots, trace, segments, SPAN, True))


def test_segments_that_do_not_tile_a_grid_fall_back_to_the_reference():
    memory = make_memory("em", seed=3)
    queries, values, slots, trace = random_inputs(14, seed=3)
    segments = [Segment(0, 2, False), Segment(2, 5, True), Segment(5, 13, True), Segment(13, 14, False)]
    fast = run_over_spans(memory, queries, values, slots, trace, segments, SPAN, True)
    assert_same_results(fast, run_over_spans_reference(memory, queries, values, slots, trace, segments, SPAN, True))


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_batched_span_reads_have_the_reference_gradients(kind):
    memory = make_memory(kind, seed=5)
    inputs = random_inputs(2 * SPAN + 3, seed=5)
    segments = span_segments(4, 2 * SPAN + 3, SPAN)
    grads = []
    for run in (run_over_spans, run_over_spans_reference):
        queries, values = (t.clone().requires_grad_() for t in inputs[:2])
        memory.zero_grad()
        reads, slots, trace, _ = run(memory, queries, values, inputs[2], inputs[3], segments, SPAN, True)
        (reads.square().sum() + slots.values.sum() + slots.strengths.sum() + trace.values.sum()).backward()
        grads.append([queries.grad, values.grad] + [p.grad.clone() for p in memory.parameters() if p.grad is not None])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_model_with_batched_reads_equals_model_with_the_reference_loop(monkeypatch):
    """Whole ReverieLM, float64: a chunk that starts mid-span and runs over several spans."""
    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config).double().eval()
    tokens = torch.randint(0, 256, (2, 3 * config.span + 9), generator=torch.Generator().manual_seed(1))
    state = FastState.empty(config, 2, dtype=torch.float64)
    _, state = lm(tokens[:, :5], state)  # now at phase 5
    fast_logits, fast_state = lm(tokens[:, 5:], state)
    monkeypatch.setattr(model.lm, "run_over_spans", run_over_spans_reference)
    ref_logits, ref_state = lm(tokens[:, 5:], state)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-9, atol=1e-9)
    for name, tensor in ref_state.tensors().items():
        torch.testing.assert_close(fast_state.tensors()[name], tensor, rtol=1e-9, atol=1e-9, msg=name)
    assert int(fast_state.writes.min()) > 0


def test_forward_without_writes_shares_the_memory_tensors_of_the_given_state():
    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny")).eval()
    _, state = lm(torch.randint(0, 256, (1, 40)))
    _, after = lm(torch.randint(0, 256, (1, 5)), state, learn=False)
    assert after.em_k is state.em_k and after.pm_v is state.pm_v
    assert not torch.equal(after.scan_h, state.scan_h)


@pytest.mark.parametrize("learn", [True, False])
def test_sync_free_decode_step_equals_step_for_users_at_different_offsets(learn):
    """The one-byte path that bench/gpu_suite.py captures in a CUDA graph."""
    from bench.gpu_suite import sync_free_step

    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config).double().eval()
    g = torch.Generator().manual_seed(2)
    state = FastState.cat([lm(torch.randint(0, 256, (1, n), generator=g),
                              FastState.empty(config, 1, dtype=torch.float64))[1] for n in (3, 9, 14)])
    eager, free = state, state
    with torch.no_grad():
        for _ in range(config.span + 2):  # every user's span closes once
            byte = torch.randint(0, 256, (3,), generator=g)
            want, eager = lm.step(byte, eager, learn=learn)
            got, free = sync_free_step(lm, byte, free, learn)
            torch.testing.assert_close(got[:, 0], want, rtol=1e-9, atol=1e-9)
    for name, tensor in eager.tensors().items():
        torch.testing.assert_close(free.tensors()[name], tensor, rtol=1e-9, atol=1e-9, msg=name)
    assert torch.equal(free.writes > state.writes, torch.full((3,), learn))


def test_gpu_suite_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    for section in ("bandwidth", "checks", "training", "generation", "sleep", "bitdelta"):
        assert section in results, section
        assert "error" not in results[section], (section, results[section].get("error"))
    assert all(check["ok"] for check in results["checks"]["items"].values()), results["checks"]
