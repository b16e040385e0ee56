"""The Triton scans (model/scan_kernel.py) against their references, in Triton's interpreter.

Tiles of 8 steps x 4 channels, so that small tensors cover several chunks, a last chunk cut short
by T and a channel block cut short by d; the gated kernels also in several segments of time.
"""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.layers import AffineScan
from model.scan import affine_scan_reference, gated_scan, gated_scan_reference, triton_scan

pytest.importorskip("triton")

BLOCKS = {"block_t": 8, "block_d": 4}
GATED_BLOCKS = {**BLOCKS, "segments": 1}
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


def gated_inputs(batch: int, length: int, d: int, seed: int) -> list[torch.Tensor]:
    """proj (batch, T, 3d) with gate pre-activations around +2 (retention near 0.9), bias (d,), h0
    (batch, d), and the gradients of out and h_last: float64."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, length, 3 * d, generator=g, dtype=torch.float64)
    proj[..., :d] += 2.0
    return [proj, 0.5 * torch.randn(d, generator=g, dtype=torch.float64),
            torch.randn(batch, d, generator=g, dtype=torch.float64),
            torch.randn(batch, length, d, generator=g, dtype=torch.float64),
            torch.randn(batch, d, generator=g, dtype=torch.float64)]


def with_grads(scan, inputs: list[torch.Tensor], sign: int, d_out: torch.Tensor, d_last: torch.Tensor, **blocks):
    """out, h_last and the gradients of proj, bias and h0 for the loss <out, d_out> + <h_last, d_last>."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, h_last = scan(*inputs, sign, **blocks)
    grads = torch.autograd.grad((out * d_out).sum() + (h_last * d_last).sum(), inputs)
    return [out.detach(), h_last.detach(), *grads]


@pytest.mark.parametrize("sign, segments", [(1, 1), (-1, 1), (1, 3), (-1, 2)])
@pytest.mark.parametrize("batch, length, d", SHAPES)
def test_the_gated_scan_and_its_gradients_equal_the_reference(batch, length, d, sign, segments):
    """Forward and every gradient (proj's three parts, the gate bias, the carry in, through both
    outputs) against autograd of the torch composition in float64; chunks of 8 steps, so T=37 has
    5 chunks, cut into 3 segments of 2, 2 and 1 (the summaries of earlier segments carried forwards,
    of later ones backwards), or 2 of 3 and 2."""
    proj, bias, h0, d_out, d_last = gated_inputs(batch, length, d, seed=length + d)
    want = with_grads(gated_scan_reference, [proj, bias, h0], sign, d_out, d_last)
    got = with_grads(gated_scan, [proj.float(), bias.float(), h0.float()], sign, d_out.float(), d_last.float(),
                     **{**BLOCKS, "segments": segments})
    for name, g, w in zip(("out", "h_last", "d_proj", "d_bias", "d_h0"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)


def test_a_bfloat16_strided_projection_gives_the_float32_result_to_bfloat16_precision():
    """As autocast gives it: proj in bfloat16, a view of a wider tensor; out and d_proj come back in
    bfloat16, the carry and the bias' gradient in float32."""
    proj, bias, h0, d_out, d_last = gated_inputs(2, 21, 6, seed=5)
    wide = torch.cat([proj, proj[..., :6]], dim=-1).bfloat16()[..., :18]
    assert not wide.is_contiguous()
    got = with_grads(gated_scan, [wide, bias.float(), h0.float()], 1, d_out.bfloat16(), d_last.float(), **GATED_BLOCKS)
    want = with_grads(gated_scan, [wide.float(), bias.float(), h0.float()], 1, d_out.float(), d_last.float(),
                      **GATED_BLOCKS)
    assert got[0].dtype == got[2].dtype == torch.bfloat16 and got[1].dtype == got[3].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gate", ["sigmoid", "exp"])
def test_the_gated_reference_is_what_the_mixer_computes(gate):
    """`gated_scan_reference` + the output projection equals AffineScan's torch path (which CPU and
    float64 runs take), so the kernel checked against it computes the model's mixer."""
    import dataclasses

    torch.manual_seed(0)
    mixer = AffineScan(dataclasses.replace(preset("tiny"), gate=gate)).double()
    u, carry = torch.randn(2, 11, 64, dtype=torch.float64), torch.randn(2, 64, dtype=torch.float64)
    y, h_last = mixer(u, carry)
    out, want_last = gated_scan_reference(mixer.in_proj(u), mixer.gate_bias, carry, 1 if gate == "sigmoid" else -1)
    torch.testing.assert_close(y, mixer.out_proj(out))
    torch.testing.assert_close(h_last, want_last)
