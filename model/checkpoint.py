"""Weights as safetensors plus a JSON sidecar; never pickle.

The tensors are the model's state dict; the sidecar (and the safetensors metadata) records the
ModelConfig, so a checkpoint can rebuild its model and refuse to load into another shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.lm import ReverieLM


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def weights(model: ReverieLM) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}


def load_weights(model: ReverieLM, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                 assign: bool = False) -> None:
    """Copy `tensors` into `model`, naming missing, extra or mis-shaped tensors in the error.
    assign: the model was built on the meta device and takes `tensors` as its parameters, no copy
    (a live model, whose parameters a CUDA graph may hold, is copied into)."""
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source} does not match this model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}; was it saved by another version of Reverie?")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, this model "
                                  f"expects {tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor {name} contains NaN or inf; use an earlier checkpoint")
    model.load_state_dict(tensors, assign=assign)


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_checkpoint(model: ReverieLM, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write `path` (.safetensors) and its JSON sidecar {config, **info}, each atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(weights(model), str(tmp), metadata={"model_config": model.config.to_json()})
    tmp.replace(path)
    sidecar = {"config": model.config.to_dict(), **(info or {})}
    tmp_json = sidecar_path(path).with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    tmp_json.replace(sidecar_path(path))
    return path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(sidecar_path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no sidecar {sidecar_path(path)}; it records the "
                              f"model config, so copy it together with the weights") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"sidecar {sidecar_path(path)} is not valid JSON ({error})") from error


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None,
                    device: str | torch.device = "cpu") -> tuple[ReverieLM, dict[str, Any]]:
    """Rebuild the model saved at `path`. If `expect` is given, refuse a checkpoint of another config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one with `reverie train`")
    info = read_sidecar(path)
    config = ModelConfig.from_dict(info["config"])
    if expect is not None and config != expect:
        raise CheckpointError(f"checkpoint {path} was saved for a different model: "
                              f"{', '.join(expect.diff(config))} (checkpoint vs this model)")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({error}); "
                              f"restore it or train again") from error
    with torch.device("meta"):  # the random initialisation the weights replace was most of a load
        model = ReverieLM(config)
    load_weights(model, tensors, source=f"checkpoint {path}", assign=True)
    return model, info
