"""A night's optimizer step as one CUDA graph: the host copies a step's bytes in and replays it.

An eager sleep step launches ~1,800 kernels (`base`); at a user's night (8 rows x 64 bytes) the GPU
finishes them far faster than the host issues them, so the step's time was the host's (75 ms on
the H200, session 13). A graph replays them all from one launch. What a capture needs: no host
syncs in the step (`model.consolidation.train_on`, `model.training.unsynced_step`), the same
shapes every step, a capturable optimizer whose learning rate is a tensor, and eager warm-up steps
on a side stream first (torch.cuda.graph's documentation), so that lazily made state (the
optimizer's moments, cuBLAS workspaces, compiled kernels) exists before the capture.

The graphed steps keep attention off cuDNN's kernels: on the H200 (torch 2.11), at 8 rows x 64
bytes a night captured with cuDNN's attention failed its capture once and gave a NaN gradient
from its fourth replay once, where the same night eager was finite; with cuDNN's attention
excluded (or without the teacher, whose attention reads its state's window) graphed and eager
nights ended with the same weights (session 14, bench/NOTES.md). torch's cuDNN attention has a
known NaN in its masked backward at lengths of 64 modulo 128 (pytorch/pytorch#196678).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.training import StepCheck

# Eager steps before the capture: the first makes the optimizer's state and compiles, the rest
# settle the allocator.
WARMUP_STEPS = 3
# Every attention backend but cuDNN's (see above).
ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

TrainOn = Callable[[Tensor], tuple[dict[str, Tensor], StepCheck]]


def on_device(rows: Tensor, device: torch.device | str) -> Tensor:
    """rows on `device` without waiting: a copy from pageable host memory waits for the GPU's queue."""
    if torch.device(device).type != "cuda":
        return rows.to(device)
    return rows.pin_memory().to(device, non_blocking=True)


class GraphedSleepStep:
    """Runs a night's steps: the first WARMUP_STEPS eagerly on a side stream, then `train_on`
    captured once over a static chunk of bytes, each later step a copy into it and a replay, all
    with the attention backends of ATTENTION. The graph's outputs (loss terms, check) are
    overwritten by the next replay, so a call returns copies.

    train_on: one whole optimizer step over a (rows, T + 1) uint8 tensor on the device, without
    host syncs, the same function every call. optimizer: its optimizer (capturable=True), whose
    gradients the capture allocates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
        self.optimizer, self.device = optimizer, torch.device(device)
        self.side = torch.cuda.Stream(self.device)
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, train_on: TrainOn, rows: Tensor) -> tuple[dict[str, Tensor], StepCheck]:
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side), sdpa_kernel(ATTENTION):
                out = train_on(on_device(rows, self.device))
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            return out
        if self.graph is None:
            self._capture(train_on, rows.shape)
        if rows.shape != self.chunk.shape:
            raise ValueError(f"a graphed sleep step reads rows of shape {tuple(self.chunk.shape)}, "
                             f"got {tuple(rows.shape)}")
        self.chunk.copy_(rows.pin_memory(), non_blocking=True)
        self.graph.replay()
        parts = {name: value.clone() for name, value in self.parts.items()}
        check = StepCheck(self.check.skipped.clone(), self.check.loss.clone(), self.check.grad_norm.clone())
        return parts, check

    def _capture(self, train_on: TrainOn, shape: torch.Size) -> None:
        self.chunk = torch.zeros(shape, dtype=torch.uint8, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates the gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), sdpa_kernel(ATTENTION):
            self.parts, self.check = train_on(self.chunk)
