"""The ClientApp: what runs on a user's device (a SuperNode).

train:    weights of this round + recipe in; fine-tune on the device's own bytes; reply with the
          BitDelta only (packed sign bits + one scale per matrix) and a few metrics. Raw text,
          dense weights and gradients never leave the device.
evaluate: held-out bits per byte of the weights it was sent, on the device's held-out bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.attacks import corrupt, parse_attackers
from federation.data import device_corpus
from federation.settings import FederationSettings
from federation.task import Recipe, build_model, heldout_bpb, local_update
from federation.wire import to_wire
from model.corpus import Corpus

DELTA = "delta"  # reply ArrayRecord: the wire arrays of federation.wire
UPDATE = "update"  # reply ConfigRecord: which round and which weights the delta is against
METRICS = "metrics"


def build(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; `overrides` are run-config values (used by simulations, whose run config is empty)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        config = msg.content["config"]
        recipe = Recipe.from_config(config)
        server_round, version = int(config["server-round"]), str(config["model-version"])
        torch.manual_seed(recipe.seed + server_round)
        model = build_model(recipe.model_config, msg.content["arrays"].to_torch_state_dict())
        update = local_update(model, _corpus(context, settings), recipe, version, server_round)
        arrays, claimed_round = to_wire(update.delta, update.names), server_round
        attack = _attack(context, settings)
        if attack:
            arrays, claimed_round = corrupt(arrays, attack, server_round, recipe.max_scale)
        metrics = {**update.metrics, "partition-id": float(context.node_config.get("partition-id", -1))}
        content = RecordDict({
            DELTA: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            UPDATE: ConfigRecord({"server-round": claimed_round, "model-version": version}),
            METRICS: MetricRecord(metrics),
        })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings = _settings(context, overrides)
        config = msg.content["config"]
        model = build_model(str(config["model-config"]), msg.content["arrays"].to_torch_state_dict())
        corpus = _corpus(context, settings)
        metrics = {"num-examples": len(corpus.heldout),
                   "heldout-bpb": heldout_bpb(model, corpus, int(config["seq-len"]))}
        return Message(content=RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


def _settings(context: Context, overrides: Mapping[str, Any] | None) -> FederationSettings:
    return FederationSettings.from_run_config({**context.run_config, **(overrides or {})})


def _corpus(context: Context, settings: FederationSettings) -> Corpus:
    return device_corpus(dict(context.node_config), settings.client_bytes, settings.seed)


def _attack(context: Context, settings: FederationSettings) -> str | None:
    if not settings.attackers or "partition-id" not in context.node_config:
        return None
    return parse_attackers(settings.attackers).get(int(context.node_config["partition-id"]))


app = build()
