"""The memory write of `model.memory.write_slots` as one kernel that works in place: Triton on
CUDA (model/write_kernel.py), C++ on the CPU (model/write_kernel.cpp).

Why: decoding users sit at different offsets inside their spans, so some user's span ends on
most bytes, and the torch write costs ~70 small kernels per memory kind each time (on a CPU,
~0.5 ms of dispatch for the tiny model). It also rewrites every slot of every user (a
`torch.where` over all of them), which at batch 256 and the `base` sizes is most of a decoding
step's memory traffic. Here each (user, memory instance) is skipped unless that user's span
ends; otherwise the kernel reads the slot keys once and the values of the slots its read weighs
(EM: the top k), predicts the span's value, runs the neuromodulator, and stores only the
strengths row and the one slot it writes. Neither kernel has a backward: the model uses them
under no_grad, and the torch write everywhere else.

The C++ kernel is compiled on first use (torch.utils.cpp_extension, ~40 s on 2 cores, then
cached under ~/.cache/torch_extensions); where that fails (no compiler), the torch write runs.
Under TRITON_INTERPRET=1 the Triton kernel runs on CPU tensors through `triton_write_in_place`:
that is how the tests check it on machines without a GPU.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from model.kernels import kernels_available, triton_kernels
from model.memory import WRITE_THRESHOLD, Slots, Trace, WriteRule

log = logging.getLogger(__name__)

SCORES_CHUNK = 16384  # floats of slot keys a scores program reads; a memory larger than one chunk is split


def fused_write_supported(slots: Slots) -> bool:
    """Whether `write_slots_in_place` can serve this write: no autograd (the kernels have no
    backward), and float32 CUDA tensors with Triton installed, or float CPU tensors with the C++
    kernel built."""
    keys = slots.keys
    if torch.is_grad_enabled():
        return False
    if keys.is_cuda:
        return keys.dtype == torch.float32 and kernels_available("model.write_kernel")
    return keys.device.type == "cpu" and keys.dtype in (torch.float32, torch.float64) and _cpu_kernel() is not None


def write_slots_in_place(rule: WriteRule, slots: Slots, trace: Trace, span: int,
                         closes: torch.Tensor | None, sums: Trace | None = None) -> torch.Tensor:
    """`write_slots` plus the trace reset of `close_spans`, in place, for the users whose span ends.

    slots: keys/values (b, n, m, d), strengths (b, n, m); trace: (b, n, d); any strides (views such
    as state.pm_k[:, :count] are fine). rule: n stacked instances. closes: (b,) bool, or None for
    every user. sums (b, n, d): added to every user's trace first (on CUDA inside the kernel, so a
    compiled step neither adds them apart nor copies the trace back). Returns the writes made per
    user, summed over instances: (b,) int64.
    """
    if slots.keys.is_cuda:
        return triton_write_in_place(rule, slots, trace, span, closes, sums)
    if _cpu_kernel() is None:
        raise RuntimeError("the CPU memory write kernel could not be built (see the log); use model.memory.write_slots")
    if sums is not None:
        trace.keys.add_(sums.keys)
        trace.values.add_(sums.values)
    return _cpu_kernel().write_slots_in_place(*slots, *trace, closes, rule.w1, rule.b1, rule.w2, rule.b2,
                                              rule.sharpness, rule.topk, float(span), float(rule.decay),
                                              float(rule.budget), WRITE_THRESHOLD)


def triton_write_in_place(rule: WriteRule, slots: Slots, trace: Trace, span: int,
                          closes: torch.Tensor | None, sums: Trace | None = None) -> torch.Tensor:
    """`write_slots_in_place` through the Triton kernels (float32; CUDA, or the interpreter)."""
    count = slots.keys.shape[1]
    for name, tensor in (("w1", rule.w1), ("b1", rule.b1), ("w2", rule.w2), ("b2", rule.b2)):
        if not tensor.is_contiguous() or tensor.shape[0] != count:
            raise ValueError(f"rule.{name} must be contiguous with {count} instances, got shape {tuple(tensor.shape)}")
    # Compiled, a custom op: traced as one node instead of a graph break. Eagerly, the launch
    # itself: the op's dispatch costs ~85 us of host time a call (2 CPU cores), twice a step.
    write = _triton_write_op if torch.compiler.is_compiling() else _triton_write
    return write(*slots, *trace, *(sums or (None, None)), closes, rule.w1, rule.b1, rule.w2, rule.b2, rule.sharpness,
                 rule.topk, float(span), float(rule.decay), float(rule.budget))


def _triton_write(keys: torch.Tensor, values: torch.Tensor, strengths: torch.Tensor, trace_keys: torch.Tensor,
                  trace_values: torch.Tensor, sum_keys: torch.Tensor | None, sum_values: torch.Tensor | None,
                  closes: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor,
                  w2: torch.Tensor, b2: torch.Tensor, sharpness: torch.Tensor | None, topk: int, span: float,
                  decay: float, budget: float) -> torch.Tensor:
    """Both kernels' launch (model/write_kernel.py), on plain tensors: what the custom op runs."""
    kernels = triton_kernels("model.write_kernel")
    if kernels is None:
        raise RuntimeError("the fused memory write on CUDA needs Triton (pip install triton); "
                           "use model.memory.write_slots")
    batch, count, m, d = keys.shape
    writes = torch.zeros(batch, count, dtype=torch.int32, device=keys.device)
    closing = writes if closes is None else closes.to(torch.uint8)
    split = m * d > SCORES_CHUNK
    scores = torch.empty(batch, count, m, device=keys.device) if split else writes
    has_sums = sum_keys is not None
    sum_keys, sum_values = (sum_keys, sum_values) if has_sums else (trace_keys, trace_values)  # unread then
    if split:  # the keys read by many programs at once; the write's program takes the scores
        block_s = max(1, min(next_power_of_2(m), _previous_power_of_2(SCORES_CHUNK // d)))
        block_d = min(next_power_of_2(d), max(16, 16384 // block_s))
        kernels.scores_kernel[(batch, count, -(-m // block_s))](
            keys, trace_keys, sum_keys, closing, scores, *keys.stride(), *trace_keys.stride(), *sum_keys.stride(),
            m, d, HAS_CLOSES=closes is not None, HAS_SUMS=has_sums, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4)
    # A program streams its user's slots alone, so each step of its loop over d should have many
    # bytes in flight: tiles of up to 16K floats (64 KB), 32 per thread. Rows (trace, value, the
    # slot written) go in one step where they fit 4K floats; PM's values are a tile again.
    block_m = next_power_of_2(m)
    block_d = min(next_power_of_2(d), max(16, 16384 // block_m))
    block_v = min(next_power_of_2(d), 4096) if sharpness is not None else block_d
    warps = max(4, min(16, block_m * block_d // 1024))
    kernels.kernel[(batch, count)](
        keys, values, strengths, trace_keys, trace_values, sum_keys, sum_values, closing, writes, scores,
        w1, b1, w2, b2, b2 if sharpness is None else sharpness,
        *keys.stride(), *values.stride(), *strengths.stride(), *trace_keys.stride(), *trace_values.stride(),
        *sum_keys.stride(), *sum_values.stride(), m, d, span, decay, budget, WRITE_THRESHOLD,
        HAS_CLOSES=closes is not None, HAS_SUMS=has_sums, SCORES_GIVEN=split, TOPK=0 if sharpness is None else topk,
        HIDDEN=w1.shape[1], BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_V=block_v, num_warps=warps)
    return writes.sum(1, dtype=torch.int64)


# A custom op, so torch.compile keeps the write inside the compiled step: a graph break there,
# inside `ReverieLM._close_last_spans`'s loop, made dynamo run that whole function eagerly (its
# trace adds, rule stacks and write counts: ~30 more kernels a step, and copies back).
_triton_write_op = torch.library.custom_op("reverie::write_slots_in_place", _triton_write,
                                           mutates_args=("keys", "values", "strengths", "trace_keys", "trace_values"))


@_triton_write_op.register_fake
def _(keys, values, strengths, trace_keys, trace_values, sum_keys, sum_values, closes, w1, b1, w2, b2, sharpness,
      topk, span, decay, budget):
    return keys.new_empty(keys.shape[0], dtype=torch.int64)


@functools.cache
def _cpu_kernel():
    """The C++ kernel, built on first use (cached across processes), or None where it cannot be."""
    from torch.utils.cpp_extension import load

    try:
        if shutil.which("ninja") is None:  # the pip package's binary, when its venv is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return load(name="reverie_write_kernel", sources=[str(Path(__file__).with_name("write_kernel.cpp"))],
                    extra_cflags=["-O3"])
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a read-only cache: the torch write still works
        log.warning("the CPU memory write kernel could not be built, so memory writes use the slower torch "
                    "ops (install a C++ compiler and ninja to speed them up): %s", str(error)[:500])
        return None


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _previous_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)

