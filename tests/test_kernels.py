"""Fast paths against their references: the batched span reads, and the GPU suite's smoke run."""

from __future__ import annotations

import json
import os
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
from model.memory import (EpisodicMemory, ProceduralMemory, Slots, SpanPlan, Trace, close_spans, run_over_spans,
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
    torch.testing.assert_close(fast.reads, reference.reads, rtol=1e-9, atol=1e-9)
    assert (fast.pending is None) == (reference.pending is None)
    pending = () if fast.pending is None else zip(fast.pending, reference.pending)
    for got, want in (*zip((*fast.slots, *fast.trace), (*reference.slots, *reference.trace)), *pending):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(fast.writes, reference.writes)


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("learn", [True, False])
@pytest.mark.parametrize("phase, length", [(0, 1), (0, 5), (3, 5), (0, 8), (0, 37), (5, 37), (7, 1), (7, 17)])
def test_batched_span_reads_equal_the_reference_loop(kind, learn, phase, length):
    memory = make_memory(kind, seed=length + phase)
    queries, values, slots, trace = random_inputs(length, seed=100 * phase + length)
    plan = SpanPlan.of([phase] * BATCH, length, SPAN)
    fast = run_over_spans(memory, queries, values, slots, trace, plan, SPAN, learn)
    reference = run_over_spans_reference(memory, queries, values, slots, trace, plan, SPAN, learn)
    assert_same_results(fast, reference)
    if learn and kind == "em" and (phase, length) == (0, 37):  # four spans close: some write, some skip
        assert 0 < int(fast.writes.sum()) < 4 * BATCH


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("close_last", [True, False])
@pytest.mark.parametrize("phases, length", [([0, 3, 7], 1), ([7, 7, 2], 1), ([1, 4, 6], 2), ([6, 7, 0], 3),
                                            ([0, 5, 7], 6), ([2, 6, 3], 11), ([0, 1, 7], 37), ([5, 5, 6], 9)])
def test_users_at_different_span_offsets_equal_the_reference_loop(kind, close_last, phases, length):
    memory = make_memory(kind, seed=length + sum(phases))
    queries, values, slots, trace = random_inputs(length, seed=length * 10 + phases[1])
    plan = SpanPlan.of(phases, length, SPAN)
    fast = run_over_spans(memory, queries, values, slots, trace, plan, SPAN, True, close_last)
    assert_same_results(fast, run_over_spans_reference(memory, queries, values, slots, trace, plan, SPAN, True,
                                                       close_last))


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("learn", [True, False])
@pytest.mark.parametrize("phases, lengths", [([0, 0, 0], [5, 37, 1]), ([3, 7, 1], [9, 2, 30]), ([5, 5, 5], [8, 8, 3])])
def test_users_of_different_lengths_equal_the_reference_loop(kind, learn, phases, lengths):
    """A right-padded batch: each user's bytes past its own length neither add to its trace nor end a span."""
    memory = make_memory(kind, seed=sum(lengths))
    queries, values, slots, trace = random_inputs(max(lengths), seed=sum(phases) + 3)
    plan = SpanPlan.of(phases, max(lengths), SPAN, lengths=lengths)
    fast = run_over_spans(memory, queries, values, slots, trace, plan, SPAN, learn)
    reference = run_over_spans_reference(memory, queries, values, slots, trace, plan, SPAN, learn)
    for user, n in enumerate(lengths):  # reads past a user's length are padding
        torch.testing.assert_close(fast.reads[user, :n], reference.reads[user, :n], rtol=1e-9, atol=1e-9)
    assert_same_results(fast._replace(reads=reference.reads), reference)


@pytest.mark.parametrize("phases, length", [([0, 3, 7], 1), ([3, 3], 5), ([7, 0], 2), ([6, 7, 0], 3),
                                            ([2, 6, 3], 11), ([0, 1, 7], 37), ([4], 64)])
def test_a_span_plan_cuts_each_user_where_its_own_spans_end(phases, length):
    plan = SpanPlan.of(phases, length, SPAN)
    for user, phase in enumerate(phases):
        assert plan.segments(user) == span_segments(phase, length, SPAN)
    shorter = [max(1, length - 3 * user) for user in range(len(phases))]
    padded = SpanPlan.of(phases, length, SPAN, lengths=shorter)
    for user, phase in enumerate(phases):
        assert padded.segments(user) == span_segments(phase, shorter[user], SPAN)
    x = torch.arange(len(phases) * length, dtype=torch.float64).reshape(len(phases), length, 1)
    grid = plan.fold(x)
    assert grid.shape[:3] == (len(phases), plan.rows, plan.width)
    assert torch.equal(plan.unfold(grid), x)  # each byte has its own cell


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_one_byte_with_a_device_mask_writes_only_where_the_span_ends(kind):
    memory = make_memory(kind, seed=7)
    queries, values, slots, trace = random_inputs(1, seed=7)
    plan = SpanPlan.one_byte(torch.tensor([True, False, True]), BATCH)
    fast = run_over_spans(memory, queries, values, slots, trace, plan, SPAN, True)
    assert_same_results(fast, run_over_spans_reference(memory, queries, values, slots, trace, plan, SPAN, True))
    torch.testing.assert_close(fast.trace.keys[1], trace.keys[1] + queries[1, 0])  # row 1 keeps its trace
    assert torch.equal(fast.slots.keys[1], slots.keys[1])


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_a_stacked_write_equals_writing_each_memory_alone(kind):
    """The model closes all its PM (or EM) spans at a call's end in one write over stacked slots."""
    memories = [make_memory(kind, seed=seed) for seed in (1, 2, 3)]
    inputs = [random_inputs(1, seed=seed) for seed in (4, 5, 6)]
    closes = torch.tensor([True, False, True])
    writes = torch.zeros(BATCH, dtype=torch.long)
    alone = [close_spans(m, slots, trace, writes, closes, SPAN) for m, (_, _, slots, trace) in zip(memories, inputs)]
    stacked = close_spans(type(memories[0]).stacked_rule(memories),
                          Slots(*(torch.stack(parts, dim=1) for parts in zip(*(i[2] for i in inputs)))),
                          Trace(*(torch.stack(parts, dim=1) for parts in zip(*(i[3] for i in inputs)))), writes, closes,
                          SPAN)
    for index, (slots, trace, _) in enumerate(alone):
        for got, want in zip((*stacked[0], *stacked[1]), (*slots, *trace)):
            torch.testing.assert_close(got[:, index], want, rtol=1e-9, atol=1e-9)
    assert torch.equal(stacked[2], sum(result[2] for result in alone))


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_batched_span_reads_have_the_reference_gradients(kind):
    memory = make_memory(kind, seed=5)
    inputs = random_inputs(2 * SPAN + 3, seed=5)
    plan = SpanPlan.of([4, 1, 4], 2 * SPAN + 3, SPAN)
    grads = []
    for run in (run_over_spans, run_over_spans_reference):
        queries, values = (t.clone().requires_grad_() for t in inputs[:2])
        memory.zero_grad()
        reads, slots, trace, *_ = run(memory, queries, values, inputs[2], inputs[3], plan, SPAN, True)
        (reads.square().sum() + slots.values.sum() + slots.strengths.sum() + trace.values.sum()).backward()
        grads.append([queries.grad, values.grad] + [p.grad.clone() for p in memory.parameters() if p.grad is not None])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("close_last, length", [(True, SPAN), (True, 4 * SPAN), (False, 2 * SPAN), (False, 3 * SPAN + 5)])
def test_rows_that_all_end_a_span_are_written_on_a_pool_as_by_the_reference(monkeypatch, kind, close_last, length):
    """A training chunk (every row ends every user's span): `model.pooled_writes` runs its writes,
    and gives the reference loop's reads, slots, trace, writes and gradients, the given state's too."""
    import model.pooled_writes

    calls, run_pooled = [], model.pooled_writes.run_pooled
    monkeypatch.setattr(model.pooled_writes, "run_pooled",
                        lambda *args, **kwargs: calls.append(1) or run_pooled(*args, **kwargs))
    memory = make_memory(kind, seed=length)
    inputs = random_inputs(length, seed=length + 1)
    plan = SpanPlan.of([0] * BATCH, length, SPAN)
    results = []
    for run in (run_over_spans, run_over_spans_reference):
        leaves = [t.clone().requires_grad_() for t in (*inputs[:2], *inputs[2], *inputs[3])]
        queries, values, keys, slot_values, strengths, trace_keys, trace_values = leaves
        memory.zero_grad()
        result = run(memory, queries, values, Slots(keys, slot_values, strengths), Trace(trace_keys, trace_values),
                     plan, SPAN, True, close_last)
        pending = () if result.pending is None else (*result.pending,)
        loss = result.reads.square().sum() + sum(t.sum() for t in (*result.slots, *result.trace, *pending))
        loss.backward()
        results.append((result, [t.grad for t in leaves] + [p.grad.clone() for p in memory.parameters()
                                                             if p.grad is not None]))
    assert calls, "the pooled loop did not run"
    assert_same_results(results[0][0], results[1][0])
    if length >= 3 * SPAN:
        assert int(results[0][0].writes.sum()) > 0
    for got, want in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["pm", "em"])
