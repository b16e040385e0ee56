"""Training the slow weights on a byte corpus: AdamW, cosine schedule, AMP on GPU, optional compile."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.corpus import Corpus, as_tensor, random_batch, sequential_batches
from model.lm import ReverieLM, bits_per_byte
from model.memory import compiled_writes


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    device: str = "auto"  # "auto" = cuda when available
    amp: bool = True  # bf16 autocast on GPU; memory math stays float32 inside the model
    compile: bool = False
    # torch.compile the memory writes' forward and backward (model.memory.compiled_writes). None: on
    # CUDA only (base on the H100: eager steps 1.7-1.9x faster, graphed 1.37x); on a CPU the compile
    # time outweighs what short runs gain.
    compile_writes: bool | None = None
    eval_batches: int = 8
    seed: int = 0
    progress: bool = True
    # Early-exit auxiliary loss: each step also trains one random exit depth 1..n_layers-1 through
    # the shared head, with this weight (0 = off). Lets adaptive compute stop early at little cost.
    early_exit_weight: float = 0.0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class TrainResult:
    steps: int
    final_loss_bpb: float
    heldout_bpb: float
    bytes_per_s: float
    seconds: float
    losses: list[float] = field(default_factory=list)


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: ReverieLM, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not norms, biases, gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """bf16 autocast on CUDA. cache=False: no cast of a weight is kept for reuse. Inside an
    enclosing autocast context the cache lives until that context ends, so a loop of optimizer
    steps run inside one would read the casts of the first step's weights."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda",
                          cache_enabled=cache)


def clipped_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 what: str, step: int, advice: str) -> None:
    """Backward and one optimizer step with gradients clipped to `grad_clip`, after checking the
    loss is finite: a NaN would otherwise be written into every weight. The error names `what`
    the loss is, the step, and `advice`."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what} became {loss.item()} at step {step}; {advice}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


@dataclass(frozen=True)
class StepCheck:
    """Whether a step of `unsynced_step` was applied, still on the device."""

    skipped: torch.Tensor  # 0-dim bool
    loss: torch.Tensor
    grad_norm: torch.Tensor

    def read_later(self) -> PendingCheck:
        """Start copying the check to the host behind the step's kernels, without waiting.

        Reading a CUDA tensor directly (`bool`, `float`) waits for every kernel queued on its
        stream, those of the steps queued after this one too: a night that read step k-1's check
        after queuing step k waited for step k, so the GPU sat idle while the host made step k+1's
        rows. That idle time was small at `base` on an H200 (bench/NOTES.md, session 20), but the
        steps' ends the host saw bunched up (0.05 ms to 86 ms apart), so no step could be timed.
        """
        values = torch.stack([self.skipped.float(), self.loss.float(), self.grad_norm.float()])
        if not values.is_cuda:
            return PendingCheck(values, None)
        host = torch.empty(values.shape, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return PendingCheck(host, copied)

    def verify(self, what: str, step: int, advice: str) -> float:
        """The step's loss, once the step has run; see `PendingCheck.verify`."""
        return self.read_later().verify(what, step, advice)


@dataclass(frozen=True)
class PendingCheck:
    """A StepCheck's values (skipped, loss, gradient norm) on their way to the host."""

    values: torch.Tensor  # on the host; pinned while a copy fills it
    copied: torch.cuda.Event | None  # None: already there

    def verify(self, what: str, step: int, advice: str) -> float:
        """The step's loss, waiting for the copy only; FloatingPointError naming `what`, the step and
        `advice` if the step was skipped."""
        if self.copied is not None:
            self.copied.synchronize()
        skipped, loss, grad_norm = self.values.tolist()
        if skipped:
            raise FloatingPointError(f"{what} at step {step} was {loss} with gradient norm {grad_norm}; the step "
                                     f"was skipped, so no weight holds a NaN; {advice}")
        return loss


