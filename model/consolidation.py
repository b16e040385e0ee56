"""Sleep: distill what fast memory knows into weights, without forgetting the old.

Teacher: weights θ plus a user's FastState (what serving ran that day), reading replayed
material (that user's experience bytes since the last sleep) with plasticity on but writes off.
Student: weights with fast memory off (an empty FastState, learn=False). The loss is

    replay      hard-target LM loss on the replayed bytes        (what was said)
    distill     KL(teacher || student) on the same bytes         (what fast memory made of it)
    earlier     hard-target LM loss on the user's earlier turns  (what earlier nights taught)
    rehearsal   LM loss on a sample of the base corpus           (what the model knew before)
    anchor      L2 distance to the weights the sleep started from

and every ingredient can be switched off for ablations (`METHODS` are the tested recipes).
EM items are not bytes and cannot be replayed as text: they act through the teacher, whose
FastState holds them while it reads the replayed bytes.

Earlier turns get their own record-aligned stream rather than being mixed into the rehearsal bytes:
a few hundred bytes of facts diluted in 200 KB of corpus are almost never sampled, so each night
overwrote the previous nights' facts (bench/sleep_days.py measured recall of only the last day).

Where the result goes (privacy routing) is the caller's decision: a user's own material trains
that user's personal delta (`personal_delta`), only shareable material trains shared weights.
Pure torch: no Ray, no Prefect, no I/O.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from model.bitdelta import FORMAT as BITDELTA_FORMAT
from model.bitdelta import BitDelta, compress
from model.config import ModelConfig
from model.corpus import as_tensor, random_batch
from model.fast_state import FastState
from model.lm import ReverieLM
from model.sleep_graph import WARMUP_STEPS, GraphedSleepStep, on_device
from model.training import PendingCheck, StepCheck, autocast, unsynced_step

DENSE_FORMAT = "reverie.dense_delta.v1"
Result = TypeVar("Result")
log = logging.getLogger(__name__)
Weights = dict[str, Tensor]


@dataclass(frozen=True)
class SleepConfig:
    """One night's recipe. Defaults are sized for the tiny preset on one CPU core (seconds).

    Chosen with bench/sleep_days.py (30 days, 3 seeds): 40-60 steps left some of a night's facts
    unlearned, 80 learn them; earlier turns weighted 2x kept 0.99-1.0 of all facts where 1x kept
    0.95-0.98. lr 1e-2 (not lower) so that a freshly bootstrapped model also learns in one night.
    """

    steps: int = 80
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-2
    grad_clip: float = 1.0
    replay: bool = True  # hard-target LM loss on the replayed bytes
    distill: bool = True  # KL from the teacher (weights + the user's FastState) on the replay
    distill_weight: float = 0.5
    temperature: float = 1.0
    earlier_replay: bool = True  # LM loss on the user's earlier turns (Replay.earlier), record-aligned
    earlier_weight: float = 2.0
    rehearsal: bool = True  # LM loss on the base corpus
    rehearsal_weight: float = 1.0
    # Rows of earlier turns and of rehearsal a step reads, each a share of batch_size (at least 1).
    # They are most of a step's arithmetic (3 student streams and the teacher read 20N FLOP per
    # replayed byte at 1.0 each, 11N at 0.25 each), so they are the levers on a bulk night's speed.
    # bench/sleep_days.py measured what each costs: a quarter of both (`reverie_lean`) forgot, recall
    # of all facts taught fell to 0.82 by day 30 (0.5 on day 1) where 1.0 keeps 1.0; a quarter of
    # the rehearsal rows alone (a bulk night 1.36x faster on an H200) kept the facts but forgot more of
    # the corpus: from a base pretrained 2000 steps, held-out bpb +35-37% by day 30 against 1.0's +19-21%
    # (at lr 1e-2; `reverie_fast` below makes up for them with a lower lr and a stronger anchor).
    earlier_fraction: float = 1.0
    rehearsal_fraction: float = 1.0
    anchor: bool = True  # L2 pull towards the weights the sleep started from
    anchor_weight: float = 1e-4
    distill_rehearsal: bool = False  # KL from the teacher on the rehearsal rows too (a new architecture)
    architecture_steps: int = 600  # shared steps of a night that changes the architecture (`architecture_night`)
    personal_delta: str = "dense"  # "dense" or "bitdelta" (1 bit per weight, lossy)
    amp: bool = True  # bf16 autocast on CUDA, as training; memory math stays float32 inside the model
    compile: bool = False  # torch.compile the student's and teacher's layers (ReverieLM.compile_layers)
    # Replay each step as one CUDA graph after a few eager ones (model/sleep_graph.py). CUDA only, one
    # replay, a student not wrapped by DDP; elsewhere the steps stay eager (a warning says why).
    cuda_graph: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("steps", "batch_size", "seq_len", "architecture_steps") if getattr(self, name) < 1]
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        for name in ("earlier_fraction", "rehearsal_fraction"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not (self.replay or self.distill):
            problems.append("a sleep needs replay or distill (or both): otherwise it learns nothing new")
        if self.personal_delta not in ("dense", "bitdelta"):
            problems.append(f"personal_delta must be 'dense' or 'bitdelta', got {self.personal_delta!r}")
        if self.distill_rehearsal and not (self.distill and self.rehearsal):
            problems.append("distill_rehearsal needs distill and rehearsal on")
        if problems:
            raise ValueError("invalid SleepConfig: " + "; ".join(problems))


def architecture_night(config: SleepConfig) -> SleepConfig:
    """The shared recipe of a night whose student is a new architecture (the search's best genome).

    The student starts from a fresh initialisation, so there is nothing to anchor to, and the
    replayed turns alone are far too little to learn a language from: the teacher's predictions on
    the rehearsal corpus carry what the old weights knew, for `architecture_steps` steps.
    """
    return replace(config, steps=config.architecture_steps, anchor=False, distill=True, rehearsal=True,
                   distill_rehearsal=True)


# The recipes compared in bench/sleep_days.py and tested in tests/test_consolidation.py.
METHODS: dict[str, SleepConfig] = {
    "reverie": SleepConfig(),
    "naive_finetune": SleepConfig(distill=False, earlier_replay=False, rehearsal=False, anchor=False),
    "rehearsal_only": SleepConfig(distill=False, earlier_replay=False, anchor=False),
    "reverie_lean": SleepConfig(earlier_fraction=0.25, rehearsal_fraction=0.25),  # forgets
    # For a model that already knows its language (what serves users): a quarter of the rehearsal
    # rows, a bulk night ~1.36x faster (H200: 1,855-1,920 interactions/s against 1,367-1,409), with a
    # smaller lr and a stronger anchor that make up for them, and earlier turns weighted 4x so the
    # smaller lr still keeps old facts. From bases pretrained 2000 steps, 30 days, 3 seeds, 4 facts a
    # night: recall 0.97-1.0 on day 30 against the default's 0.93-0.98, held-out bpb +20-24% as the
    # default's +21-23% (session 23; without the 4x and at anchor 1e-2 it kept ~2 points fewer facts).
    # An untrained model does not learn a night's facts at lr 3e-3 (the tests' untrained model: 6
    # tests fail), so it is not the default, whose lr 1e-2 also serves a freshly bootstrapped model.
    # bench/NOTES.md, sessions 21-23.
    "reverie_fast": SleepConfig(rehearsal_fraction=0.25, lr=3e-3, anchor_weight=2e-2, earlier_weight=4.0),
}


def named_recipe(name: str, **changes: object) -> SleepConfig:
    """`METHODS[name]` with `changes`: how a flow, a command or a setting (REVERIE_SLEEP_RECIPE)
    chooses a night by name. An unknown name or a bad value is a ValueError that says what is known."""
    if name not in METHODS:
        raise ValueError(f"unknown sleep recipe {name!r}; known: {', '.join(sorted(METHODS))}")
    unknown = sorted(set(changes) - {f.name for f in fields(SleepConfig)})
    if unknown:
        raise ValueError(f"unknown SleepConfig fields {unknown}")
    return replace(METHODS[name], **changes)


@dataclass
class Replay:
    """One user's material for a night: tonight's texts, their FastState (None = no fast memory),
    and their turns of earlier nights (already in weights; replayed so they stay there)."""

    texts: list[bytes]
    state: FastState | None = None
    earlier: list[bytes] = field(default_factory=list)


@dataclass
class SleepResult:
    weights: Weights
    metrics: dict[str, float]


# --- batches ------------------------------------------------------------------------------------

def replay_batch(texts: Sequence[bytes], batch_size: int, seq_len: int, rng: random.Random
                 ) -> tuple[Tensor, Tensor]:
    """Record-aligned crops: each row starts at a random record and runs on through the next ones,
    so facts are seen from their first byte, as a probe will ask them. -> inputs, targets (b, T)."""
    if not texts:
        raise ValueError("replay needs at least one text")
    rows = []
    for _ in range(batch_size):
        start = rng.randrange(len(texts))
        stream = bytearray()
        i = start
        while len(stream) < seq_len + 1:
            stream += texts[i % len(texts)] + b"\n"
            i += 1
        rows.append(list(stream[:seq_len + 1]))
    chunk = torch.tensor(rows, dtype=torch.long)
    return chunk[:, :-1], chunk[:, 1:]


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _distill_loss(student: Tensor, teacher: Tensor, targets: Tensor, temperature: float,
                  only_known: bool = True) -> Tensor:
    """KL(teacher || student), scaled by T², at the bytes the teacher predicts right (`only_known`)
    or at every byte.

    student, teacher: (b, T, 256); targets (b, T). Where the teacher (with fast memory) gets the
    replayed byte wrong it knows nothing worth keeping there, and its soft targets would only pull
    the student away from the hard target, so those positions carry no distillation loss. On the
    rehearsal corpus a new architecture learns the teacher's whole distribution (`only_known=False`).
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                  log_target=True, reduction="none").sum(-1)  # (b, T)
    knows = (teacher.argmax(-1) == targets).float() if only_known else torch.ones_like(kl)
    return (kl * knows).sum() / knows.sum().clamp(min=1.0) * t * t


