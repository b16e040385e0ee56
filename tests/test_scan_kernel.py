"""The Triton scan (model/scan_kernel.py) against the sequential reference, in Triton's interpreter.

Tiles of 8 steps x 4 channels, so that small tensors cover several chunks, a last chunk cut short
by T and a channel block cut short by d.
"""

from __future__ import annotations

import pytest
import torch

from model.scan import affine_scan_reference, triton_scan

pytest.importorskip("triton")

BLOCKS = {"block_t": 8, "block_d": 4}
SHAPES = [(2, 37, 10), (2, 16, 8), (1, 1, 3), (3, 9, 5)]  # (batch, T, d)


def random_maps(batch: int, length: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates a in (0.5, 1) (a long memory, as the model's retention) and inputs b: (batch, T, d) float32."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand(batch, length, d, generator=g), torch.randn(batch, length, d, generator=g)


def reference_with_grads(a: torch.Tensor, b: torch.Tensor, dh: torch.Tensor):
    """h, d_a, d_b in float64 through autograd of the per-step loop, from a zero state."""
    a, b = (t.double().requires_grad_() for t in (a, b))
    h = affine_scan_reference(a, b, torch.zeros(a.shape[0], a.shape[2], dtype=torch.float64))
    return (h.detach(), *torch.autograd.grad(h, (a, b), dh.double()))


def triton_with_grads(a: torch.Tensor, b: torch.Tensor, dh: torch.Tensor):
    a, b = (t.detach().requires_grad_() for t in (a, b))
    h = triton_scan(a, b, **BLOCKS)
    return (h.detach(), *torch.autograd.grad(h, (a, b), dh))


@pytest.mark.parametrize("batch, length, d", SHAPES)
def test_the_triton_scan_and_its_gradients_equal_the_reference(batch, length, d):
    a, b = random_maps(batch, length, d, seed=length)
    dh = torch.randn(batch, length, d, generator=torch.Generator().manual_seed(1))
    h, da, db = triton_with_grads(a, b, dh)
    assert h.is_contiguous() and h.dtype == torch.float32
    for got, want in zip((h, da, db), reference_with_grads(a, b, dh), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_output_gradient_give_what_contiguous_ones_give():
    """As the model passes them: a and b views of one projection, the gradient of h transposed."""
    batch, length, d = 2, 21, 6
    a, b = torch.cat(random_maps(batch, length, d, seed=3), dim=-1).split(d, dim=-1)
    dh = torch.randn(length, batch, d, generator=torch.Generator().manual_seed(4)).transpose(0, 1)
    assert not (a.is_contiguous() or b.is_contiguous() or dh.is_contiguous())
    for got, want in zip(triton_with_grads(a, b, dh), triton_with_grads(a.contiguous(), b.contiguous(),
                                                                         dh.contiguous()), strict=True):
        assert torch.equal(got, want)
