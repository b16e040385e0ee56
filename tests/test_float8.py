"""bench/float8_rowwise.py: within e4m3's rounding of the exact product, and a swap that changes
nothing but the GEMMs."""

from __future__ import annotations

import torch

from model.config import preset
from bench.float8_rowwise import Float8Linear, float8_linear, quantize_rows, use_float8
from model.lm import ReverieLM


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.detach().double() - exact.detach()).norm() / exact.detach().norm())


def test_float8_linear_is_within_e4m3_rounding_of_the_exact_product_forward_and_backward():
    """e4m3 keeps 3 mantissa bits (~3% per element, which a sum of products keeps); the weight
    gradient is a bf16 GEMM (~0.4%)."""
    torch.manual_seed(0)
    x = torch.randn(96, 64, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(128, 64, dtype=torch.float64) / 8).requires_grad_()
    grad = torch.randn(96, 128, dtype=torch.float64)
    (x @ weight.t()).backward(grad)
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    out = float8_linear(x32, w32)
    out.backward(grad.float())
    assert out.dtype == torch.float32 and x32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32
    assert relative_error(out, x.detach() @ weight.detach().t()) < 0.06
    assert relative_error(x32.grad, x.grad) < 0.06
    assert relative_error(w32.grad, weight.grad) < 0.01


def test_float8_linear_returns_autocasts_dtype_inside_autocast():
    x, weight = torch.randn(2, 5, 32), torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float8_linear(x, weight).shape == (2, 5, 16)
        assert float8_linear(x, weight).dtype == torch.bfloat16


def test_an_all_zero_row_quantizes_to_zeros_and_the_others_keep_their_largest_value():
    rows = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1e-3, -2e-3, 0.5e-3, 0.0], [300.0, 1.0, -600.0, 2.0]])
    quantized, scale = quantize_rows(rows)
    back = quantized.float() * scale
    assert torch.equal(back[0], torch.zeros(4))
    assert torch.isfinite(back).all()
    assert torch.allclose(back.abs().amax(dim=1)[1:], rows.abs().amax(dim=1)[1:], rtol=1e-6)


def test_use_float8_converts_the_mixers_feed_forwards_and_working_memory_and_keeps_the_weights():
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    parameters = dict(model.named_parameters())
    tokens = torch.randint(0, 256, (2, 24))
    before, _ = model(tokens, None, learn=False)
    converted = use_float8(model)
    assert converted == use_float8(model), "a second call must change nothing"
    assert sorted(converted) == sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    kinds = {name.rsplit(".", 1)[-1] for name in converted}
    assert kinds == {"in_proj", "out_proj", "up", "down", "qkv", "out"}
    assert not any(".episodic." in name or ".procedural." in name for name in converted), "memories stay float32"
    assert all(p is parameters[name] for name, p in model.named_parameters()), "same parameters, same names"
    after, _ = model(tokens, None, learn=False)
    assert relative_error(after, before.double()) < 0.05
