"""Local personalization: fine-tune a copy of the shared weights on one user's bytes.

This is what a device does before it uploads a BitDelta: start from the shared slow weights, take
a few optimizer steps on the user's own text, and hand back the fine-tuned state. Only the
parameters named in `trainable` move (the matrices the BitDelta will carry), so the delta that
leaves the device describes everything the fine-tune changed. Pure torch: no framework, no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.corpus import as_tensor, random_batch
from model.lm import ReverieLM, bits_per_byte


@dataclass(frozen=True)
class PersonalizeConfig:
    """The local recipe. Defaults are sized for the tiny preset on one CPU core (~1-2 s)."""

    steps: int = 20
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("steps", "batch_size", "seq_len") if getattr(self, name) < 1]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0, got {self.grad_clip}")
        if problems:
            raise ValueError("invalid PersonalizeConfig: " + "; ".join(problems))


def personalize(model: ReverieLM, data: bytes, config: PersonalizeConfig = PersonalizeConfig(),
                trainable: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Fine-tune a copy of `model` on `data`; return the copy's state dict (detached, on CPU).

    `model` itself is left unchanged. trainable: parameter names that may move (default: all);
    every other parameter stays bit-identical to `model`'s. Batches are random crops of
    `config.seq_len + 1` bytes, each starting from an empty fast state, as in `model.training`.
    """
    if len(data) < config.seq_len + 1:
        raise ValueError(f"personalization needs at least seq_len + 1 = {config.seq_len + 1} bytes "
                         f"of user data, got {len(data)}")
    tuned = copy.deepcopy(model).train()
    names = list(trainable) if trainable is not None else [n for n, _ in tuned.named_parameters()]
    params = _parameters(tuned, names)
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    tokens = as_tensor(data)
    device = next(tuned.parameters()).device
    for step in range(config.steps):
        inputs, targets = random_batch(tokens, config.batch_size, config.seq_len, generator)
        logits, _ = tuned(inputs.to(device))
        loss = bits_per_byte(logits, targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"personalization loss became {loss.item()} at step {step}; lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
    return {name: t.detach().cpu().clone() for name, t in tuned.state_dict().items()}


def _parameters(model: ReverieLM, names: Sequence[str]) -> list[torch.nn.Parameter]:
    if not names:
        raise ValueError("personalization needs at least one trainable parameter name")
    params = []
    for name in names:
        try:
            params.append(model.get_parameter(name))
        except AttributeError:
            raise ValueError(f"trainable parameter {name!r} is not in this {type(model).__name__}") from None
    return params
