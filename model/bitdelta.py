"""BitDelta: a fine-tune stored as one sign bit per weight plus one scale per matrix.

After Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit". For each selected
weight matrix W the delta D = W_finetuned - W_base is stored as

    sign(D)   packed 8 per byte (uint8, most significant bit first, like numpy.packbits);
              bit 1 means D >= 0, so the sign of an exact 0 is +1
    scale     one fp32 scalar, initialised to mean|D|

and reconstructed as D_hat = scale * sign(D). For a fixed sign pattern mean|D| is the L2-optimal
scale: argmin_s ||D - s * sign(D)||^2 = sum(D * sign(D)) / n = sum|D| / n. Scale distillation
then tunes only the scales so that base + D_hat matches the fine-tuned model's logits on a small
calibration set, which recovers most of what the sign approximation loses.

Payload per matrix of n elements: ceil(n / 8) + 4 bytes against 2n for an fp16 delta, a ratio of
16n / (n + 32): at least 15.5x from n >= 992 elements, 16x asymptotically.

The story of one delta: `select_matrices` -> `compress` -> `distill_scales` -> `to_tensors` /
`metadata` (safetensors-ready) -> `BitDelta.from_tensors` (validated: a delta may come from a
client) -> `apply_delta` / `remove_delta` or the `applied` context manager.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "reverie.bitdelta.v1"  # metadata["format"] of stored deltas
DEFAULT_MAX_SCALE = 1.0  # a mean |delta| above this replaces weights rather than adjusting them

Selection = Literal["linear", "2d"]


@dataclass(frozen=True)
class BitDeltaConfig:
    """Which matrices carry a delta, and how their scales are distilled.

    select: "linear" = the weight of every nn.Linear; "2d" = every 2-D parameter (embeddings too).
    last_k: keep only matrices inside the last k entries of the layer stack, which is the longest
        nn.ModuleList of the model (the outermost one among equally long lists).
    include: keep only names containing one of these substrings (e.g. ("mlp",)).
    Filters narrow: with last_k and include both set, a matrix must pass both.
    distill_lr: Adam's step on log(scale / initial scale), so it is relative and does not depend
        on the size of the delta: 1e-2 moves a scale by about 1% per step.
    max_scale: upper bound on every scale, kept during distillation and checked on load.
    """

    select: Selection = "linear"
    last_k: int | None = None
    include: tuple[str, ...] = ()
    distill_steps: int = 200
    distill_lr: float = 1e-2
    max_scale: float = DEFAULT_MAX_SCALE

    def __post_init__(self) -> None:
        problems = []
        if self.select not in ("linear", "2d"):
            problems.append(f"select must be 'linear' or '2d', got {self.select!r}")
        if self.last_k is not None and self.last_k < 1:
            problems.append(f"last_k must be >= 1 or None, got {self.last_k}")
        if isinstance(self.include, str):
            problems.append(f"include must be a tuple of substrings, got the string {self.include!r}")
        if self.distill_steps < 0:
            problems.append(f"distill_steps must be >= 0, got {self.distill_steps}")
        if not self.distill_lr > 0:
            problems.append(f"distill_lr must be > 0, got {self.distill_lr}")
        if not self.max_scale > 0:
            problems.append(f"max_scale must be > 0, got {self.max_scale}")
        if problems:
            raise ValueError("invalid BitDeltaConfig: " + "; ".join(problems))


# --- sign packing -------------------------------------------------------------------------------

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # most significant bit first, as numpy.packbits


def packed_length(numel: int) -> int:
    """Bytes that hold `numel` sign bits."""
    return (numel + 7) // 8


def pack_signs(x: Tensor) -> Tensor:
    """Signs of x, 8 per byte. x: any shape, finite -> (ceil(x.numel() / 8),) uint8.

    Bit 1 means x >= 0 (the sign of 0 is +1), bit 0 means x < 0. Elements are taken in row-major
    order, the first in the most significant bit; padding bits of the last byte are 0.
    """
    bits = (x.detach().reshape(-1) >= 0).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.numel()) % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of pack_signs. packed: (ceil(numel / 8),) uint8 -> (numel,) of +1 / -1 in dtype."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_length(numel):
        raise ValueError(
            f"packed signs for {numel} elements must be a 1-D uint8 tensor of {packed_length(numel)} "
            f"bytes, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(dtype) * 2 - 1


# --- the delta ----------------------------------------------------------------------------------


@dataclass(eq=False)
class BitDelta:
    """Sign bits and scales of one fine-tune, relative to the base checkpoint `base_version`.

    signs[name]: (ceil(numel / 8),) uint8; scales[name]: () float32, finite and >= 0;
    shapes[name]: the parameter's shape. Construction validates all three (see `validate`).
    """

    signs: dict[str, Tensor]
    scales: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    base_version: str

    def __post_init__(self) -> None:
        self.shapes = {name: tuple(shape) for name, shape in self.shapes.items()}
        self.validate(max_scale=math.inf)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def validate(self, max_scale: float = math.inf) -> None:
        """Raise ValueError naming the first parameter whose entry is malformed."""
        for kind, entries in (("signs", self.signs), ("scale", self.scales)):
            missing = sorted(set(self.shapes) - set(entries))
            extra = sorted(set(entries) - set(self.shapes))
            if missing:
                raise ValueError(f"bitdelta: parameter {missing[0]!r} has a shape but no {kind}")
            if extra:
                raise ValueError(f"bitdelta: parameter {extra[0]!r} has {kind} but no shape")
        for name, shape in self.shapes.items():
            _check_entry(name, self.signs[name], self.scales[name], shape, max_scale)

    @property
    def nbytes(self) -> int:
        """Payload bytes: packed signs plus one fp32 scale per matrix."""
        return sum(s.numel() for s in self.signs.values()) + 4 * len(self.scales)

    @property
    def dense_fp16_nbytes(self) -> int:
        """Bytes of the same deltas stored densely in fp16."""
        return sum(2 * math.prod(shape) for shape in self.shapes.values())

    def dense(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """scale * sign for one parameter, in its shape."""
        shape = self.shapes[name]
        signs = unpack_signs(self.signs[name], math.prod(shape), dtype)
        return (signs * self.scales[name].to(dtype)).view(shape)

    def decompress(self) -> dict[str, Tensor]:
        """Dense fp32 deltas, name -> tensor of the parameter's shape (4 bytes per weight)."""
        return {name: self.dense(name) for name in self.names}

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat tensors for safetensors: '<param>.signs' (uint8) and '<param>.scale' (fp32, 0-d)."""
        tensors = {}
        for name in self.names:
            tensors[f"{name}.signs"] = self.signs[name].contiguous()
            tensors[f"{name}.scale"] = self.scales[name].reshape(()).contiguous()
        return tensors

    def metadata(self) -> dict[str, str]:
        """String metadata stored beside `to_tensors()`: format, base version and shapes."""
        shapes = {name: list(shape) for name, shape in self.shapes.items()}
        return {"format": FORMAT, "base_version": self.base_version, "shapes": json.dumps(shapes)}

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, str],
        *,
        max_scale: float = DEFAULT_MAX_SCALE,
    ) -> BitDelta:
        """Read what `to_tensors` and `metadata` wrote; ValueError names what is malformed."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"bitdelta: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
        base_version = meta.get("base_version")
        if not isinstance(base_version, str) or not base_version:
            raise ValueError("bitdelta: metadata has no base_version")
        shapes = _parse_shapes(meta.get("shapes"))
        expected = {f"{name}.{kind}" for name in shapes for kind in ("signs", "scale")}
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise ValueError(
                f"bitdelta: tensor {unexpected[0]!r} is not '<param>.signs' or '<param>.scale' "
                "of a parameter listed in metadata['shapes']"
            )
        for key in sorted(expected - set(tensors)):
            name, kind = key.rsplit(".", 1)
            raise ValueError(f"bitdelta: parameter {name!r} has no {kind} tensor ({key!r} is missing)")
        delta = cls(
            signs={name: tensors[f"{name}.signs"] for name in shapes},
            scales={name: _as_scalar(tensors[f"{name}.scale"]) for name in shapes},
            shapes=shapes,
            base_version=base_version,
        )
        delta.validate(max_scale)
        return delta