@pytest.mark.parametrize("warm", [False, True])
def test_the_fused_write_loop_equals_the_torch_loop(kind, warm):
    """`model.fused_loop` (its Triton kernels in the interpreter here) against `run_pooled`'s torch
    loop, float32: each row's indexes, strengths and writes, and the gradients of every input and
    of the memory's parameters, given a loss on every row's strengths."""
    from model.fused_loop import fused_loop_rows
    from model.pooled_writes import torch_loop_rows

    memory = make_memory(kind, seed={"pm": 29, "em": 26}[kind]).float()  # seeds whose rows write and skip
    rows = 5
    g = torch.Generator().manual_seed(22)
    results = []
    for fused in (False, True):
        memory.zero_grad()
        keys = F.normalize(torch.randn(BATCH, SLOTS + rows, D, generator=g), dim=-1).requires_grad_()
        values = (0.3 * torch.randn(BATCH, SLOTS + rows, D, generator=g)).requires_grad_()
        strengths = torch.rand(BATCH, SLOTS, generator=g) * (torch.rand(BATCH, SLOTS, generator=g) < 0.5) * warm
        strengths.requires_grad_()
        g.manual_seed(22)  # the same inputs for both loops
        rule = memory.stacked_rule([memory])
        row_scores = keys[:, SLOTS:] @ keys.mT
        value_norms = values[:, SLOTS:].norm(dim=-1) + 1e-6
        if fused:
            loop = fused_loop_rows(rule, row_scores, values, value_norms, strengths)
        else:
            loop = torch_loop_rows(rule, row_scores, values, values[:, SLOTS:], value_norms, strengths, None)
        weights = torch.randn(loop.strengths.shape, generator=torch.Generator().manual_seed(23))
        (loop.strengths * weights).sum().backward()
        results.append((loop, [keys.grad, values.grad, strengths.grad]
                        + [p.grad.clone() for p in memory.parameters() if p.grad is not None]))
    (torch_loop, torch_grads), (fused_loop, fused_grads) = results
    assert 0 < int(torch_loop.wrote.sum()) < BATCH * rows  # some rows write, some do not
    assert torch.equal(fused_loop.index, torch_loop.index) and torch.equal(fused_loop.wrote, torch_loop.wrote)
    torch.testing.assert_close(fused_loop.strengths, torch_loop.strengths, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, torch_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


COMPILE_FOR_HOPPER = """
import inspect, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model.loop_kernel import backward_kernel, forward_kernel
from model.scan import BLOCK_D, BLOCK_T, GATED_BACKWARD_BLOCK_T, GATED_BLOCK_D, GATED_FORWARD_BLOCK_T
from model.scan_kernel import backward_kernel as scan_backward, forward_kernel as scan_forward
from model.scan_kernel import (gated_backward_kernel, gated_backward_summary_kernel, gated_forward_kernel,
                               gated_summary_kernel)
from model.write_kernel import kernel as write_kernel, scores_kernel

TYPES = {"rows": "i32", "m": "i32", "d": "i32", "span": "fp32", "decay": "fp32", "budget": "fp32",
         "threshold": "fp32", "index_rows": "*i64", "wrote_rows": "*i8", "closes": "*u8", "writes": "*i32",
         "length": "i32", "proj": "*bf16", "out": "*bf16", "d_out": "*bf16", "d_proj": "*bf16", "h_all": "*bf16",
         "segment_len": "i32", "n_segments": "i32"}
FORWARD = {"BLOCK_T": GATED_FORWARD_BLOCK_T, "BLOCK_D": GATED_BLOCK_D}
BACKWARD = {"BLOCK_T": GATED_BACKWARD_BLOCK_T, "BLOCK_D": GATED_BLOCK_D}
PM, EM = {"TOPK": 0, "HIDDEN": 16, "BLOCK_M": 8}, {"TOPK": 4, "HIDDEN": 16, "BLOCK_M": 256}
CASES = [(forward_kernel, {**PM, "BLOCK_V": 1024}), (forward_kernel, {**EM, "BLOCK_V": 1024}),
         (backward_kernel, PM), (backward_kernel, EM),
         (write_kernel, {**PM, "HAS_CLOSES": True, "HAS_SUMS": True, "SCORES_GIVEN": False, "BLOCK_D": 1024,
                         "BLOCK_V": 1024}),
         (write_kernel, {**EM, "HAS_CLOSES": True, "HAS_SUMS": True, "SCORES_GIVEN": True, "BLOCK_D": 64,
                         "BLOCK_V": 1024}),
         (scores_kernel, {"HAS_CLOSES": True, "HAS_SUMS": True, "BLOCK_S": 16, "BLOCK_D": 1024}),
         (scan_forward, {"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D}),
         (scan_backward, {"BLOCK_T": BLOCK_T, "BLOCK_D": BLOCK_D}),
         (gated_summary_kernel, {"SIGN": 1, **FORWARD}),
         (gated_forward_kernel, {"STORE_H": True, "SIGN": 1, **FORWARD}),
         (gated_backward_summary_kernel, {"SIGN": -1, **BACKWARD}),
         (gated_backward_kernel, {"SIGN": -1, **BACKWARD})]
for kernel, constants in CASES:
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif re.fullmatch("s[a-z0-9]+_[a-z]", name):
            signature[name] = "i32"  # a stride
        else:
            signature[name] = TYPES.get(name, "*fp32")
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(kernel.fn.__name__, constants.get("TOPK"), "compiled")
"""


def test_the_triton_kernels_compile_for_a_hopper_gpu():
    """The interpreter runs Triton code as Python, so it misses what only the compiler rejects (a
    loop-carried variable that changes type, found this way). The loop, write and scan kernels
    compiled here for sm_90 without a GPU, in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 13, done.stdout


def learning_step(lm: ReverieLM, tokens: torch.Tensor, state: FastState | None = None) -> list[torch.Tensor]:
    """One learning forward and backward over tokens (b, T + 1): the logits, the returned state's
    tensors (writes third) and every parameter's gradient (zeros where none), to compare two ways."""
    lm.zero_grad()
    logits, state = lm(tokens[:, :-1], state)
    model.lm.bits_per_byte(logits, tokens[:, 1:]).backward()
    return ([logits.detach(), *state.detach().tensors().values()]
            + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lm.parameters()])