class AnchorPull:
    """The anchor term, sum of squared distances of every parameter to its anchor value, outside
    autograd: its value for the metrics, and its gradient added straight to the parameters' own
    (`add_gradient`). As an autograd term it ran ~3 small kernels per parameter forward and as many
    backward (~200 parameters at `base`: ~1,200 launches a sleep step, H200 profile, session 13);
    the multi-tensor ops here are a few launches in all. On CUDA the distances and their value are
    computed on a second stream (`_beside`) while the step's forward runs: two passes over every
    weight that need nothing the forward computes.
    """

    def __init__(self, model: nn.Module, anchor: Mapping[str, Tensor], device: torch.device) -> None:
        named = [(name, p) for name, p in model.named_parameters() if name in anchor]
        self.parameters = [p for _, p in named]
        anchors = [anchor[name] for name, _ in named]

        def distances_and_value() -> tuple[list[Tensor], Tensor]:
            distances = torch._foreach_sub(self.parameters, anchors)
            return distances, torch.stack(torch._foreach_norm(distances)).square().sum()
        self._computed = _beside(distances_and_value, device)

    @property
    def distances(self) -> list[Tensor]:
        return self._computed()[0]

    @property
    def value(self) -> Tensor:
        return self._computed()[1]

    @torch.no_grad()
    def add_gradient(self, weight: float) -> None:
        """grad += weight * d(value)/dp = 2 * weight * (p - anchor). A parameter the loss did not
        reach (grad None: the student's unused memories) has not moved, so its pull is zero."""
        reached = [(p.grad, d) for p, d in zip(self.parameters, self.distances, strict=True) if p.grad is not None]
        if reached:
            grads, distances = zip(*reached)
            torch._foreach_add_(list(grads), list(distances), alpha=2.0 * weight)


