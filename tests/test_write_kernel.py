"""The fused memory writes (model/fused_write.py) against `write_slots`: the C++ kernel that CPU
tensors take, and the Triton kernel, which runs in Triton's interpreter here (tests/conftest.py
switches it on); the GPU suite checks the compiled Triton kernel on the device at `base` sizes."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import model.fused_write
import model.lm
from model.config import preset
from model.fast_state import FastState
from model.fused_write import triton_write_in_place, write_slots_in_place
from model.generate import GenerationConfig, generate_batch
from model.lm import ReverieLM
from model.memory import EpisodicMemory, ProceduralMemory, Slots, Trace, close_spans

SPAN = 8
KERNELS = {
    "cpu": write_slots_in_place,
    "triton": pytest.param(triton_write_in_place, marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="the CUDA write is a Triton kernel: pip install triton")),
}


def stacked_rule(kind: str, count: int, d: int, dtype: torch.dtype):
    """Memories whose neuromodulators write for some spans and skip others."""
    memories = []
    for seed in range(count):
        torch.manual_seed(seed)
        memory = ProceduralMemory(0.9, 3.0) if kind == "pm" else EpisodicMemory(d, topk=2, decay=0.95, budget=4.0)
        with torch.no_grad():
            memory.neuromodulator.net[2].weight.normal_(0.0, 3.0)
            memory.neuromodulator.net[2].bias.fill_(0.0)
        memories.append(memory.to(dtype))
    with torch.no_grad():
        return type(memories[0]).stacked_rule(memories)


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("batch, count, total, slots, d",  # the last: the Triton write takes its scores from chunks
                         [(3, 2, 3, 6, 40), (4, 3, 3, 16, 64), (5, 1, 2, 5, 300), (3, 2, 3, 40, 512)])
@pytest.mark.parametrize("some_close", [True, False])
def test_a_fused_write_equals_write_slots(kernel, kind, batch, count, total, slots, d, some_close):
    """Inputs are views of the first `count` of `total` instances, as the model passes them; the
    rest, and every user whose span does not end, must be left bit for bit as they were."""
    g = torch.Generator().manual_seed(batch * slots + d)
    keys = F.normalize(torch.randn(batch, total, slots, d, generator=g), dim=-1)
    values = torch.randn(batch, total, slots, d, generator=g)
    strengths = torch.rand(batch, total, slots, generator=g) * (torch.rand(batch, total, slots, generator=g) < 0.5)
    trace_keys, trace_values = torch.randn(batch, total, d, generator=g), torch.randn(batch, total, d, generator=g)
    closes = torch.arange(batch) % 2 == 0 if some_close else None
    rule = stacked_rule(kind, count, d, torch.float32)
    given = Slots(keys[:, :count], values[:, :count], strengths[:, :count])
    want_slots, want_trace, want_writes = close_spans(rule, given, Trace(trace_keys[:, :count], trace_values[:, :count]),
                                                      torch.zeros(batch, dtype=torch.long),
                                                      True if closes is None else closes, SPAN)
    state = [t.clone() for t in (keys, values, strengths, trace_keys, trace_values)]
    writes = kernel(rule, Slots(*(t[:, :count] for t in state[:3])), Trace(*(t[:, :count] for t in state[3:])), SPAN,
                    closes)
    assert torch.equal(writes, want_writes)
    for got, want, before in zip(state, (*want_slots, *want_trace), (keys, values, strengths, trace_keys, trace_values)):
        torch.testing.assert_close(got[:, :count], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[:, count:], before[:, count:])
        if closes is not None:
            assert torch.equal(got[~closes], before[~closes])


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_the_cpu_kernel_equals_write_slots_in_float64(kind):
    g = torch.Generator().manual_seed(11)
    batch, count, slots, d = 4, 3, 7, 24
    state = [F.normalize(torch.randn(batch, count, slots, d, generator=g, dtype=torch.float64), dim=-1),
             torch.randn(batch, count, slots, d, generator=g, dtype=torch.float64),
             torch.rand(batch, count, slots, generator=g, dtype=torch.float64),
             torch.randn(batch, count, d, generator=g, dtype=torch.float64),
             torch.randn(batch, count, d, generator=g, dtype=torch.float64)]
    rule = stacked_rule(kind, count, d, torch.float64)
    closes = torch.tensor([True, False, True, True])
    want = close_spans(rule, Slots(*state[:3]), Trace(*state[3:]), torch.zeros(batch, dtype=torch.long), closes, SPAN)
    writes = write_slots_in_place(rule, Slots(*state[:3]), Trace(*state[3:]), SPAN, closes)
    assert torch.equal(writes, want[2])
    for got, expected in zip(state, (*want[0], *want[1])):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS.values(), ids=KERNELS.keys())
def test_a_model_with_a_fused_write_decodes_as_with_the_torch_write(monkeypatch, kernel):
    """The model's use of a kernel: views of its state, in place only where the state is donated
    (the caller's own state is never changed), prefill and decoding at different span offsets."""
    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        state = FastState.cat([lm(torch.randint(0, 256, (1, n), generator=g))[1] for n in (3, 9, 14)])
    kept = state.clone()
    prompts = [b"one", b"a longer prompt", b"a prompt longer than one span of bytes"]
    generation = GenerationConfig(max_new_bytes=2 * config.span, temperature=0.0)
    for module in (model.lm, model.fused_write):  # the model's end-of-call writes, and close_spans' (prefill)
        monkeypatch.setattr(module, "fused_write_supported", lambda slots: False)
    want, want_state = generate_batch(lm, prompts, state, generation)
    for module in (model.lm, model.fused_write):
        monkeypatch.setattr(module, "fused_write_supported", lambda slots: True)
        monkeypatch.setattr(module, "write_slots_in_place", kernel)
    got, got_state = generate_batch(lm, prompts, state, generation)
    assert [r.response for r in got] == [r.response for r in want]
    assert [r.metrics["memory_writes"] for r in got] == [r.metrics["memory_writes"] for r in want]
    for name, tensor in want_state.tensors().items():
        torch.testing.assert_close(got_state.tensors()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in kept.tensors().items():
        assert torch.equal(state.tensors()[name], tensor), f"the caller's {name} changed"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the CUDA write is a Triton kernel")
@pytest.mark.parametrize("slots, d", [(6, 40), (40, 512)])
def test_the_triton_write_stays_inside_a_compiled_graph(slots, d):
    """The Triton write is a custom op, so torch.compile traces a decode step's end-of-call writes
    whole (fullgraph: no break) and the compiled step writes the caller's buffers in place, as
    eager, traces included: they take the call's sums inside the kernel."""
    g = torch.Generator().manual_seed(slots + d)
    batch, count = 4, 2
    state = [F.normalize(torch.randn(batch, count, slots, d, generator=g), dim=-1),
             torch.randn(batch, count, slots, d, generator=g),
             torch.rand(batch, count, slots, generator=g),
             torch.randn(batch, count, d, generator=g), torch.randn(batch, count, d, generator=g)]
    added = torch.randn(batch, count, d, generator=g)
    closes = torch.tensor([True, False, True, True])
    rule = stacked_rule("em", count, d, torch.float32)

    def close(keys, values, strengths, trace_keys, trace_values, sums):  # as the model's decode step
        return triton_write_in_place(rule, Slots(keys, values, strengths), Trace(trace_keys, trace_values), SPAN,
                                     closes, Trace(sums, 2 * sums)) + 1

    eager = [t.clone() for t in state]
    want = close(*eager, added)
    for got, given, more in zip(eager[3:], state[3:], (added, 2 * added)):  # the others' traces took the sums
        torch.testing.assert_close(got[~closes], (given + more)[~closes])
        assert not got[closes].any(), "a closed span's trace must be emptied"
    torch._dynamo.reset()
    compiled = [t.clone() for t in state]
    got = torch.compile(close, fullgraph=True, backend="inductor")(*compiled, added)
    assert torch.equal(got, want)
    for name, a, b in zip(("keys", "values", "strengths", "trace keys", "trace values"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(compiled[3], state[3]), "the compiled write changed no buffer of the caller"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the CUDA write is a Triton kernel")
def test_a_compiled_learning_decode_step_is_one_graph(monkeypatch):
    """The decode step as a decode graph compiles it (held write rules, the Triton write), with the
    CUDA path's calls on CPU tensors: dynamo traces it whole. Asking whether Triton is there used
    to import inside the trace: a graph break before the writes, which split the step in five
    graphs and ran the writes' concatenations eagerly (H200, session 19)."""
    from model.decode_graph import sync_free_step
    from model.memory import rules_held

    monkeypatch.setattr(model.lm, "fused_write_supported",  # fused_write_supported's CUDA branch
                        lambda slots: not torch.is_grad_enabled() and model.fused_write.kernels_available("model.write_kernel"))
    monkeypatch.setattr(model.lm, "write_slots_in_place", triton_write_in_place)
    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny")).eval()
    state = lm(torch.randint(0, 256, (3, 2 * lm.config.span - 1)))[1]
    rules = {kind.__name__: kind._build_rule(memories) for kind, memories in lm.memories().items()}
    torch._dynamo.reset()
    with torch.no_grad(), rules_held(rules):
        explained = torch._dynamo.explain(sync_free_step)(lm, torch.tensor([1, 2, 3]), state, True, True)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
