"""Specifications of ReverieLM, its scan, its FastState and its checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig, preset
from model.corpus import Corpus, embedded_corpus
from model.fast_state import FastState
from model.generate import GenerationConfig, generate_batch
from model.layers import sliding_window_attention
from model.lm import ReverieLM
from model.scan import affine_scan, affine_scan_reference
from model.session import Session
from model.training import TrainConfig, train

TINY = preset("tiny")


@pytest.fixture
def tiny_model() -> ReverieLM:
    torch.manual_seed(0)
    return ReverieLM(TINY).eval()


@pytest.fixture
def tiny_model_f64() -> ReverieLM:
    torch.manual_seed(0)
    return ReverieLM(TINY).double().eval()


def random_bytes(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the scan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 7, 64, 300])
def test_parallel_scan_matches_sequential_reference_in_float64(length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(3, length, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, length, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(affine_scan(a, b, h0), affine_scan_reference(a, b, h0), rtol=1e-12, atol=1e-12)


def test_parallel_scan_is_causal():
    g = torch.Generator().manual_seed(1)
    a, b, h0 = torch.rand(1, 50, 4, generator=g), torch.randn(1, 50, 4, generator=g), torch.zeros(1, 4)
    before = affine_scan(a, b, h0)
    b2 = b.clone()
    b2[:, 30] += 5.0
    after = affine_scan(a, b2, h0)
    assert torch.equal(before[:, :30], after[:, :30])
    assert not torch.equal(before[:, 30:], after[:, 30:])


def test_model_is_causal(tiny_model):
    tokens = random_bytes(1, 100)
    changed = tokens.clone()
    changed[0, 60] = (changed[0, 60] + 1) % 256
    logits, _ = tiny_model(tokens)
    logits2, _ = tiny_model(changed)
    assert torch.equal(logits[:, :60], logits2[:, :60])
    assert not torch.allclose(logits[:, 60:], logits2[:, 60:])


# --- working memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [33, 64, 100, 129])
def test_sliding_window_attention_equals_attention_under_the_full_window_mask(length):
    """The chunked attention of a fresh call longer than the window (one band mask shared by every
    chunk) gives what one (T, T) window mask gives, forward and gradients, T a multiple of the
    window or not."""
    window = 32
    q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i),
                           requires_grad=True) for i in range(3))
    i = torch.arange(length)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), upstream), torch.autograd.grad(want, (q, k, v), upstream)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# --- stepping vs parallel -----------------------------------------------------------------------
def test_step_by_step_logits_equal_parallel_forward(tiny_model_f64):
    tokens = random_bytes(2, 3 * TINY.span + 5)
    parallel, final = tiny_model_f64(tokens, FastState.empty(TINY, 2, dtype=torch.float64))
    state = FastState.empty(TINY, 2, dtype=torch.float64)
    stepped = []
    for t in range(tokens.shape[1]):
        logits, state = tiny_model_f64.step(tokens[:, t], state)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), parallel, rtol=1e-9, atol=1e-9)
    for name, tensor in final.tensors().items():
        torch.testing.assert_close(getattr(state, name), tensor, rtol=1e-9, atol=1e-9, msg=name)
    assert int(final.writes.min()) > 0, "three spans must have written fast memory"


def test_forward_in_chunks_equals_one_forward(tiny_model_f64):
    tokens = random_bytes(1, 100)
    whole, _ = tiny_model_f64(tokens, FastState.empty(TINY, 1, dtype=torch.float64))
    state = FastState.empty(TINY, 1, dtype=torch.float64)
    parts = []
    for start, stop in [(0, 13), (13, 40), (40, 41), (41, 100)]:
        logits, state = tiny_model_f64(tokens[:, start:stop], state)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-9, atol=1e-9)


def test_batched_decoding_of_users_at_different_offsets_equals_decoding_each_alone(tiny_model_f64):
    prompts = [bytes(random_bytes(1, 5, seed=1)[0].tolist()), bytes(random_bytes(1, 23, seed=2)[0].tolist())]
    config = GenerationConfig(max_new_bytes=2 * TINY.span, temperature=0.0)
    empty = FastState.empty(TINY, 2, dtype=torch.float64)
    together, state = generate_batch(tiny_model_f64, prompts, empty, config)
    for i, prompt in enumerate(prompts):
        alone, alone_state = generate_batch(tiny_model_f64, [prompt], empty.rows(slice(i, i + 1)), config)
        assert alone[0].response == together[i].response
        torch.testing.assert_close(alone_state.pm_s, state.rows(slice(i, i + 1)).pm_s)


def assert_each_alone_gives_the_same(model: ReverieLM, prompts: list[bytes], start: FastState,
                                     config: GenerationConfig, together: list, after: FastState) -> None:
    """Each user generated alone from its row of `start` gives the reply, surprise and state that
    the batch gave it (`together`, `after`)."""
    for i, prompt in enumerate(prompts):
        alone, alone_state = generate_batch(model, [prompt], start.rows(slice(i, i + 1)), config)
        assert alone[0].response == together[i].response
        assert alone[0].metrics["surprise_bits"] == pytest.approx(together[i].metrics["surprise_bits"], abs=1e-9)
        for name, tensor in alone_state.tensors().items():
            torch.testing.assert_close(tensor, after.rows(slice(i, i + 1)).tensors()[name])


def test_prompts_read_together_equal_prompts_read_alone(tiny_model_f64):
    """Prompts of any lengths, of users at any span phases, are prefilled as one right-padded
    batch (and decoded as one), and each user gets what it gets alone."""
    empty = FastState.empty(TINY, 1, dtype=torch.float64)
    states = [tiny_model_f64(random_bytes(1, n, seed=n), empty, learn=True)[1] for n in (5, 11, 16, 40)]
    state = FastState.cat([empty] + states)
    prompts = [bytes(random_bytes(1, n, seed=n)[0].tolist()) for n in (2 * TINY.span + 3, 1, 7, TINY.span, 45)]
    for learn in (True, False):
        config = GenerationConfig(max_new_bytes=TINY.span, temperature=0.0, learn=learn)
        batch_sizes: list[int] = []
        hook = tiny_model_f64.embed.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
        try:
            together, after = generate_batch(tiny_model_f64, prompts, state, config)
        finally:
            hook.remove()
        assert set(batch_sizes) == {5}  # the prompts and every decoding step: all five users at once
        assert_each_alone_gives_the_same(tiny_model_f64, prompts, state, config, together, after)


def test_a_right_padded_batch_moves_each_user_by_its_own_bytes(tiny_model_f64):
    """forward(lengths=...): logits and next state of each user equal its unpadded forward alone,
    past the working-memory window and short of it, learning or not, from used and empty states."""
    empty = FastState.empty(TINY, 1, dtype=torch.float64)
    warm = FastState.cat([tiny_model_f64(random_bytes(1, n, seed=n), empty)[1] for n in (3, 20, 50)])
    lengths = [1, TINY.window + 5, 17]
    tokens = random_bytes(3, max(lengths), seed=9)
    for learn, start in ((True, warm), (False, warm), (True, FastState.empty(TINY, 3, dtype=torch.float64))):
        logits, after = tiny_model_f64(tokens, start, learn=learn, lengths=lengths)
        for i, n in enumerate(lengths):
            alone_logits, alone = tiny_model_f64(tokens[i:i + 1, :n], start.rows(slice(i, i + 1)), learn=learn)
            torch.testing.assert_close(logits[i:i + 1, :n], alone_logits, rtol=1e-9, atol=1e-9)
            for name, tensor in alone.tensors().items():
                torch.testing.assert_close(after.rows(slice(i, i + 1)).tensors()[name], tensor, rtol=1e-9,
                                           atol=1e-9, msg=name)
    with pytest.raises(ValueError, match="lengths"):
        tiny_model_f64(tokens, start, lengths=[0, 3, 4])


# --- fast memory --------------------------------------------------------------------------------
def test_fast_memory_write_changes_later_predictions(tiny_model):
    lesson, probe = random_bytes(1, 4 * TINY.span, seed=3), random_bytes(1, 20, seed=4)
    _, taught = tiny_model(lesson, learn=True)
    assert int(taught.writes) > 0
    without_memories = taught.clone()
    without_memories.pm_s.zero_()
    without_memories.em_s.zero_()
    with_memory, _ = tiny_model(probe, taught, learn=False)
    without, _ = tiny_model(probe, without_memories, learn=False)
    assert (with_memory - without).abs().max() > 1e-4


def test_learn_off_reads_but_never_writes(tiny_model):
    _, state = tiny_model(random_bytes(1, 4 * TINY.span), learn=False)
    assert int(state.writes) == 0
    assert float(state.pm_s.sum()) == 0.0 and float(state.em_s.sum()) == 0.0


def test_reset_restores_baseline_outputs_exactly(tiny_model):
    probe = random_bytes(1, 30, seed=5)
    baseline, _ = tiny_model(probe)
    session = Session(tiny_model)
    session.reply(bytes(random_bytes(1, 3 * TINY.span, seed=6)[0].tolist()),
                  GenerationConfig(max_new_bytes=10, seed=0))
    taught, _ = tiny_model(probe, session.state)
    assert not torch.equal(taught, baseline)
    session.reset()
    after_reset, _ = tiny_model(probe, session.state)
    assert torch.equal(after_reset, baseline)


def test_snapshot_then_apply_resumes_exactly(tiny_model):
    session = Session(tiny_model)
    session.reply(b"remember: the door code is 4711. ", GenerationConfig(max_new_bytes=4, seed=0))
    snapshot = session.snapshot()
    probe = random_bytes(1, 10)
    expected, _ = tiny_model(probe, snapshot)
    session.reset()
    session.apply(snapshot)
    got, _ = tiny_model(probe, session.state)
    assert torch.equal(got, expected)


def test_make_permanent_hands_the_state_to_the_hook_and_resets(tiny_model):
    session = Session(tiny_model)
    session.reply(b"a fact worth keeping", GenerationConfig(max_new_bytes=2, seed=0))
    received = []
    session.make_permanent(lambda model, state: received.append(state))
    assert int(received[0].pos) > 0
    assert int(session.state.pos) == 0


def test_fast_state_roundtrips_through_safetensors_bit_exactly(tiny_model, tmp_path):
    _, state = tiny_model(random_bytes(2, 70))
    path = tmp_path / "state.safetensors"
    state.save(path, TINY)
    loaded = FastState.load(path, TINY)
    for name, tensor in state.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name


def test_fast_state_size_does_not_grow_with_bytes_seen(tiny_model):
    _, short = tiny_model(random_bytes(1, 10))
    state = FastState.empty(TINY, 1)
    for seed in range(5):
        _, state = tiny_model(random_bytes(1, TINY.max_seq_len, seed=seed), state)
    assert state.nbytes == short.nbytes == FastState.empty(TINY, 1).nbytes
    assert len(state.to_bytes(TINY)) == len(short.to_bytes(TINY))


def test_soft_reset_decays_memory_strengths(tiny_model):
    _, state = tiny_model(random_bytes(1, 3 * TINY.span))
    decayed = state.soft_reset(0.5)
    torch.testing.assert_close(decayed.pm_s, state.pm_s * 0.5)
    torch.testing.assert_close(decayed.em_s, state.em_s * 0.5)


# --- early exit ---------------------------------------------------------------------------------
def test_fewer_active_layers_means_fewer_active_params(tiny_model):
    tokens = random_bytes(1, 20)
    tiny_model(tokens, active_layers=1)
    shallow = tiny_model.last_metrics["active_params"]
    full_logits, _ = tiny_model(tokens, active_layers=TINY.n_layers)
    assert shallow < tiny_model.last_metrics["active_params"] == tiny_model.num_params()
    assert torch.equal(full_logits, tiny_model(tokens)[0])


# --- training -----------------------------------------------------------------------------------
def test_tiny_model_loss_falls_on_tiny_corpus():
    torch.manual_seed(0)
    corpus = Corpus.split([embedded_corpus().train[:20_000]])
    model = ReverieLM(TINY)
    result = train(model, corpus, TrainConfig(steps=40, batch_size=8, seq_len=64, progress=False, eval_batches=2))
    assert result.losses[-1] < result.losses[0] - 1.0
    assert result.heldout_bpb < 7.0


def test_an_unsynced_step_skips_a_non_finite_loss_and_needs_a_fused_optimizer():
    """`unsynced_step` applies a finite step and leaves weights and the optimizer's state as they
    were after a NaN, saying so in its check; an unfused optimizer, which cannot skip on the
    device, is refused."""
    from model.training import unsynced_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    inputs = torch.randn(3, 4)
    first = unsynced_step(layer(inputs).square().mean(), layer, optimizer, grad_clip=1.0)
    assert not bool(first.skipped) and first.verify("loss", 0, "") == float(first.loss)
    before = [p.detach().clone() for p in layer.parameters()]
    moments = [optimizer.state[p]["exp_avg"].clone() for p in layer.parameters()]
    skipped = unsynced_step(layer(inputs).sum() * float("nan"), layer, optimizer, grad_clip=1.0)
    assert bool(skipped.skipped)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before))
    assert all(torch.equal(optimizer.state[p]["exp_avg"], m) for p, m in zip(layer.parameters(), moments))
    assert all(int(optimizer.state[p]["step"]) == 1 for p in layer.parameters())
    with pytest.raises(FloatingPointError, match="loss at step 1 was nan.*lower the lr"):
        skipped.verify("loss", 1, "lower the lr")
    with pytest.raises(ValueError, match="fused=True"):
        unsynced_step(layer(inputs).sum(), layer, torch.optim.AdamW(layer.parameters()), grad_clip=1.0)


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens, message", [
    (torch.zeros(1, 0, dtype=torch.long), "length >= 1"),
    (torch.zeros(1, 4), "integer tensor"),
    (torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long), "exceed max_seq_len"),
    (torch.full((1, 3), 300), "byte values 0..255"),
    (torch.zeros(4, dtype=torch.long), "shape (batch, length)"),
])
def test_bad_input_raises_an_error_that_says_what_is_wrong(tiny_model, tokens, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_model(tokens)


def test_state_for_another_batch_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match="holds 2 users"):
        tiny_model(random_bytes(1, 4), FastState.empty(TINY, 2))


def test_fast_state_of_another_config_is_refused(tiny_model):
    other = dataclasses.replace(TINY, d_model=32, n_heads=2)
    data = FastState.empty(other, 1).to_bytes(other)
    with pytest.raises(ValueError, match="expects"):
        FastState.from_bytes(data, TINY)


def test_corrupt_fast_state_is_refused():
    with pytest.raises(ValueError, match="not a readable safetensors"):
        FastState.from_bytes(b"garbage", TINY)


def test_checkpoint_roundtrip(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors", {"step": 3})
    loaded, info = load_checkpoint(path, expect=TINY)
    assert info["step"] == 3
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # built on the meta device, the loaded model owns real, trainable parameters
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())
    logits, _ = loaded(torch.randint(0, 256, (1, 8)))
    logits.sum().backward()
    assert all(p.grad is not None for p in loaded.embed.parameters())


def test_corrupt_checkpoint_says_so(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_checkpoint_of_another_config_names_the_difference(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    other = dataclasses.replace(TINY, d_model=128)
    with pytest.raises(CheckpointError, match="d_model=64 vs 128"):
        load_checkpoint(path, expect=other)


def test_invalid_config_lists_its_problems():
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(d_model=30, n_heads=4)


def test_positions_given_by_the_caller_give_the_same_step():
    """`positions` saves reading `state.pos` from the device; given right it changes nothing, and a
    list of the wrong length is refused."""
    torch.manual_seed(0)
    lm = ReverieLM(preset("tiny")).eval()
    _, state = lm(torch.randint(0, 256, (3, 21)))
    state.pos = state.pos + torch.tensor([0, 10, 15])  # offsets 5, 15, 4 in a span of 16: one user closes
    byte = torch.tensor([1, 2, 3], dtype=torch.uint8)
    want_logits, want = lm.step(byte, state)
    got_logits, got = lm.step(byte, state, positions=state.pos.tolist())
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
    for name, tensor in want.tensors().items():
        torch.testing.assert_close(got.tensors()[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="positions must give each of the 3 users"):
        lm.step(byte, state, positions=[21, 31])


def test_learn_off_from_no_state_skips_the_empty_memories_and_changes_nothing(tiny_model):
    """A forward given no state with learn off (the sleep's student) reads no PM or EM: empty
    memories read zero. Its logits, state and gradients equal those of reading them."""
    tokens = random_bytes(2, 40, seed=8)
    results = []
    for state in (None, FastState.empty(TINY, 2)):  # what a forward given no state starts from
        tiny_model.zero_grad(set_to_none=True)
        logits, after = tiny_model(tokens, state, learn=False)
        logits.square().mean().backward()
        grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in tiny_model.named_parameters()}
        results.append((logits.detach(), after, grads))
    (skipped, skipped_state, skipped_grads), (read, read_state, read_grads) = results
    torch.testing.assert_close(skipped, read, rtol=0, atol=0)
    for name, tensor in read_state.tensors().items():
        torch.testing.assert_close(skipped_state.tensors()[name], tensor, rtol=0, atol=0, msg=name)
    for name, grad in read_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, rtol=0, atol=0, msg=name)
    tiny_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("learn", [True, False])
def test_decoding_through_decode_graph_buffers_equals_plain_decoding(tiny_model_f64, learn):
    """The serving path of model/decode_graph.py (static buffers, a batch padded to its bucket, the
    sync-free step), run eagerly as on a CPU, gives the replies, writes and states of `model.step`,
    for users at different span phases, and the padding rows never leak into a user's row."""
    from model.decode_graph import DecodeGraphConfig, DecodeGraphs

    empty = FastState.empty(TINY, 1, dtype=torch.float64)
    state = FastState.cat([tiny_model_f64(random_bytes(1, n, seed=n), empty)[1] for n in (5, 11, 16)])
    prompts = [bytes(random_bytes(1, n, seed=10 + n)[0].tolist()) for n in (3, 9, 1)]
    graphs = DecodeGraphs(tiny_model_f64, DecodeGraphConfig(max_batch=4, capture=False))
    for temperature, seed in ((0.0, None), (1.0, 7)):
        config = GenerationConfig(max_new_bytes=2 * TINY.span, temperature=temperature, learn=learn, seed=seed)
        want, want_state = generate_batch(tiny_model_f64, prompts, state, config)
        got, got_state = generate_batch(tiny_model_f64, prompts, state, config, graphs=graphs)
        assert [g.response for g in got] == [w.response for w in want]
        assert [g.metrics["memory_writes"] for g in got] == [w.metrics["memory_writes"] for w in want]
        assert got_state.batch_size == 3
        for name, tensor in want_state.tensors().items():
            torch.testing.assert_close(got_state.tensors()[name], tensor, rtol=1e-9, atol=1e-9, msg=name)
    assert list(graphs._steps) == [(4, learn, torch.float64)]  # three users share the bucket of four


def test_a_decode_step_holds_its_write_rules_and_sees_neuromodulators_loaded_in_place(tiny_model):
    """GraphedStep stacks the memories' write rules at `load`, not in the step: a neuromodulator's
    weights changed in place (a version, a delta) must reach the next batch's writes."""
    from model.decode_graph import GraphedStep

    state = tiny_model(random_bytes(2, TINY.span - 1, seed=5))[1]  # both users' spans end at the next byte
    byte = torch.tensor([3, 90])
    step = GraphedStep(tiny_model, 2, True, torch.device("cpu"), capture=False)
    neuromodulator = tiny_model.blocks[0].layers[0].procedural.neuromodulator.net[2]
    original = neuromodulator.bias.detach().clone()
    try:
        with torch.no_grad():
            for shift in (0.0, -50.0):  # -50: the write gate shuts, this memory writes nothing
                neuromodulator.bias.copy_(original + shift)
                _, want = tiny_model.step(byte, state.clone())
                step.load(state)
                step(byte)
                for name, tensor in want.tensors().items():
                    torch.testing.assert_close(step.state(2).tensors()[name], tensor, msg=f"{name}, shift {shift}")
    finally:
        with torch.no_grad():
            neuromodulator.bias.copy_(original)


def test_a_compiled_decode_step_equals_the_eager_one_across_span_ends(tiny_model):
    """`GraphedStep(compile=True)` (inductor; serving's `DecodeGraphConfig.compile`, the GPU suite's
    graph+compile items) reads and writes as the eager step does: compiled, the memories' one-query
    products run spelled out (`model.memory.slot_scores`). Both users close a span at the first byte."""
    from model.decode_graph import GraphedStep

    state = tiny_model(random_bytes(2, TINY.span - 1, seed=5))[1]
    byte = torch.tensor([3, 90])
    eager, compiled = (GraphedStep(tiny_model, 2, True, torch.device("cpu"), capture=False, compile=c)
                       for c in (False, True))
    with torch.no_grad():
        for step in (eager, compiled):
            step.load(state)
        for _ in range(3):
            torch.testing.assert_close(compiled(byte), eager(byte), rtol=1e-5, atol=1e-5)
    for name, tensor in eager.state(2).tensors().items():
        torch.testing.assert_close(compiled.state(2).tensors()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_a_decode_step_holding_its_matrices_in_bf16_equals_autocast_and_sees_weights_loaded_in_place(tiny_model):
    """GraphedStep(matrix_dtype=bf16) under autocast: the casts autocast would make at every step
    are made once a batch (`load`), so the step must give autocast's logits, also after a weight
    changed in place."""
    from model.decode_graph import GraphedStep

    state = tiny_model(random_bytes(2, 21, seed=4))[1]
    byte = torch.tensor([7, 200])
    step = GraphedStep(tiny_model, 2, True, torch.device("cpu"), capture=False, matrix_dtype=torch.bfloat16)
    assert step.matrices and all(m.dtype == torch.bfloat16 for m in step.matrices.values())
    with torch.no_grad():
        for change in (False, True):
            if change:
                next(iter(step.weights.values())).mul_(1.5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                want, _ = tiny_model.step(byte, state.clone())
                step.load(state)
                got = step(byte)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_graphs_leave_large_batches_to_plain_decoding_and_recapture_moved_parameters(tiny_model):
    from model.decode_graph import DecodeGraphConfig, DecodeGraphs

    graphs = DecodeGraphs(tiny_model, DecodeGraphConfig(max_batch=2, capture=False))
    assert [graphs.bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]
    assert graphs.step_for(FastState.empty(TINY, 3), learn=True) is None
    first = graphs.step_for(FastState.empty(TINY, 2), learn=True)
    assert graphs.step_for(FastState.empty(TINY, 2), learn=True) is first
    with torch.no_grad():  # written in place (a new version, a delta): the step still holds
        tiny_model.embed.weight.add_(1.0)
    assert graphs.step_for(FastState.empty(TINY, 2), learn=True) is first
    tiny_model.embed.weight = torch.nn.Parameter(tiny_model.embed.weight.detach().clone())  # moved
    assert graphs.step_for(FastState.empty(TINY, 2), learn=True) is not first
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(tiny_model, DecodeGraphConfig(capture=True))


def test_a_model_holding_its_matrices_in_bf16_gives_autocasts_logits_exactly():
    """The sleep's teacher on CUDA (`ReverieLM.hold_matrices`): its matrices stored in bf16 once
    give, under bf16 autocast, the logits of the float32 model whose matrices autocast casts at
    every call; the memories' own layers stay float32."""
    torch.manual_seed(0)
    lm = ReverieLM(TINY).eval()
    tokens = random_bytes(2, 3 * TINY.span + 5, seed=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        want, want_state = lm(tokens, None, learn=True)
        lm.hold_matrices(torch.bfloat16)
        got, got_state = lm(tokens, None, learn=True)
    assert all(p.dtype == torch.bfloat16 for p in lm.autocast_matrices().values())
    assert all(p.dtype == torch.float32 for n, p in lm.named_parameters() if n not in lm.autocast_matrices())
    assert torch.equal(got, want)
    for name, tensor in want_state.tensors().items():
        assert torch.equal(got_state.tensors()[name], tensor), name