def _beside(run: Callable[[], Result], device: torch.device) -> Callable[[], Result]:
    """Start `run` without gradients on a second CUDA stream, beside the work that follows on the
    current one; the returned function waits for it (once) and gives its result. For work that needs
    nothing the step computes (the teacher's forward, the anchor's distances), so that its kernels
    fill the gaps and tails of the student's. Elsewhere `run` runs at once."""
    if device.type != "cuda":
        with torch.no_grad():
            result = run()
        return lambda: result
    main, side = torch.cuda.current_stream(device), _side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side), torch.no_grad():
        result = run()
    joined = False

    def join() -> Result:
        nonlocal joined
        if not joined:
            joined = True
            main.wait_stream(side)
            for tensor in tree_leaves(result):
                tensor.record_stream(main)  # made on the side stream, used and freed on the main one
        return result
    return join


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


# --- the sleep ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherState:
    """A replay's FastState on the device as a step's replay rows, with its positions. Made once a
    night: copying the state from the host and reading its positions (the forward's one sync with a
    state) made every step wait for the GPU."""

    state: FastState
    positions: list[int]

    @classmethod
    def of(cls, replay: Replay, rows: int, device: torch.device | str) -> TeacherState | None:
        if replay.state is None:
            return None
        state = replay.state.to(device).rows([0] * rows)
        return cls(state, state.pos.tolist())