def _as_scalar(t: Tensor) -> Tensor:
    return t.reshape(()) if t.numel() == 1 else t  # a wrong size is reported by validate


def _check_entry(name: str, signs: Tensor, scale: Tensor, shape: tuple[int, ...], max_scale: float) -> None:
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bitdelta: parameter {name!r} has an invalid shape {shape}")
    if signs.dtype != torch.uint8:
        raise ValueError(f"bitdelta: signs of {name!r} must be uint8, got {signs.dtype}")
    want = packed_length(math.prod(shape))
    if signs.dim() != 1 or signs.numel() != want:
        raise ValueError(
            f"bitdelta: signs of {name!r} must be 1-D with {want} bytes for shape {shape}, "
            f"got shape {tuple(signs.shape)}"
        )
    if scale.dtype != torch.float32:
        raise ValueError(f"bitdelta: scale of {name!r} must be float32, got {scale.dtype}")
    if scale.numel() != 1:
        raise ValueError(f"bitdelta: scale of {name!r} must be one number, got shape {tuple(scale.shape)}")
    value = scale.item()
    if not math.isfinite(value):
        raise ValueError(f"bitdelta: scale of {name!r} is not finite ({value})")
    if value < 0:
        raise ValueError(f"bitdelta: scale of {name!r} is negative ({value})")
    if value > max_scale:
        raise ValueError(
            f"bitdelta: scale of {name!r} is {value:g}, above max_scale={max_scale:g}; "
            "pass a larger max_scale if this delta is trusted"
        )


