"""What both sides of the app share: the model, the round's recipe, the device's local update.

Like `task.py` in Flower's quickstart: the ServerApp and ClientApp only translate messages; the
work they translate to lives here (and in `model.personalize` / `model.bitdelta`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass

import torch

from model.bitdelta import BitDelta, BitDeltaConfig, applied, compress, distill_scales, select_matrices
from model.config import ModelConfig
from model.consolidation import model_from
from model.corpus import Corpus, as_tensor, random_batch
from model.lm import ReverieLM
from model.personalize import PersonalizeConfig, personalize
from model.training import evaluate_bpb

EVAL_BATCHES = 4  # held-out batches per evaluation: a device evaluates in well under a second


@dataclass(frozen=True)
class Recipe:
    """What the server asks every device to do in one round (sent in the train ConfigRecord)."""

    model_config: str  # ModelConfig as JSON
    local_steps: int
    local_lr: float
    batch_size: int
    seq_len: int
    select: str
    distill_steps: int
    max_scale: float
    seed: int

    def to_config(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config) -> Recipe:
        return cls(**{f: config[f.replace("_", "-")] for f in cls.__dataclass_fields__})

    def personalize_config(self, server_round: int) -> PersonalizeConfig:
        return PersonalizeConfig(steps=self.local_steps, batch_size=self.batch_size, seq_len=self.seq_len,
                                 lr=self.local_lr, seed=self.seed + server_round)

    def bitdelta_config(self) -> BitDeltaConfig:
        return BitDeltaConfig(select=self.select, distill_steps=self.distill_steps, max_scale=self.max_scale)


def round_version(base_version: str, run_tag: str, server_round: int) -> str:
    """Version of the weights sent in `server_round`: the base itself in round 1, then base plus
    the aggregates of rounds 1..r-1 of this run. A delta against one of these is useless on any
    other, which is what makes replaying an old round's update detectable."""
    return base_version if server_round == 1 else f"{base_version}+fed-{run_tag}.{server_round - 1}"


def build_model(config: ModelConfig | str, weights: dict[str, torch.Tensor]) -> ReverieLM:
    if isinstance(config, str):
        config = ModelConfig.from_dict(json.loads(config))
    return model_from(config, weights).eval()


def matrix_shapes(model: ReverieLM, select: str) -> dict[str, tuple[int, ...]]:
    """The matrices a BitDelta of this model carries, in wire order, with their shapes."""
    return {n: tuple(model.get_parameter(n).shape) for n in select_matrices(model, BitDeltaConfig(select=select))}


def heldout_bpb(model: ReverieLM, corpus: Corpus, seq_len: int) -> float:
    return evaluate_bpb(model, corpus.heldout, seq_len, batch_size=8, max_batches=EVAL_BATCHES, amp=False)


@dataclass
class LocalUpdate:
    delta: BitDelta
    names: list[str]
    metrics: dict[str, float]


def local_update(model: ReverieLM, corpus: Corpus, recipe: Recipe, model_version: str,
                 server_round: int) -> LocalUpdate:
    """Fine-tune on the device's bytes, compress to a BitDelta against `model`, measure both.

    metrics: held-out bits per byte of the received weights ("heldout-bpb-before"), of the dense
    fine-tune ("heldout-bpb-dense") and of the weights plus the BitDelta ("heldout-bpb-bitdelta"),
    the upload size, the device's compute time, and the number of training bytes ("num-examples",
    Flower's weighting key).
    """
    started = time.perf_counter()
    bitdelta_config = recipe.bitdelta_config()
    names = select_matrices(model, bitdelta_config)
    before = heldout_bpb(model, corpus, recipe.seq_len)
    tuned_state = personalize(model, corpus.train, recipe.personalize_config(server_round), trainable=names)
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(tuned_state)
    tuned.eval()
    dense = heldout_bpb(tuned, corpus, recipe.seq_len)
    delta = compress(model.state_dict(), tuned_state, names, model_version)
    if recipe.distill_steps:
        generator = torch.Generator().manual_seed(recipe.seed + 7919 * server_round)
        data = as_tensor(corpus.train)
        calibration = [random_batch(data, 4, recipe.seq_len, generator)[0] for _ in range(4)]
        delta, _ = distill_scales(model, delta, tuned, calibration, bitdelta_config)
    with applied(model, delta):
        compressed = heldout_bpb(model, corpus, recipe.seq_len)
    metrics = {
        "num-examples": len(corpus.train),
        "heldout-bpb-before": before,
        "heldout-bpb-dense": dense,
        "heldout-bpb-bitdelta": compressed,
        "upload-bytes": float(delta.nbytes),
        "dense-fp16-bytes": float(delta.dense_fp16_nbytes),
        "device-seconds": time.perf_counter() - started,
    }
    return LocalUpdate(delta=delta, names=names, metrics=metrics)