@dataclass(frozen=True)
class StepRows:
    """A step's rows on the host: each stream's crops as bytes (rows, T + 1), replay rows first,
    and which rows are whose. Bytes, so the forward's range check needs no sync."""

    data: Tensor
    streams: dict[str, slice]


def step_rows(replay: Replay, rehearsal: Tensor | None, config: SleepConfig, rng: random.Random,
              generator: torch.Generator) -> StepRows:
    """Tonight's, earlier and rehearsal crops of one step, in one batch: the student reads them in
    one forward instead of three."""
    b, t = config.batch_size, config.seq_len
    batches = {"replay": replay_batch(replay.texts, b, t, rng)}
    if config.earlier_replay and replay.earlier:
        batches["earlier"] = replay_batch(replay.earlier, max(1, round(b * config.earlier_fraction)), t, rng)
    if rehearsal is not None:
        batches["rehearsal"] = random_batch(rehearsal, max(1, round(b * config.rehearsal_fraction)), t, generator)
    streams, start = {}, 0
    for stream, (x, _) in batches.items():
        streams[stream] = slice(start, start + x.shape[0])
        start += x.shape[0]
    data = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches.values()]).to(torch.uint8)
    return StepRows(data, streams)


def _step_losses(student: nn.Module, teacher: ReverieLM | None, chunk: Tensor, streams: Mapping[str, slice],
                 teacher_state: TeacherState | None, config: SleepConfig) -> dict[str, Tensor]:
    """One step's loss terms, each ingredient that is on (LM terms in bits per byte), over `chunk`,
    a `StepRows.data` on the device."""
    b = config.batch_size
    inputs, targets = chunk[:, :-1], chunk[:, 1:].long()
    if config.distill:
        state, positions = (None, None) if teacher_state is None else (teacher_state.state, teacher_state.positions)
        teacher_logits = _beside(lambda: teacher(inputs[:b], state, learn=False, positions=positions)[0],
                                 chunk.device)
    logits, _ = student(inputs, None, learn=False)
    parts: dict[str, Tensor] = {}
    for stream, rows in streams.items():
        if stream != "replay" or config.replay:
            parts[f"{stream}_bpb"] = _lm_loss(logits[rows], targets[rows]) / math.log(2)
    if config.distill:
        parts["distill"] = _distill_loss(logits[:b], teacher_logits(), targets[:b], config.temperature)
        if config.distill_rehearsal and "rehearsal" in streams:
            rows = streams["rehearsal"]
            with torch.no_grad():
                rehearsal_logits, _ = teacher(inputs[rows], None, learn=False)
            parts["rehearsal_distill"] = _distill_loss(logits[rows], rehearsal_logits, targets[rows],
                                                       config.temperature, only_known=False)
    return parts


def train_on(student: nn.Module, teacher: ReverieLM | None, chunk: Tensor, streams: Mapping[str, slice],
             teacher_state: TeacherState | None, config: SleepConfig, optimizer: torch.optim.Optimizer,
             anchor: Mapping[str, Tensor] | None) -> tuple[dict[str, Tensor], StepCheck]:
    """One optimizer step over `chunk` (a `StepRows.data` on the device): the loss terms and the
    anchor, weighted, then a clipped step that does not wait for the GPU (`unsynced_step`;
    `optimizer` fused). No host syncs, so model/sleep_graph.py can capture it; `consolidate` runs
    it on each step's `step_rows`, bench/kernel_profile.py profiles one. Returns the loss terms
    and the step's check."""
    pull = None if anchor is None else AnchorPull(student, anchor, chunk.device)  # beside the forward
    with autocast(chunk.device, config.amp, cache=False):  # right whether or not the caller is in autocast
        parts = _step_losses(student, teacher, chunk, streams, teacher_state, config)
    scales = {"replay_bpb": math.log(2), "distill": config.distill_weight,  # bits per byte -> nats, weighted
              "rehearsal_distill": config.distill_weight,
              "earlier_bpb": config.earlier_weight * math.log(2),
              "rehearsal_bpb": config.rehearsal_weight * math.log(2)}
    loss = sum(scales[name] * value for name, value in parts.items())
    if pull is not None:
        parts["anchor"] = pull.value
        loss = loss + config.anchor_weight * parts["anchor"]
    check = unsynced_step(loss, student, optimizer, config.grad_clip,
                          before_clip=None if pull is None else lambda: pull.add_gradient(config.anchor_weight))
    return parts, check