def test_a_training_step_on_the_fused_write_loop_equals_the_torch_loop(monkeypatch):
    """Whole ReverieLM `tiny`, float32, from no state: the fused loop (interpreted here) gives the
    torch loop's loss, gradients and state."""
    import model.pooled_writes

    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config)
    tokens = torch.randint(0, 256, (2, 3 * config.span + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        monkeypatch.setattr(model.pooled_writes, "fused_loop_supported", lambda values, fused=fused: fused)
        results.append(learning_step(lm, tokens))
    assert int(results[0][2].min()) > 0  # writes happened
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_training_step_on_pooled_writes_equals_the_reference_loop(monkeypatch):
    """Whole ReverieLM, float64, from no state (training): loss, gradients and state."""
    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config).double()
    tokens = torch.randint(0, 256, (2, 3 * config.span + 1), generator=torch.Generator().manual_seed(2))
    results = []
    for loop in (run_over_spans, run_over_spans_reference):
        monkeypatch.setattr(model.lm, "run_over_spans", loop)
        results.append(learning_step(lm, tokens, FastState.empty(config, 2, dtype=torch.float64)))  # as training's
    assert int(results[0][2].min()) > 0  # writes happened
    for got, want in zip(*results, strict=True):
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


def test_a_training_step_with_compiled_writes_equals_the_eager_one():
    """`compiled_writes` (torch.compile of write_slots, inductor on this CPU): same loss, same
    gradients, same written state, for a learning forward over several spans."""
    from model import memory

    torch.manual_seed(0)
    config = preset("tiny")
    lm = ReverieLM(config)
    tokens = torch.randint(0, 256, (2, 3 * config.span + 1), generator=torch.Generator().manual_seed(3))
    results = []
    for compiled in (False, True):
        with memory.compiled_writes(compiled):
            results.append(learning_step(lm, tokens))
    assert int(results[0][2].min()) > 0  # writes happened (FastState.writes follows pos)
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)


