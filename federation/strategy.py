"""The Flower strategy: FedAvg's round structure with BitDelta updates, validation and robust aggregation.

Per round:
    configure_train     send the current weights, their version and the recipe to sampled devices
    aggregate_train     validate every reply (federation.validation), log each rejection with the
                        client and the reason, aggregate the survivors robustly
                        (federation.aggregation), log each bounded outlier, add the aggregate to
                        the weights and to the run's running total
    configure_evaluate  send the new weights
    aggregate_evaluate  mean held-out bits per byte on the devices' own held-out text

FedAvg's own reply checks are not used: they drop a whole round when one reply is malformed,
where we drop only that reply and say why.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from federation import LOGGER_NAME
from federation.aggregation import RobustConfig, aggregate
from federation.client_app import DELTA, METRICS, UPDATE
from federation.settings import FederationSettings
from federation.store import Base
from federation.task import Recipe, build_model, matrix_shapes, round_version
from federation.validation import ArraySpec, RoundExpectation, UpdateRejected, validate_update
from model.bitdelta import BitDelta

log = logging.getLogger(LOGGER_NAME)

TRAIN_MEANS = ("heldout-bpb-before", "heldout-bpb-dense", "heldout-bpb-bitdelta", "upload-bytes", "device-seconds")


@dataclass
class RoundReport:
    """Everything the server learned in one round; goes to the logs, the summary and the delta store."""

    server_round: int
    model_version: str
    sampled: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)  # client, code, reason
    bounded: list[dict[str, str]] = field(default_factory=list)  # client, reason
    train: dict[str, float] = field(default_factory=dict)  # means over accepted devices
    aggregate_norm: float = 0.0
    clip_bound: float | None = None
    noise_multiplier: float = 0.0
    noise_std: float = 0.0
    heldout_bpb: float | None = None  # after the round, mean over evaluating devices
    seconds: float = 0.0


class RobustBitDelta(FedAvg):
    """See the module docstring. `total` holds the sum of this run's applied aggregates."""

    def __init__(self, settings: FederationSettings, base: Base, run_tag: str) -> None:
        super().__init__(fraction_train=settings.fraction_train, fraction_evaluate=settings.fraction_evaluate,
                         min_train_nodes=settings.min_clients, min_evaluate_nodes=settings.min_clients,
                         min_available_nodes=settings.min_clients)
        self.settings, self.base, self.run_tag = settings, base, run_tag
        self.shapes = matrix_shapes(build_model(base.config, base.weights), settings.select)
        self.recipe = Recipe(model_config=base.config.to_json(), local_steps=settings.local_steps,
                             local_lr=settings.local_lr, batch_size=settings.batch_size, seq_len=settings.seq_len,
                             select=settings.select, distill_steps=settings.distill_steps,
                             max_scale=settings.scale_bound, seed=settings.seed)
        self.robust = RobustConfig(method=settings.aggregation, clip_norm=settings.clip_norm,
                                   trim_fraction=settings.trim_fraction, outlier_ratio=settings.outlier_ratio,
                                   dp_noise_multiplier=settings.dp_noise_multiplier)
        self.total = {name: torch.zeros(shape) for name, shape in self.shapes.items()}
        self.reports: list[RoundReport] = []
        self._weights: dict[str, torch.Tensor] = {}
        self._expect: RoundExpectation | None = None
        self._started = 0.0
        self.initial_heldout_bpb: float | None = None

    def summary(self) -> None:
        super().summary()
        log.info("\t└──> Reverie: base %s, %d matrices, aggregation %s, max scale %g, DP noise multiplier %g",
                 self.base.version, len(self.shapes), self.robust.method, self.settings.scale_bound,
                 self.robust.dp_noise_multiplier)

    # -- train ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        version = round_version(self.base.version, self.run_tag, server_round)
        self._weights = arrays.to_torch_state_dict()
        self._expect = RoundExpectation(server_round=server_round, model_version=version, shapes=self.shapes,
                                        max_scale=self.settings.scale_bound,
                                        max_upload_bytes=self.settings.max_upload_bytes)
        nodes = self._sample(grid, self.fraction_train, server_round)
        self.reports.append(RoundReport(server_round=server_round, model_version=version, sampled=len(nodes)))
        log.info("round %d: sending weights %s to %d devices", server_round, version, len(nodes))
        config = ConfigRecord({**config, **self.recipe.to_config(), "server-round": server_round,
                               "model-version": version})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self.reports[-1]
        accepted, clients, metrics = [], [], []
        for msg in replies:
            client = _client(msg)
            if msg.has_error():
                report.rejected.append({"client": client, "code": "error", "reason": msg.error.reason})
                log.warning("round %d: no update from client %s: it failed (%s)", server_round, client,
                            msg.error.reason)
                continue
            try:
                accepted.append(self._validate(msg))
            except UpdateRejected as rejection:
                report.rejected.append({"client": client, "code": rejection.code, "reason": str(rejection)})
                log.warning("round %d: rejected update from client %s: %s: %s", server_round, client,
                            rejection.code, rejection)
                continue
            clients.append(client)
            metrics.append(msg.content[METRICS])
        report.accepted = clients
        if not accepted:
            log.warning("round %d: no update passed validation (%d rejected); weights unchanged",
                        server_round, len(report.rejected))
            return None, MetricRecord({"accepted": 0, "rejected": len(report.rejected)})
        generator = torch.Generator().manual_seed(self.settings.seed * 1000 + server_round)
        result = aggregate(accepted, self.robust, generator)
        for outlier in result.outliers:
            report.bounded.append({"client": clients[outlier.index], "reason": outlier.reason})
            log.warning("round %d: bounded update from client %s (%s): %s", server_round, clients[outlier.index],
                        self.robust.method, outlier.reason)
        lr = self.settings.server_lr
        for name, delta in result.delta.items():
            self._weights[name] = self._weights[name] + lr * delta.to(self._weights[name].dtype)
            self.total[name] += lr * delta
        report.train = {key: _mean([m.get(key) for m in metrics]) for key in TRAIN_MEANS}
        report.aggregate_norm, report.clip_bound = result.norm, result.bound
        report.noise_multiplier, report.noise_std = result.noise_multiplier, result.noise_std
        log.info("round %d: aggregated %d updates (%d rejected, %d bounded) with %s: norm %.4g, "
                 "DP noise multiplier %g (std %.3g)", server_round, len(accepted), len(report.rejected),
                 len(report.bounded), self.robust.method, result.norm, result.noise_multiplier, result.noise_std)
        round_metrics = MetricRecord({"accepted": len(accepted), "rejected": len(report.rejected),
                                      "bounded": len(report.bounded), "aggregate-norm": result.norm,
                                      "noise-multiplier": result.noise_multiplier, "noise-std": result.noise_std,
                                      **report.train})
        return ArrayRecord(self._weights), round_metrics

    def _validate(self, msg: Message) -> BitDelta:
        """The reply's BitDelta, or UpdateRejected (federation.validation does the checks)."""
        content = msg.content
        if set(content.array_records) != {DELTA} or UPDATE not in content.config_records \
                or METRICS not in content.metric_records:
            raise UpdateRejected("malformed", f"reply records are {sorted(content.keys())}, expected "
                                              f"{sorted((DELTA, UPDATE, METRICS))}")
        arrays, update = content[DELTA], content[UPDATE]
        specs = {key: ArraySpec(str(a.dtype), tuple(a.shape), len(a.data)) for key, a in arrays.items()}
        return validate_update(update.get("server-round"), update.get("model-version"), specs,
                               lambda: {key: a.numpy() for key, a in arrays.items()}, self._expect)

    # -- evaluate ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, server_round + 10_000)
        config = ConfigRecord({**config, "server-round": server_round, "model-config": self.recipe.model_config,
                               "seq-len": self.recipe.seq_len})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        report = self.reports[-1]
        report.heldout_bpb = self._heldout(server_round, replies)
        report.seconds = time.perf_counter() - self._started
        if report.heldout_bpb is None:
            return None
        log.info("round %d: held-out bits per byte on the devices: %.4f (round took %.1f s)", server_round,
                 report.heldout_bpb, report.seconds)
        return MetricRecord({"heldout-bpb": report.heldout_bpb})

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord) -> float | None:
        """Held-out bits per byte of the base weights on the devices, before round 1 (the baseline)."""
        replies = grid.send_and_receive(self.configure_evaluate(0, arrays, ConfigRecord(), grid),
                                        timeout=self.settings.round_timeout)
        self.initial_heldout_bpb = self._heldout(0, replies)
        if self.initial_heldout_bpb is not None:
            log.info("round 0: held-out bits per byte of base %s on the devices: %.4f", self.base.version,
                     self.initial_heldout_bpb)
        return self.initial_heldout_bpb

    def _heldout(self, server_round: int, replies: Iterable[Message]) -> float | None:
        """Mean held-out bits per byte over the replies, weighted by held-out bytes; junk replies skipped."""
        values, weights = [], []
        for msg in replies:
            metrics = None if msg.has_error() else msg.content.metric_records.get(METRICS)
            bpb = None if metrics is None else metrics.get("heldout-bpb")
            count = None if metrics is None else metrics.get("num-examples")
            if not (isinstance(bpb, float) and math.isfinite(bpb) and isinstance(count, (int, float)) and count > 0):
                log.warning("round %d: ignoring evaluation from client %s: no finite heldout-bpb", server_round,
                            _client(msg))
                continue
            values.append(bpb)
            weights.append(float(count))
        return sum(v * w for v, w in zip(values, weights)) / sum(weights) if values else None

    # -- helpers -------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, salt: int) -> list[int]:
        """Wait (bounded by round-timeout) for min-clients SuperNodes, then sample a fraction of all."""
        deadline = time.monotonic() + self.settings.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} SuperNodes connected within {self.settings.round_timeout:g} s, "
                                   f"min-clients is {self.min_available_nodes}")
            log.info("waiting for SuperNodes: %d connected, min-clients is %d", len(nodes), self.min_available_nodes)
            time.sleep(1.0)
        size = min(len(nodes), max(int(len(nodes) * fraction), self.min_available_nodes))
        return random.Random(self.settings.seed * 100_003 + salt).sample(nodes, size)

    def report_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.reports]


def _client(msg: Message) -> str:
    """'node=<id> partition=<p>' — the node id is the SuperLink's; the partition is what the device says."""
    partition = "?"
    if not msg.has_error():
        metrics = msg.content.metric_records.get(METRICS)
        value = metrics.get("partition-id") if metrics is not None else None
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            partition = str(int(value))
    return f"node={msg.metadata.src_node_id} partition={partition}"


def _mean(values: list[object]) -> float:
    """Mean of the finite numbers among device-reported values (a device may report anything)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")