def consolidate(student: nn.Module, teacher: ReverieLM | None, replays: Sequence[Replay], rehearsal: bytes,
                config: SleepConfig, *, device: str | torch.device = "cpu",
                on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """Train `student` in place; returns loss metrics averaged over the last quarter of the steps.

    student: a ReverieLM (or a wrapper of one, e.g. DDP) holding the starting weights, which are
        also the anchor. teacher: the weights that served these users (frozen), run with each
        replay's FastState; None only when config.distill is off. On CUDA with config.amp its
        matrices are stored in bf16 (`ReverieLM.hold_matrices`), the values autocast would give.
    replays: one entry per user whose material this sleep learns. rehearsal: base-corpus bytes.
    on_step(step, loss): called once that step's kernels have run, while the GPU runs the next one.
    A step whose loss or gradient is not finite is not applied; FloatingPointError says which.
    """
    if config.distill and teacher is None:
        raise ValueError("config.distill needs a teacher model (the weights that served the day)")
    replays = [r for r in replays if r.texts]
    if not replays:
        raise ValueError("nothing to replay: give at least one Replay with texts")
    rehearsal_data = as_tensor(rehearsal) if config.rehearsal else None
    if rehearsal_data is not None and rehearsal_data.numel() < config.seq_len + 2:
        raise ValueError(f"rehearsal material has {rehearsal_data.numel()} bytes, fewer than one sequence "
                         f"of {config.seq_len + 1}; give more or set rehearsal=False")
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    student.to(device).train()
    if config.compile:
        for model in (getattr(student, "module", student), teacher):  # DDP wraps the student's module
            if model is not None:
                model.compile_layers()
    anchor = {n: p.detach().clone() for n, p in student.named_parameters()} if config.anchor else None
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
        if config.amp and torch.device(device).type == "cuda":  # it runs only under train_on's bf16 autocast
            teacher.hold_matrices(torch.bfloat16)
    graphed = _can_graph(student, replays, config, device)
    # fused: the only AdamW that skips a non-finite step on the device (`unsynced_step`); the learning
    # rate a tensor, so that a captured step reads each step's.
    lr = torch.tensor(config.lr, device=device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95), fused=True,
                                  capturable=graphed)
    teacher_states = [TeacherState.of(r, config.batch_size, device) if config.distill else None for r in replays]
    graph = GraphedSleepStep(optimizer, device) if graphed else None
    sums: dict[str, Tensor] = {}
    window = max(1, config.steps // 4)
    behind: tuple[int, PendingCheck] | None = None
    for step in range(config.steps):
        lr.fill_(config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        which = step % len(replays)
        rows = step_rows(replays[which], rehearsal_data, config, rng, generator)

        def train(chunk: Tensor, streams: dict[str, slice] = rows.streams,
                  state: TeacherState | None = teacher_states[which]) -> tuple[dict[str, Tensor], StepCheck]:
            return train_on(student, teacher, chunk, streams, state, config, optimizer, anchor)
        parts, check = graph(train, rows.data) if graph else train(on_device(rows.data, device))
        if step >= config.steps - window:
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
        if behind is not None:  # the step before: the host reads it while the GPU runs this one
            _verified(*behind, on_step)
        behind = (step, check.read_later())
    if behind is not None:
        _verified(*behind, on_step)
    return {name: float(total) / window for name, total in sums.items()}


def _can_graph(student: nn.Module, replays: Sequence[Replay], config: SleepConfig, device: str | torch.device) -> bool:
    """Whether config.cuda_graph can be honoured; a warning says why not where it cannot."""
    if not config.cuda_graph:
        return False
    why = ("the device is not CUDA" if torch.device(device).type != "cuda"
           else "the student is wrapped (DDP)" if not isinstance(student, ReverieLM)
           else f"{len(replays)} replays rotate (a graph holds one teacher state)" if len(replays) > 1
           else f"{config.steps} steps leave none after the {WARMUP_STEPS} eager warm-up steps"
           if config.steps <= WARMUP_STEPS else None)
    if why:
        log.warning("SleepConfig.cuda_graph: running the steps eagerly, since %s", why)
    return why is None


def _verified(step: int, check: PendingCheck, on_step: Callable[[int, float], None] | None) -> None:
    loss = check.verify("sleep loss", step, "lower SleepConfig.lr")
    if on_step is not None:
        on_step(step, loss)


def model_from(config: ModelConfig, weights: Mapping[str, Tensor]) -> ReverieLM:
    """A ReverieLM holding its own copy of `weights`, on their device, in its parameters' dtypes.
    Built on the meta device: the random initialisation that the weights replace took 0.88 s of
    the 0.97 s a `base` model took to build on one core (0.09 s now), and a user's night builds two."""
    with torch.device("meta"):
        model = ReverieLM(config)
    expected = model.state_dict()
    owned = {name: tensor.to(dtype=expected[name].dtype if name in expected else tensor.dtype, copy=True)
             for name, tensor in weights.items()}
    model.load_state_dict(owned, assign=True)  # strict: a missing or unexpected name is an error, as before
    return model


def sleep(config: ModelConfig, start: Mapping[str, Tensor], teacher: Mapping[str, Tensor] | None,
          replays: Sequence[Replay], rehearsal: bytes, sleep_config: SleepConfig,
          device: str | torch.device = "cpu") -> SleepResult:
    """`consolidate` on weight dicts: start from `start`, distill from `teacher`. CPU tensors out."""
    student = model_from(config, start)
    teacher_model = model_from(config, teacher) if (teacher is not None and sleep_config.distill) else None
    metrics = consolidate(student, teacher_model, replays, rehearsal, sleep_config, device=device)
    return SleepResult(weights=cpu_weights(student), metrics=metrics)


def cpu_weights(model: nn.Module) -> Weights:
    return {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}


# --- deltas: personal (private) and aggregated (shared) -----------------------------------------

def personal_delta(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], base_version: str,
                   kind: str = "dense") -> tuple[Weights, dict[str, str]]:
    """tuned - base as (tensors, metadata) for DeltaStore. kind "dense": fp32 differences of the
    floating-point tensors that moved; "bitdelta": packed signs and scales of the 2-D ones."""
    names = [n for n, t in base.items() if t.is_floating_point() and not torch.equal(t, tuned[n])]
    if kind == "bitdelta":
        matrices = [n for n in names if base[n].dim() == 2]
        delta = compress(base, tuned, matrices or names[:1], base_version)
        return delta.to_tensors(), delta.metadata()
    return ({n: (tuned[n].float() - base[n].float()).contiguous() for n in names},
            {"format": DENSE_FORMAT, "base_version": base_version})


@dataclass(frozen=True)
class DenseDelta:
    """A stored dense delta, with what `model.bitdelta.apply_delta` reads of a BitDelta (names,
    shapes, dense, base_version), so serving applies and removes either kind the same way."""

    tensors: Weights
    base_version: str

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def dense(self, name: str) -> Tensor:
        return self.tensors[name]


def stored_delta(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> BitDelta | DenseDelta:
    """A delta from the delta store, in the form its `format` says (both are what sleeps write)."""
    if meta.get("format") == BITDELTA_FORMAT:
        return BitDelta.from_tensors(tensors, meta)
    if meta.get("format") == DENSE_FORMAT:
        return DenseDelta({name: t.float() for name, t in tensors.items()}, str(meta["base_version"]))
    raise ValueError(f"delta format {meta.get('format')!r} is neither {BITDELTA_FORMAT!r} nor {DENSE_FORMAT!r}; "
                     f"was it written by another version of Reverie?")


def dense_delta(tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> Weights:
    """Read a stored delta (dense or BitDelta) as name -> dense fp32 difference."""
    if meta.get("format") == BITDELTA_FORMAT:
        return BitDelta.from_tensors(tensors, meta, max_scale=math.inf).decompress()
    return {name: t.float() for name, t in tensors.items()}


def add_delta(weights: Mapping[str, Tensor], delta: Mapping[str, Tensor], scale: float = 1.0) -> Weights:
    """weights + scale * delta (tensors the delta does not name are shared, not copied)."""
    unknown = sorted(set(delta) - set(weights))
    if unknown:
        raise ValueError(f"delta names tensors {unknown[:5]} that these weights do not have; "
                         f"was it made for another model config?")
    out = dict(weights)
    for name, d in delta.items():
        if d.shape != weights[name].shape:
            raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, weights have {tuple(weights[name].shape)}")
        out[name] = (weights[name].float() + scale * d.float()).to(weights[name].dtype)
    return out