def test_compiled_layers_give_the_eager_loss_and_gradients():
    """`ReverieLM.compile_layers` (traced with aot_eager here: the same graphs inductor gets,
    without the minutes of code generation), with compiled writes, learning over several spans."""
    from model import memory

    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny"))
    tokens = torch.randint(0, 256, (2, 2 * lm.config.span + 1), generator=torch.Generator().manual_seed(4))
    results = []
    for compiled in (False, True):
        lm.zero_grad()
        if compiled:
            lm.compile_layers(backend="aot_eager")
            lm.compile_layers(backend="aot_eager")  # a second call changes nothing
        with memory.compiled_writes(compiled, backend="aot_eager"):
            loss = model.lm.bits_per_byte(lm(tokens[:, :-1])[0], tokens[:, 1:])
            loss.backward()
        results.append([loss.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for p in lm.parameters()])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_span_loops_give_the_eager_loss_gradients_and_state():
    """`compiled_writes(loops=True)`: a training chunk's write loop as one compiled function
    (`model.pooled_writes.run_pooled`, aot_eager here), from an empty state and from a warm one."""
    from model import memory

    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny"))
    tokens = torch.randint(0, 256, (2, 4 * lm.config.span + 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, warm = lm(torch.randint(0, 256, (2, 2 * lm.config.span), generator=torch.Generator().manual_seed(6)))
    for given in (None, warm):
        results = []
        for loops in (False, True):
            with memory.compiled_writes(loops, backend="aot_eager", loops=loops):
                results.append(learning_step(lm, tokens, given))
        assert int(results[0][2].min()) > 0  # writes happened
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_a_read_of_one_query_equals_it_read_among_others(kind):
    """Decoding reads one query a row (EM by its own path, its top k values gathered): it must give
    what the batched read of many queries gives."""
    memory = make_memory(kind, seed=11)
    queries, _, slots, _ = random_inputs(5, seed=12)
    together = memory.read(queries, slots)
    for t in range(queries.shape[1]):
        torch.testing.assert_close(memory.read(queries[:, t:t + 1], slots), together[:, t:t + 1], rtol=1e-12, atol=1e-12)


def test_one_query_attention_spelled_out_equals_torch_attention():
    """The decoding step's attention as a compiled step runs it (products and sums) against
    torch's kernel, which it runs eagerly; some keys masked, as in a ring not yet full."""
    from model.layers import attend_one

    g = torch.Generator().manual_seed(5)
    query, keys, values = (torch.randn(3, 2, n, 8, generator=g, dtype=torch.float64) for n in (1, 6, 6))
    within = torch.rand(3, 6, generator=g) < 0.6
    within[:, 0] = True  # a user's newest key is always in the ring
    torch.testing.assert_close(attend_one(query, keys, values, within, spelled_out=True),
                               attend_one(query, keys, values, within, spelled_out=False), rtol=1e-12, atol=1e-12)


def test_em_read_weights_compiled_equal_the_eager_top_k():
    """Compiled, EM's read weights take the top k by rounds of max (`_top_k_by_max`); eagerly by
    torch's topk. Same weights and gradients, with some users' slots partly empty."""
    from model.memory import top_k_weights

    g = torch.Generator().manual_seed(6)
    scores = torch.randn(3, 5, 9, generator=g, dtype=torch.float64)
    used = torch.rand(3, 9, generator=g) < 0.6
    used[0] = False  # one user with an empty memory
    sharpness = torch.tensor(10.0, dtype=torch.float64)

    def dense_weights(scores: torch.Tensor) -> torch.Tensor:
        index, weights = top_k_weights(scores, used, 4, sharpness)
        return torch.zeros_like(scores).scatter(-1, index, weights)

    results = []
    for weigh in (dense_weights, torch.compile(dense_weights, backend="aot_eager", fullgraph=True)):
        given = scores.clone().requires_grad_()
        weights = weigh(given)
        (weights * torch.linspace(-1, 1, weights.numel(), dtype=torch.float64).view_as(weights)).sum().backward()
        results.append((weights.detach(), given.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["pm", "em"])
def test_one_query_reads_and_writes_compiled_equal_their_products(kind):
    """Compiled without autograd (decoding), a read of one query a row and a write's scores are
    spelled out as products and sums (`slot_scores`, `strength_weighted_combine`), where eagerly
    they are products with the slots: the same reads and slots."""
    from model.memory import write_slots

    memory = make_memory(kind, seed=9)
    queries, _, slots, trace = random_inputs(1, seed=9)

    def read_and_write(queries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return memory.read(queries, slots), *write_slots(rule, slots, trace, SPAN)[0]

    with torch.no_grad():
        rule = memory.stacked_rule([memory])
        want = read_and_write(queries)
        got = torch.compile(read_and_write, backend="aot_eager", fullgraph=True)(queries)
    for got_tensor, want_tensor in zip(got, want, strict=True):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=1e-12, atol=1e-12)


def test_forward_without_writes_shares_the_memory_tensors_of_the_given_state():
    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny")).eval()
    _, state = lm(torch.randint(0, 256, (1, 40)))
    _, after = lm(torch.randint(0, 256, (1, 5)), state, learn=False)
    assert after.em_k is state.em_k and after.pm_v is state.pm_v
    assert not torch.equal(after.scan_h, state.scan_h)


@pytest.mark.parametrize("learn", [True, False])
def test_sync_free_decode_step_equals_step_for_users_at_different_offsets(learn):
    """The one-byte path that model/decode_graph.py captures in a CUDA graph."""
    from model.decode_graph import sync_free_step

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


def test_gpu_suite_summary_says_nothing_of_checks_it_did_not_run():
    """A call that runs only some sections (the sleep's, say) must not report the checks as
    failed: session 23's sleep-only call said checks_ok False."""
    from bench.gpu_suite import summarize

    sleep_only = {"sleep": {"items": {"shared_bulk": {"interactions_per_s": 1000.0}}}}
    assert "checks_ok" not in summarize(sleep_only)
    failed = {"checks": {"items": {"scan": {"ok": True}, "sleep_graph": {"ok": False}}}}
    assert summarize(failed)["checks_ok"] is False


def test_gpu_suite_summary_puts_decoding_beside_its_byte_floors():
    """The GPT's floor over Reverie's, and Reverie's step against the time its bytes take at the
    copy bandwidth measured in the same run."""
    from bench.gpu_suite import decode_min_bytes, summarize

    floor = decode_min_bytes(ReverieLM(preset("tiny")), 4, torch.float32)
    assert floor > decode_min_bytes(ReverieLM(preset("tiny")), 1, torch.float32)
    results = {"bandwidth": {"items": {"copy": {"tb_s": 2.0}}},
               "generation": {"items": {"reverie b=4 learn=off graph": {"bytes_per_s": 4000.0, "min_bytes": 1e9},
                                        "reverie b=4 learn=on graph": {"bytes_per_s": 3000.0, "min_bytes": 1e9},
                                        "gpt-kv b=4 graph": {"bytes_per_s": 1000.0, "min_bytes": 3e9}}}}
    entry = summarize(results)["generation"]["b=4 graph"]
    assert entry["kv_gpt_vs_reverie_min_bytes"] == pytest.approx(3.0)
    assert entry["reverie_learn_on_vs_kv_gpt"] == pytest.approx(3.0)
    assert entry["reverie_off_fraction_of_floor"] == pytest.approx(0.5)  # 0.5 ms of bytes in a 1-ms step
    # A compiled Reverie step is held against the compiled GPT where it ran, the graphed one beside it.
    items = results["generation"]["items"]
    items |= {name.replace("graph", "graph+compile"): r for name, r in items.items()}
    items["gpt-kv b=4 graph+compile"] = {"bytes_per_s": 1500.0, "min_bytes": 3e9}
    entry = summarize(results)["generation"]["b=4 graph+compile"]
    assert entry["reverie_learn_on_vs_kv_gpt"] == pytest.approx(2.0)
    assert entry["reverie_learn_on_vs_kv_gpt_uncompiled"] == pytest.approx(3.0)


def test_the_write_rule_is_kept_without_autograd_until_a_parameter_changes():
    """Decoding builds the stacked write rule once; a changed parameter (a new version, a delta)
    builds it again; with autograd it is built every time (its stacks belong to the graph); a
    decode graph's step uses the rule it holds."""
    from model.memory import EpisodicMemory, rules_held

    lm = ReverieLM(preset("tiny"))
    memories = [block.episodic for block in lm.blocks]
    with torch.no_grad():
        first = EpisodicMemory.stacked_rule(memories)
        assert EpisodicMemory.stacked_rule(memories) is first
        memories[1].log_temperature.add_(0.5)
        memories[0].neuromodulator.net[2].bias.mul_(2.0)
        changed = EpisodicMemory.stacked_rule(memories)
    assert changed is not first
    torch.testing.assert_close(changed.sharpness[1, 0, 0], memories[1].log_temperature.exp())
    torch.testing.assert_close(changed.b2[0], memories[0].neuromodulator.net[2].bias)
    assert EpisodicMemory.stacked_rule(memories) is not EpisodicMemory.stacked_rule(memories)
    held = changed._replace(b1=changed.b1.clone())
    with torch.no_grad(), rules_held({"EpisodicMemory": held}):  # as a decode graph runs: the rule it holds
        assert EpisodicMemory.stacked_rule(memories) is held
    with torch.no_grad():
        assert EpisodicMemory.stacked_rule(memories) is changed


def test_a_training_step_under_bf16_autocast_keeps_the_memory_math_in_float32():
    """As training runs on a GPU (bf16 autocast), here on the CPU's autocast: the span loop and its
    reads stay float32 (their products under autocast would come back bf16 and mix dtypes), so the
    step runs and the state it returns is float32."""
    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny"))
    tokens = torch.randint(0, 256, (2, 3 * lm.config.span + 1), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = lm(tokens[:, :-1])
        loss = model.lm.bits_per_byte(logits, tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert int(state.writes.min()) > 0
    assert all(t.dtype == torch.float32 for name, t in state.tensors().items() if t.is_floating_point()), \
        {name: t.dtype for name, t in state.tensors().items()}
