"""The memory write of `model.memory.write_slots` as one Triton kernel that works in place.

Why: decoding users sit at different offsets inside their spans, so some user's span ends on
most bytes, and the torch write costs ~70 small kernels per memory kind each time. It also
rewrites every slot of every user (a `torch.where` over all of them), which at batch 256 and
the `base` sizes is most of a decoding step's memory traffic. Here one program per (user,
memory instance) returns at once unless that user's span ends, and otherwise reads the slot keys
once and the values of the slots its read weighs (EM: the top k), predicts the span's value,
runs the neuromodulator, and stores only the strengths row and the one slot it writes. It has
no backward: the model uses it under no_grad.

On CUDA it is compiled by Triton. Under TRITON_INTERPRET=1 Triton's interpreter runs it on CPU
tensors: that is how the tests check it against `write_slots` on machines without a GPU.
Without Triton it is not used.
"""

from __future__ import annotations

import functools

import torch

from model.memory import WRITE_THRESHOLD, Slots, Trace, WriteRule


def fused_write_supported(slots: Slots) -> bool:
    """Whether `write_slots_in_place` can serve this write: float32 CUDA tensors, no autograd (the
    kernel has no backward), and Triton installed."""
    keys = slots.keys
    return keys.is_cuda and keys.dtype == torch.float32 and not torch.is_grad_enabled() and _kernel() is not None


@functools.cache
def _kernel():
    """The Triton kernel, imported on first use: Triton is optional, and slow to import."""
    try:
        from model.write_kernel import kernel
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return kernel


def write_slots_in_place(rule: WriteRule, slots: Slots, trace: Trace, span: int,
                         closes: torch.Tensor | None) -> torch.Tensor:
    """`write_slots` plus the trace reset of `close_spans`, in place, for the users whose span ends.

    slots: keys/values (b, n, m, d), strengths (b, n, m); trace: (b, n, d); float32, any strides
    (views such as state.pm_k[:, :count] are fine). rule: n stacked instances. closes: (b,) bool,
    or None for every user. Returns the writes made per user, summed over instances: (b,) int64.
    """
    if _kernel() is None:
        raise RuntimeError("the fused memory write needs Triton (pip install triton); use model.memory.write_slots")
    batch, count, m, d = slots.keys.shape
    hidden = rule.w1.shape[1]
    for name, tensor in (("w1", rule.w1), ("b1", rule.b1), ("w2", rule.w2), ("b2", rule.b2)):
        if not tensor.is_contiguous() or tensor.shape[0] != count:
            raise ValueError(f"rule.{name} must be contiguous with {count} instances, got shape {tuple(tensor.shape)}")
    writes = torch.zeros(batch, count, dtype=torch.int32, device=slots.keys.device)
    # A program streams its user's slots alone, so each step of its loop over d should have many
    # bytes in flight: tiles of up to 16K floats (64 KB), 32 per thread.
    block_m = _next_power_of_2(m)
    block_d = min(_next_power_of_2(d), max(16, 16384 // block_m))
    warps = max(4, min(16, block_m * block_d // 1024))
    _kernel()[(batch, count)](
        slots.keys, slots.values, slots.strengths, trace.keys, trace.values,
        writes if closes is None else closes.view(torch.uint8), writes,
        rule.w1, rule.b1, rule.w2, rule.b2, rule.b2 if rule.sharpness is None else rule.sharpness,
        *slots.keys.stride(), *slots.values.stride(), *slots.strengths.stride(),
        *trace.keys.stride(), *trace.values.stride(),
        m, d, float(span), float(rule.decay), float(rule.budget), WRITE_THRESHOLD,
        HAS_CLOSES=closes is not None, TOPK=0 if rule.sharpness is None else rule.topk,
        HIDDEN=hidden, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return writes.sum(1)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()