def unsynced_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                  before_clip: Callable[[], None] | None = None) -> StepCheck:
    """clipped_step without waiting for the GPU: where the loss or the gradients' norm is not finite,
    the optimizer skips the update on the device, and the caller reads the returned check later
    (`consolidate`: one step behind, so the host queues a step while the GPU runs the one before).
    clipped_step's `isfinite(loss)` made the host wait for each step's forward before it could go on.

    The skip is the flag GradScaler hands fused optimizers (`found_inf`), which only fused
    optimizers take: `optimizer` must be built with fused=True.
    """
    if not all(group.get("fused") for group in optimizer.param_groups):
        raise ValueError(f"unsynced_step needs a fused optimizer ({type(optimizer).__name__}(..., fused=True)): "
                         f"only those skip a non-finite step on the device")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if before_clip is not None:
        before_clip()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    skipped = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
    optimizer.found_inf = skipped.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return StepCheck(skipped, loss.detach(), grad_norm)


@torch.no_grad()
def evaluate_bpb(model: ReverieLM, data: bytes, seq_len: int, batch_size: int = 8,
                 max_batches: int | None = 8, amp: bool = True) -> float:
    """Held-out bits per byte, each sequence starting from an empty fast state."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in sequential_batches(as_tensor(data), batch_size, seq_len, max_batches):
        with autocast(device, amp):
            logits, _ = model(inputs.to(device))
        total += float(bits_per_byte(logits, targets.to(device))) * targets.numel()
        count += targets.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"held-out data ({len(data)} bytes) is shorter than one sequence of {seq_len + 1}")
    return total / count


def train(model: ReverieLM, corpus: Corpus, config: TrainConfig) -> TrainResult:
    """Train `model` in place on corpus.train; report held-out bits per byte at the end."""
    device = config.resolved_device()
    model.to(device).train()
    generator = torch.Generator().manual_seed(config.seed)
    data = as_tensor(corpus.train)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model) if config.compile else model
    with compiled_writes(device.type == "cuda" if config.compile_writes is None else config.compile_writes):
        losses: list[float] = []
        started = time.perf_counter()
        bar = tqdm(range(config.steps), desc="train", unit="step", disable=not config.progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            inputs, targets = random_batch(data, config.batch_size, config.seq_len, generator)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, config.amp):
                logits, _ = forward(inputs)
                loss = bits_per_byte(logits, targets)
                if config.early_exit_weight and model.config.n_layers > 1:
                    depth = int(torch.randint(1, model.config.n_layers, (1,), generator=generator))
                    exit_logits, _ = forward(inputs, active_layers=depth)
                    loss = loss + config.early_exit_weight * bits_per_byte(exit_logits, targets)
            clipped_step(loss, model, optimizer, config.grad_clip, "loss", step, "lower --lr or disable --compile")
            if step % 10 == 0 or step == config.steps - 1:
                losses.append(loss.item())
                elapsed = time.perf_counter() - started
                bar.set_postfix(bpb=f"{losses[-1]:.3f}",
                                bytes_s=f"{(step + 1) * config.batch_size * config.seq_len / elapsed:,.0f}")
        seconds = time.perf_counter() - started
    heldout = evaluate_bpb(model, corpus.heldout, config.seq_len, config.batch_size,
                           config.eval_batches, config.amp)
    return TrainResult(steps=config.steps, final_loss_bpb=losses[-1] if losses else float("nan"),
                       heldout_bpb=heldout, bytes_per_s=config.steps * config.batch_size * config.seq_len / seconds,
                       seconds=seconds, losses=losses)


# Training defaults that go with each model preset (steps sized for the machine each one targets).
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(steps=300, batch_size=16, seq_len=128, lr=3e-3),
    "small": TrainConfig(steps=2000, batch_size=16, seq_len=512, lr=1.5e-3, warmup=100),
    "base": TrainConfig(steps=5000, batch_size=16, seq_len=2048, lr=6e-4, warmup=200),
}
