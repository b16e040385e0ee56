"""Did the sleep work? Recall of taught facts, forgetting, and cross-user leakage.

- Recall: a fact is a (cue, answer) pair of bytes. It is recalled when greedy completion of the
  cue, from an empty FastState with no writes (fast memory wiped), reproduces the answer exactly.
  Greedy decoding reproduces `answer` iff at every answer position the argmax of the teacher-forced
  logits is the answer byte, so one batched forward replaces a byte-by-byte decode.
- Forgetting: relative rise of held-out bits per byte (base corpus, earlier days) after vs before.
- Leakage: facts of one user recalled by weights that user's delta is not part of.
Pure torch: no Ray, no Prefect, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.lm import ReverieLM
from model.training import evaluate_bpb


@dataclass(frozen=True)
class Fact:
    cue: bytes  # e.g. b"The secret word of Mira is "
    answer: bytes  # e.g. b"tovak."

    def text(self) -> bytes:
        return self.cue + self.answer


def fact_from_text(text: bytes) -> Fact | None:
    """A probe from a taught line: its first line, split before the last word (cue, answer).
    None when the line has no space to split at."""
    line = text.split(b"\n", 1)[0].rstrip()
    cut = line.rfind(b" ")
    if cut <= 0 or cut == len(line) - 1:
        return None
    return Fact(cue=line[:cut + 1], answer=line[cut + 1:])


@torch.no_grad()
def recalled(model: ReverieLM, facts: Sequence[Fact], batch_size: int = 64) -> list[bool]:
    """Exact-match greedy completion of each fact's cue, fast memory wiped (empty state, no writes)."""
    if not facts:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits: list[bool] = []
    for first in range(0, len(facts), batch_size):
        chunk = facts[first:first + batch_size]
        texts = [f.text() for f in chunk]
        width = max(len(t) for t in texts)
        if width > model.config.max_seq_len:
            raise ValueError(f"a fact of {width} bytes exceeds max_seq_len={model.config.max_seq_len}")
        # Right padding is safe: the model is causal, and with learn=False nothing is written.
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, t in enumerate(texts):
            tokens[i, :len(t)] = torch.tensor(list(t))
        logits, _ = model(tokens.to(device), None, learn=False)
        predicted: Tensor = logits.argmax(-1).cpu()  # (b, T): the byte after each position
        for i, fact in enumerate(chunk):
            start = len(fact.cue)
            want = tokens[i, start:start + len(fact.answer)]
            hits.append(bool(torch.equal(predicted[i, start - 1:start - 1 + len(fact.answer)], want)))
    model.train(was_training)
    return hits


def recall_rate(model: ReverieLM, facts: Sequence[Fact]) -> float:
    hits = recalled(model, facts)
    return sum(hits) / len(hits) if hits else float("nan")


def bpb(model: ReverieLM, data: bytes, seq_len: int = 128, max_batches: int = 8) -> float:
    """Held-out bits per byte from an empty fast state (the base corpus or earlier days' bytes)."""
    return evaluate_bpb(model, data, seq_len, batch_size=8, max_batches=max_batches, amp=False)


def relative_rise(before: float, after: float) -> float:
    """(after - before) / before: 0.01 = bits per byte rose by 1%."""
    return (after - before) / before


def leakage_rate(foreign: ReverieLM, facts: Sequence[Fact], known_before: Sequence[bool] | None = None) -> float:
    """Share of `facts` (another user's) that `foreign` weights recall, not counting the facts the
    weights before the sleep already recalled (`known_before`): knowing a fact is not leaking it."""
    hits = recalled(foreign, facts)
    if known_before is not None:
        hits = [h and not k for h, k in zip(hits, known_before, strict=True)]
    return sum(hits) / len(hits) if hits else 0.0


@dataclass(frozen=True)
class GateConfig:
    """Thresholds a night must meet before its weights are promoted."""

    min_recall: float = 0.5  # mean over users of tonight's facts recalled with their delta, memory wiped
    max_bpb_rise: float = 0.02  # relative rise of held-out base-corpus bpb, shared weights
    max_personal_bpb_rise: float = 0.10  # the same for every user's personal weights
    max_earlier_bpb_rise: float = 0.05  # shared weights on earlier days' shareable bytes
    max_leakage: float = 0.0  # share of a user's facts recalled without their delta
    leakage_peers: int = 2  # other users' personal weights probed per user (besides the shared ones)


def gate_failures(metrics: dict[str, float], config: GateConfig) -> list[str]:
    """Why a night must not be promoted (empty when it may be). `metrics` as the flow computes them."""
    checks = [
        ("recall", "<", config.min_recall, "facts taught today are not recalled from weights"),
        ("bpb_rise", ">", config.max_bpb_rise, "shared weights forgot the base corpus"),
        ("personal_bpb_rise", ">", config.max_personal_bpb_rise, "a personal model forgot the base corpus"),
        ("earlier_bpb_rise", ">", config.max_earlier_bpb_rise, "shared weights forgot earlier days"),
        ("leakage", ">", config.max_leakage, "one user's facts are recalled for others"),
    ]
    reasons = []
    for name, op, bound, why in checks:
        value = metrics.get(name)
        if value is None or value != value:  # not measured tonight (nothing to measure)
            continue
        if (value < bound) if op == "<" else (value > bound):
            reasons.append(f"{name}={value:.4f} {'below' if op == '<' else 'above'} {bound} ({why})")
    return reasons