def _parse_shapes(raw: str | None) -> dict[str, tuple[int, ...]]:
    try:
        shapes = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as err:
        raise ValueError(f"bitdelta: metadata['shapes'] is not JSON: {err}") from None
    if not isinstance(shapes, dict):
        raise ValueError("bitdelta: metadata['shapes'] must be a JSON object of name -> list of ints")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(
                f"bitdelta: shape of {name!r} in metadata must be a list of ints >= 0, got {shape!r}"
            )
    return {name: tuple(shape) for name, shape in shapes.items()}


# --- which matrices -----------------------------------------------------------------------------


def select_matrices(module: nn.Module, config: BitDeltaConfig = BitDeltaConfig()) -> list[str]:
    """Parameter names (as in module.state_dict()) that carry a delta, in module order.

    A parameter shared under several names (tied weights) is listed once, so applying a delta
    never adds to the same tensor twice.
    """
    if config.select == "linear":
        candidates = [
            (f"{prefix}.weight" if prefix else "weight", m.weight)
            for prefix, m in module.named_modules()
            if isinstance(m, nn.Linear)
        ]
    else:
        candidates = [(name, p) for name, p in module.named_parameters() if p.dim() == 2]
    seen: set[int] = set()
    names = []
    for name, param in candidates:
        if id(param) not in seen:
            seen.add(id(param))
            names.append(name)
    if config.last_k is not None:
        prefixes = _last_layer_prefixes(module, config.last_k)
        names = [n for n in names if n.startswith(prefixes)]
    if config.include:
        names = [n for n in names if any(part in n for part in config.include)]
    if not names:
        raise ValueError(f"bitdelta: {config} selects no matrix of this {type(module).__name__}")
    return names


