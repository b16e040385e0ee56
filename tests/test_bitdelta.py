"""BitDelta specifications, on a small byte-level LM fine-tuned for a few steps."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.bitdelta import (
    AppliedDelta,
    BitDelta,
    BitDeltaConfig,
    apply_delta,
    applied,
    build_bitdelta,
    compress,
    distill_scales,
    distillation_loss,
    pack_signs,
    remove_delta,
    select_matrices,
    unpack_signs,
)

BASE_VERSION = "toy-base-1"
TEXT = b"the quick brown fox jumps over the lazy dog. " * 4 + b"pack my box with five dozen liquor jugs! " * 4


class ToyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (b, t, d)
        return h + self.proj(F.gelu(self.fc(h)))


class ToyLM(nn.Module):
    """Byte-level residual MLP LM; forward returns (logits, state) like a recurrent LM."""

    def __init__(self, d: int = 32, n_layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(n_layers))
        self.head = nn.Linear(d, 256)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # x: (b, t) -> (b, t, 256)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h), None


Pair = tuple[ToyLM, ToyLM]  # (base, fine-tuned)


def byte_batches(n: int, batch: int = 4, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    data = torch.tensor(list(TEXT), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (n, batch), generator=g)
    return [torch.stack([data[s : s + length + 1] for s in row.tolist()]) for row in starts]


@pytest.fixture(scope="module")
def models() -> tuple[ToyLM, ToyLM]:
    torch.manual_seed(0)
    base = ToyLM()
    tuned = copy.deepcopy(base)
    opt = torch.optim.Adam(tuned.parameters(), lr=3e-3)
    for batch in byte_batches(30, seed=1):
        logits, _ = tuned(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, tuned


@pytest.fixture(scope="module")
def calibration() -> list[torch.Tensor]:
    return [b[:, :-1] for b in byte_batches(2, seed=2)]


@pytest.fixture()
def delta(models: Pair) -> BitDelta:
    base, tuned = models
    names = select_matrices(base, BitDeltaConfig())
    return compress(base.state_dict(), tuned.state_dict(), names, BASE_VERSION)


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- packing ----------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 13), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trips_signs_exactly(shape: tuple[int, ...], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.1] = 0.0
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(x.numel() / 8),)
    expected = torch.where(x >= 0, 1.0, -1.0).reshape(-1)
    assert torch.equal(unpack_signs(packed, x.numel()), expected)


def test_sign_of_zero_unpacks_as_plus_one() -> None:
    x = torch.tensor([0.0, -0.0, -1.0, 2.0])
    assert unpack_signs(pack_signs(x), 4).tolist() == [1.0, 1.0, -1.0, 1.0]


def test_packing_matches_numpy_packbits() -> None:
    x = torch.randn(5, 7)
    assert pack_signs(x).numpy().tolist() == np.packbits(x.numpy().reshape(-1) >= 0).tolist()


def test_unpack_rejects_wrong_packed_length() -> None:
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_signs(torch.zeros(3, dtype=torch.uint8), 9)


# --- compression --------------------------------------------------------------------------------


def test_payload_is_at_least_15_5x_smaller_than_fp16_delta(delta: BitDelta) -> None:
    assert delta.dense_fp16_nbytes / delta.nbytes >= 15.5
    one_matrix = compress({"w": torch.zeros(32, 32)}, {"w": torch.randn(32, 32)}, ["w"], BASE_VERSION)
    assert one_matrix.dense_fp16_nbytes / one_matrix.nbytes >= 15.5


def test_initial_scale_is_mean_abs_delta(models: Pair, delta: BitDelta) -> None:
    base, tuned = models
    for name in delta.names:
        diff = tuned.get_parameter(name).detach() - base.get_parameter(name).detach()
        assert delta.scales[name].dtype == torch.float32
        torch.testing.assert_close(delta.scales[name], diff.abs().mean())


def test_initial_scale_is_l2_optimal_for_the_signs(models: Pair, delta: BitDelta) -> None:
    base, tuned = models
    name = "blocks.0.fc.weight"
    diff = (tuned.get_parameter(name) - base.get_parameter(name)).detach().double()
    signs = unpack_signs(delta.signs[name], diff.numel(), torch.float64).view(diff.shape)
    scale = delta.scales[name].double()

    def error(s: torch.Tensor) -> float:
        return (diff - s * signs).norm().item()

    for factor in (0.9, 0.99, 1.01, 1.1):
        assert error(scale * factor) > error(scale)


def test_decompress_is_scale_times_sign_of_delta(models: Pair, delta: BitDelta) -> None:
    base, tuned = models
    for name, dense in delta.decompress().items():
        diff = tuned.get_parameter(name).detach() - base.get_parameter(name).detach()
        assert dense.shape == diff.shape
        assert torch.equal(dense, delta.scales[name] * torch.where(diff >= 0, 1.0, -1.0))


def test_compress_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="'w' has shape"):
        compress({"w": torch.zeros(4, 4)}, {"w": torch.zeros(4, 5)}, ["w"], BASE_VERSION)


# --- selection ----------------------------------------------------------------------------------


def test_linear_selection_takes_every_linear_weight(models: Pair) -> None:
    names = select_matrices(models[0], BitDeltaConfig(select="linear"))
    assert names == [f"blocks.{i}.{m}.weight" for i in range(4) for m in ("fc", "proj")] + ["head.weight"]


def test_last_k_selection_gives_a_small_payload(models: Pair) -> None:
    base, tuned = models
    names = select_matrices(base, BitDeltaConfig(last_k=1))
    assert names == ["blocks.3.fc.weight", "blocks.3.proj.weight"]
    small = compress(base.state_dict(), tuned.state_dict(), names, BASE_VERSION)
    model_fp16_bytes = 2 * sum(p.numel() for p in base.parameters())
    assert small.nbytes < 0.01 * model_fp16_bytes


def test_include_and_last_k_both_narrow_the_selection(models: Pair) -> None:
    names = select_matrices(models[0], BitDeltaConfig(last_k=2, include=("proj",)))
    assert names == ["blocks.2.proj.weight", "blocks.3.proj.weight"]


def test_tied_weights_are_selected_once() -> None:
    model = ToyLM(d=8, n_layers=1)
    model.head.weight = model.embed.weight
    names = select_matrices(model, BitDeltaConfig(select="2d"))
    assert names.count("embed.weight") == 1 and "head.weight" not in names


def test_selection_that_matches_nothing_is_an_error(models: Pair) -> None:
    with pytest.raises(ValueError, match="selects no matrix"):
        select_matrices(models[0], BitDeltaConfig(include=("attention",)))


# --- apply / remove -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_then_remove_restores_base_weights_bit_exactly(
    models: Pair, delta: BitDelta, dtype: torch.dtype
) -> None:
    model = copy.deepcopy(models[0]).to(dtype)
    before = clone_state(model)
    dense = delta.dense("head.weight", dtype)
    w = before["head.weight"]
    assert not torch.equal((w + dense) - dense, w)  # so subtracting the delta again would not do
    handle = apply_delta(model, delta)
    remove_delta(model, handle)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_applied_weights_are_base_plus_decompressed_delta(models: Pair, delta: BitDelta) -> None:
    model = copy.deepcopy(models[0])
    dense = delta.decompress()
    with applied(model, delta):
        for name in delta.names:
            assert torch.equal(model.get_parameter(name), models[0].get_parameter(name) + dense[name])


def test_applied_context_restores_base_after_an_exception(models: Pair, delta: BitDelta) -> None:
    model = copy.deepcopy(models[0])
    before = clone_state(model)
    with pytest.raises(RuntimeError, match="boom"), applied(model, delta):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_remove_takes_the_handle_not_the_delta(models: Pair, delta: BitDelta) -> None:
    model = copy.deepcopy(models[0])
    handle = apply_delta(model, delta)
    assert isinstance(handle, AppliedDelta)
    with pytest.raises(TypeError, match="AppliedDelta"):
        remove_delta(model, delta)  # type: ignore[arg-type]
    remove_delta(model, handle)
    with pytest.raises(ValueError, match="already removed"):
        remove_delta(model, handle)


def test_apply_refuses_a_delta_for_another_base_and_leaves_weights_alone(
    models: Pair, delta: BitDelta
) -> None:
    model = copy.deepcopy(models[0])
    before = clone_state(model)
    with pytest.raises(ValueError, match="toy-base-1"):
        apply_delta(model, delta, base_version="toy-base-2")
    small = ToyLM(d=16)
    with pytest.raises(ValueError, match="'blocks.0.fc.weight' has shape"):
        apply_delta(small, delta)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- scale distillation -------------------------------------------------------------------------


def test_distillation_lowers_its_loss(models: Pair, delta: BitDelta, calibration: list[torch.Tensor]) -> None:
    base, tuned = models
    config = BitDeltaConfig(distill_steps=60, distill_lr=2e-2)
    _, losses = distill_scales(base, delta, tuned, calibration, config)
    assert len(losses) == 60
    assert sum(losses[-2:]) < sum(losses[:2])


def test_distilled_delta_matches_the_finetune_better_than_mean_abs(
    models: Pair, delta: BitDelta, calibration: list[torch.Tensor]
) -> None:
    base, tuned = models
    config = BitDeltaConfig(distill_steps=60, distill_lr=2e-2)
    distilled, _ = distill_scales(base, delta, tuned, calibration, config)
    assert torch.equal(distilled.signs["head.weight"], delta.signs["head.weight"])
    before = distillation_loss(base, delta, tuned, calibration)
    assert distillation_loss(base, distilled, tuned, calibration) < before


def test_distillation_leaves_the_base_model_untouched(
    models: Pair, delta: BitDelta, calibration: list[torch.Tensor]
) -> None:
    base, tuned = models
    model = copy.deepcopy(base).train()
    before = clone_state(model)
    distill_scales(model, delta, tuned, calibration, BitDeltaConfig(distill_steps=3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_distillation_accepts_a_teacher_function_and_a_forward_fn(
    models: Pair, delta: BitDelta, calibration: list[torch.Tensor]
) -> None:
    base, tuned = models
    teacher = {id(x): tuned(x)[0].detach() for x in calibration}
    inputs = [{"bytes": x} for x in calibration]
    _, losses = distill_scales(
        base, delta, lambda batch: teacher[id(batch["bytes"])], inputs,
        BitDeltaConfig(distill_steps=2), forward_fn=lambda model, batch: model(batch["bytes"])[0],
    )
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_build_bitdelta_runs_select_compress_distill(models: Pair, calibration: list[torch.Tensor]) -> None:
    base, tuned = models
    config = BitDeltaConfig(last_k=1, distill_steps=2)
    made, losses = build_bitdelta(base, tuned, calibration, BASE_VERSION, config)
    assert made.names == ["blocks.3.fc.weight", "blocks.3.proj.weight"] and len(losses) == 2


# --- storage ------------------------------------------------------------------------------------


def test_safetensors_round_trip_is_exact(delta: BitDelta, tmp_path: Path) -> None:
    path = tmp_path / "delta.safetensors"
    save_file(delta.to_tensors(), path, metadata=delta.metadata())
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    loaded = BitDelta.from_tensors(load_file(path), meta)
    assert loaded.base_version == BASE_VERSION and loaded.shapes == delta.shapes
    for name in delta.names:
        assert torch.equal(loaded.signs[name], delta.signs[name])
        assert torch.equal(loaded.scales[name], delta.scales[name])


def corrupt(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**tensors, key: value}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("head.weight.signs", lambda t: t.to(torch.int16), "signs of 'head.weight' must be uint8"),
        ("head.weight.signs", lambda t: t[:-1], "signs of 'head.weight' must be 1-D with 1024 bytes"),
        ("head.weight.scale", lambda t: torch.tensor(float("nan")), "scale of 'head.weight' is not finite"),
        ("head.weight.scale", lambda t: torch.tensor(float("inf")), "scale of 'head.weight' is not finite"),
        ("head.weight.scale", lambda t: -t, "scale of 'head.weight' is negative"),
        ("head.weight.scale", lambda t: t.double(), "scale of 'head.weight' must be float32"),
        ("head.weight.scale", lambda t: torch.tensor(5.0), "above max_scale"),
    ],
)
def test_from_tensors_rejects_malformed_entries(delta: BitDelta, key: str, value, message: str) -> None:
    tensors = delta.to_tensors()
    with pytest.raises(ValueError, match=message):
        BitDelta.from_tensors(corrupt(tensors, key, value(tensors[key])), delta.metadata())


def test_from_tensors_rejects_missing_and_unexpected_tensors(delta: BitDelta) -> None:
    tensors = delta.to_tensors()
    del tensors["head.weight.scale"]
    with pytest.raises(ValueError, match="'head.weight' has no scale"):
        BitDelta.from_tensors(tensors, delta.metadata())
    with pytest.raises(ValueError, match="'embed.weight.signs' is not"):
        BitDelta.from_tensors({**delta.to_tensors(), "embed.weight.signs": torch.zeros(1, dtype=torch.uint8)},
                              delta.metadata())
    with pytest.raises(ValueError, match="format"):
        BitDelta.from_tensors(delta.to_tensors(), {**delta.metadata(), "format": "other"})