def _last_layer_prefixes(module: nn.Module, k: int) -> tuple[str, ...]:
    stacks = [(name, len(m)) for name, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ValueError(
            f"bitdelta: last_k needs the layers in an nn.ModuleList, {type(module).__name__} has none; "
            "select with include=(...) instead"
        )
    stack, n_layers = max(stacks, key=lambda s: s[1])
    if k > n_layers:
        raise ValueError(f"bitdelta: last_k={k} but the layer stack {stack!r} has {n_layers} layers")
    return tuple(f"{stack}.{i}." if stack else f"{i}." for i in range(n_layers - k, n_layers))


# --- compression --------------------------------------------------------------------------------


def compress(
    base_state: Mapping[str, Tensor],
    finetuned_state: Mapping[str, Tensor],
    names: Sequence[str],
    base_version: str,
) -> BitDelta:
    """Signs of finetuned - base and scales mean|finetuned - base| for the named parameters.

    The delta is computed in fp32 whatever the weights' dtype; its tensors stay on the weights'
    device.
    """
    if not names:
        raise ValueError("bitdelta: compress needs at least one parameter name (see select_matrices)")
    signs, scales, shapes = {}, {}, {}
    for name in names:
        for which, state in (("base", base_state), ("fine-tuned", finetuned_state)):
            if name not in state:
                raise ValueError(f"bitdelta: parameter {name!r} is not in the {which} state dict")
        base, tuned = base_state[name], finetuned_state[name]
        if base.shape != tuned.shape:
            raise ValueError(
                f"bitdelta: parameter {name!r} has shape {tuple(base.shape)} in the base "
                f"and {tuple(tuned.shape)} in the fine-tune"
            )
        delta = tuned.detach().float() - base.detach().float()
        if not torch.isfinite(delta).all():
            raise ValueError(f"bitdelta: the delta of {name!r} has non-finite values")
        signs[name] = pack_signs(delta)
        scales[name] = delta.abs().mean() if delta.numel() else delta.new_zeros(())
        shapes[name] = tuple(base.shape)
    return BitDelta(signs=signs, scales=scales, shapes=shapes, base_version=base_version)


# --- applying to a model ------------------------------------------------------------------------


@dataclass(eq=False)
class AppliedDelta:
    """What `apply_delta` overwrote: an exact copy of every parameter the delta touched.

    Memory: one extra copy of each touched parameter, in its own dtype and on its own device
    (for select="linear" nearly the whole model, for last_k a few layers). Restoring from it is
    what makes removal bit-exact: fl(fl(w + d) - d) != w in general.
    """

    module: nn.Module
    base_version: str
    backups: dict[str, Tensor]
    removed: bool = False


def apply_delta(module: nn.Module, delta: BitDelta, *, base_version: str | None = None) -> AppliedDelta:
    """Add scale * sign to the named parameters in place; return the handle that undoes it.

    base_version: if given, refuse a delta made against another base checkpoint. Everything is
    checked before any weight changes. Remove deltas in the reverse order of applying them.
    """
    if base_version is not None and base_version != delta.base_version:
        raise ValueError(
            f"bitdelta: delta was made against base {delta.base_version!r}, the model is {base_version!r}"
        )
    params = _resolve(module, delta)
    backups = {}
    with torch.no_grad():
        for name, param in params.items():
            backups[name] = param.detach().clone()
            dense = delta.dense(name).to(param.device)
            param.copy_(param.float() + dense)  # add in fp32, round once to the parameter's dtype
    return AppliedDelta(module=module, base_version=delta.base_version, backups=backups)


def remove_delta(module: nn.Module, applied: AppliedDelta) -> None:
    """Restore, bit for bit, the weights that `apply_delta` returned `applied` for."""
    if isinstance(applied, BitDelta):
        raise TypeError(
            "remove_delta takes the AppliedDelta returned by apply_delta, not the BitDelta: "
            "subtracting scale * sign would not restore the base weights exactly"
        )
    if applied.module is not module:
        raise ValueError("bitdelta: this AppliedDelta was returned for another module")
    if applied.removed:
        raise ValueError(f"bitdelta: the delta on base {applied.base_version!r} was already removed")
    with torch.no_grad():
        for name, backup in applied.backups.items():
            module.get_parameter(name).copy_(backup)
    applied.removed = True
    applied.backups = {}


@contextmanager
def applied(module: nn.Module, delta: BitDelta, *, base_version: str | None = None) -> Iterator[AppliedDelta]:
    """`with applied(model, delta): ...` runs with the delta on and restores the base after."""
    handle = apply_delta(module, delta, base_version=base_version)
    try:
        yield handle
    finally:
        remove_delta(module, handle)


def _resolve(module: nn.Module, delta: BitDelta) -> dict[str, nn.Parameter]:
    """name -> parameter for every name in the delta, checked against the delta's shapes."""
    params: dict[str, nn.Parameter] = {}
    owner: dict[int, str] = {}
    for name in delta.names:
        try:
            param = module.get_parameter(name)
        except AttributeError:
            raise ValueError(f"bitdelta: parameter {name!r} is not in this {type(module).__name__}") from None
        if tuple(param.shape) != delta.shapes[name]:
            raise ValueError(
                f"bitdelta: parameter {name!r} has shape {tuple(param.shape)}, "
                f"the delta has {delta.shapes[name]}"
            )
        if not param.is_floating_point():
            raise ValueError(f"bitdelta: parameter {name!r} is {param.dtype}, not floating point")
        if id(param) in owner:
            raise ValueError(f"bitdelta: {name!r} and {owner[id(param)]!r} are the same (tied) parameter")
        owner[id(param)] = name
        params[name] = param
    return params


# --- scale distillation -------------------------------------------------------------------------

ForwardFn = Callable[[nn.Module, Any], Tensor]


def logits_of(output: Any) -> Tensor:
    """Logits from a forward's output: the tensor itself, a tuple's first element, or `.logits`."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"bitdelta: cannot find logits in a forward output of type {type(output).__name__}")


def forward_logits(model: nn.Module, x: Any) -> Tensor:
    """Default forward_fn: model(x), then `logits_of`."""
    return logits_of(model(x))


class _Forward(nn.Module):
    """Wraps model + forward_fn so torch.func.functional_call can run any forward_fn."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, x: Any) -> Tensor:
        return self.forward_fn(self.model, x)


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, then each submodule's own mode back."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Student:
    """base_model with base + scale * sign on the delta's matrices, run functionally.

    The base model's parameters are detached and never written, so no gradient or update
    reaches them; only the scales passed to `logits` are differentiable.
    """

    def __init__(self, base_model: nn.Module, delta: BitDelta, forward_fn: ForwardFn) -> None:
        params = _resolve(base_model, delta)
        canonical = {id(p): name for name, p in base_model.named_parameters()}
        self.wrapper = _Forward(base_model, forward_fn)
        self.base = {f"model.{name}": p.detach() for name, p in base_model.named_parameters()}
        self.keys = {name: f"model.{canonical[id(p)]}" for name, p in params.items()}
        self.signs = {  # dense +-1 in fp32: 4 bytes per delta weight while distilling
            name: unpack_signs(delta.signs[name].to(p.device), p.numel()).view(p.shape)
            for name, p in params.items()
        }

    def logits(self, scales: Mapping[str, Tensor], x: Any) -> Tensor:
        weights = dict(self.base)
        for name, key in self.keys.items():
            base = self.base[key]
            weights[key] = (base.float() + scales[name] * self.signs[name]).to(base.dtype)
        return torch.func.functional_call(self.wrapper, weights, (x,))


def _teacher_logits(teacher: nn.Module | Callable[[Any], Tensor], calibration: Sequence[Any],
                    forward_fn: ForwardFn) -> list[Tensor]:
    """Teacher logits for every calibration input, computed once. A module goes through
    forward_fn like the student; any other callable must return logits itself."""
    if not calibration:
        raise ValueError("bitdelta: the calibration set is empty")
    with torch.no_grad():
        if isinstance(teacher, nn.Module):
            with _eval_mode(teacher):
                return [forward_fn(teacher, x).detach().float() for x in calibration]
        return [teacher(x).detach().float() for x in calibration]


def distill_scales(
    base_model: nn.Module,
    delta: BitDelta,
    teacher: nn.Module | Callable[[Any], Tensor],
    calibration: Sequence[Any],
    config: BitDeltaConfig = BitDeltaConfig(),
    forward_fn: ForwardFn = forward_logits,
) -> tuple[BitDelta, list[float]]:
    """Tune the scales (signs fixed) so base + delta matches the teacher's logits.

    teacher: the fine-tuned model (run through forward_fn) or a function x -> logits.
    calibration: model inputs, e.g. (b, t) byte tensors; step i trains on calibration[i % len].
    Loss: mean squared error between student and teacher logits, as in the paper. Adam runs
    config.distill_steps steps on log(scale / initial scale) with lr config.distill_lr, scales
    clamped to config.max_scale. The base model is run in eval mode and left unchanged.
    Returns the distilled delta (same signs) and the loss of every step.
    """
    teacher_logits = _teacher_logits(teacher, calibration, forward_fn)
    student = _Student(base_model, delta, forward_fn)
    initial = {name: s.detach().float().to(student.signs[name].device) for name, s in delta.scales.items()}
    log_gains = {name: torch.zeros((), device=s.device, requires_grad=True) for name, s in initial.items()}
    optimizer = torch.optim.Adam(log_gains.values(), lr=config.distill_lr)

    def scales() -> dict[str, Tensor]:
        return {name: (initial[name] * log_gains[name].exp()).clamp(max=config.max_scale) for name in initial}

    losses = []
    with _eval_mode(base_model):
        for step in range(config.distill_steps):
            i = step % len(calibration)
            loss = F.mse_loss(student.logits(scales(), calibration[i]).float(), teacher_logits[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    with torch.no_grad():
        final = {name: s.detach().to(delta.scales[name].device) for name, s in scales().items()}
    return BitDelta(signs=dict(delta.signs), scales=final, shapes=dict(delta.shapes),
                    base_version=delta.base_version), losses


def distillation_loss(
    base_model: nn.Module,
    delta: BitDelta,
    teacher: nn.Module | Callable[[Any], Tensor],
    calibration: Sequence[Any],
    forward_fn: ForwardFn = forward_logits,
) -> float:
    """Mean over the calibration set of the logit MSE that `distill_scales` minimises."""
    teacher_logits = _teacher_logits(teacher, calibration, forward_fn)
    student = _Student(base_model, delta, forward_fn)
    scales = {name: s.float().to(student.signs[name].device) for name, s in delta.scales.items()}
    with torch.no_grad(), _eval_mode(base_model):
        losses = [F.mse_loss(student.logits(scales, x).float(), t).item()
                  for x, t in zip(calibration, teacher_logits)]
    return sum(losses) / len(losses)


def build_bitdelta(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    calibration: Sequence[Any],
    base_version: str,
    config: BitDeltaConfig = BitDeltaConfig(),
    forward_fn: ForwardFn = forward_logits,
) -> tuple[BitDelta, list[float]]:
    """select -> compress -> distill: the delta of finetuned_model against base_model."""
    names = select_matrices(base_model, config)
    delta = compress(base_model.state_dict(), finetuned_model.state_dict(), names, base_version)
    return distill_scales(base_model, delta, finetuned_model, calibration, config, forward_fn)
