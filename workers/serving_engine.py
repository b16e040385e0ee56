"""What one serving replica does, without Ray: model versions, per-user fast state, deltas, the log.

`ServingEngine.serve_batch` takes validated requests from many users and answers them with as few
`generate_batch` calls as possible. The Serve deployment in `workers.serving` only routes and
batches; everything here runs (and is tested) in a plain process.

Durability contract (what a crash can lose):
- The experience log is flushed after every batch, before the replies are sent: a turn whose
  client saw a reply is in the log, so the night's sleep learns it whatever happens next.
- A user's FastState is saved to the fast-state store behind the replies, at most once per
  `save_interval_s` (default 1 s) per user, with their newest state (workers/state_saver.py:
  a user idle for longer is saved right after the turn; one who takes several turns within the
  interval is saved once). Saving every turn cost two atomic writes per user and turn on the cores
  that serve (bench/serve_load.py measures what learning still costs). A replica that dies
  therefore loses at most the last `save_interval_s` of its users' fast-memory updates, plus the
  saves in flight; their turns are in the log, so the night's sleep still learns them.
  `save_interval_s: 0` saves after every turn. Saves of one user land in order; `flush` saves a
  user's pending state at once and waits, and `GET /v1/users/{id}` reports only saved state.
- The in-memory LRU caches the saved states. Each user's turn count is also written to a small
  marker (`serving/turns/<user>.json`), read on every turn: if Serve ever routes a user to a
  second replica, the first one notices its cached copy is stale and reloads it from the store
  before its next turn, so the two copies do not drift apart. A user whose save is still in
  flight here is served from the cache; a user's state is read back from the store only after
  their saves here have finished.
- Serve's sticky routing is best effort: a busy replica, or a router that has not yet heard which
  replica holds a user, sends the call elsewhere. That replica reads the store, which can lag the
  one holding the user by up to `save_interval_s`: `GET /v1/users/{id}` answered there reports
  the older saved state, and a turn taken there starts from it, so the fast-memory updates of the
  other replica's unsaved turns are lost, as in a crash (the turns are in the log).

Hot-swap: the registry's `current` pointer is polled between batches (at most every
`poll_interval_s`); a new version is loaded between batches, so no request is dropped and each
reply names the version that produced it. States built on an older version are soft-reset
(`FastState.soft_reset(soft_reset_keep)`) the next time they are used, as DESIGN.md prescribes
after a sleep: what they held now lives in the weights. A version of another architecture (a
sleep that distilled into the search's best genome) starts every state empty instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from model.adaptive import complexity
from model.bitdelta import BitDelta, apply_delta, remove_delta
from model.consolidation import DenseDelta, stored_delta
from model.checkpoint import load_checkpoint, load_weights, weights
from model.config import ModelConfig, config_of_manifest, preset
from model.decode_graph import DecodeGraphs
from model.fast_state import FastState
from model.generate import GenerationConfig, generate_batch
from model.lm import ReverieLM
from storage.checkpoints import CheckpointRegistry
from storage.config import StorageConfig
from storage.deltas import DeltaStore
from storage.errors import ConflictError, NotFoundError
from storage.experience import ExperienceRecord, ExperienceWriter, WriterConfig
from storage.fast_states import FastStateStore
from storage.uri import Store, encode_component, open_store
from workers.serving_api import GenerateRequest, ServingLimits, generate_response
from workers.state_saver import PendingSave, StateSaver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    """One replica's settings; `from_dict` reads the `args` of infra/serve.yaml."""

    data_root: str | None = None  # None: REVERIE_DATA (StorageConfig.from_env)
    preset: str = "tiny"  # model for a fresh registry, when no trained checkpoint exists
    users_per_replica: int = 256  # LRU bound on resident fast states
    save_interval_s: float = 1.0  # a user's fast state is saved at most this often (0: after every turn)
    save_threads: int = 2  # threads saving states behind the replies (more for a slow store, e.g. S3)
    poll_interval_s: float = 0.5  # how often the registry's `current` is checked
    soft_reset_keep: float = 0.5  # memory strength kept across a promotion
    delta_ttl_s: float = 10.0  # how long a user's (absent) delta lookup is cached
    torch_threads: int = 1
    device: str = "cpu"  # "cuda" (or "cuda:1") serves from a GPU; states are stored from the CPU either way
    cuda_graphs: bool = True  # on a GPU, decode through captured steps (model/decode_graph.py), one per batch bucket
    limits: ServingLimits = field(default_factory=ServingLimits)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ServingConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serving settings {unknown}; known: {sorted(known)}")
        if isinstance(values.get("limits"), dict):
            values["limits"] = ServingLimits(**values["limits"])
        return cls(**values)

    def storage(self) -> StorageConfig:
        config = StorageConfig.from_env()
        if self.data_root:
            config = replace(config, root=self.data_root)
        return config


# --- model versions ---------------------------------------------------------------------------


def _local_root(storage: StorageConfig) -> Path | None:
    parsed = urlparse(storage.root)
    return Path(parsed.path) if parsed.scheme == "file" else None


def ensure_current_version(registry: CheckpointRegistry, storage: StorageConfig, preset_name: str) -> str:
    """The registry's current version; on an empty registry, register and promote a first one.

    The first version is `<data root>/train/<preset>.safetensors` (what `reverie train` writes) if
    it exists, else a freshly initialised model (seed 0). Replicas racing here agree: one promote wins.
    """
    current = registry.current()
    if current is not None:
        return current
    root = _local_root(storage)
    trained = root / "train" / f"{preset_name}.safetensors" if root else None
    if trained is not None and trained.exists():
        model, info = load_checkpoint(trained)
        source = str(trained)
    else:
        torch.manual_seed(0)
        model, info, source = ReverieLM(preset(preset_name)), {}, "fresh-init"
    manifest = {"config": model.config.to_dict(), "preset": preset_name, "source": source,
                "heldout_bpb": info.get("heldout_bpb")}
    version = registry.save(weights(model), manifest, parent=None)
    try:
        registry.promote(version, expected_current=None)
    except ConflictError:
        log.info("another replica promoted the first version first; using it")
    current = registry.current()
    assert current is not None
    return current


# --- per-user fast state ----------------------------------------------------------------------


@dataclass
class UserSlot:
    """One resident user: the state and the slow-weights version it was built on."""

    user_id: str
    state: FastState  # batch of 1
    version: str
    turns: int = 0  # learning turns since the last reset
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class UserStates:
    """A bounded LRU of user states over the fast-state store (saved behind the replies; see module docstring)."""

    MARKERS = "serving/turns"

    def __init__(self, store: Store, capacity: int, device: str = "cpu", save_interval_s: float = 1.0,
                 save_threads: int = 2) -> None:
        if capacity < 1:
            raise ValueError(f"users_per_replica must be >= 1, got {capacity}")
        self.store = store
        self.states = FastStateStore(store)
        self.capacity = capacity
        self.device = device
        self.saver = StateSaver(self._save, save_interval_s, save_threads)
        self._slots: OrderedDict[str, UserSlot] = OrderedDict()
        self.loads = 0  # reads of a state from the store (cache misses and stale copies)

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def _marker(self, user_id: str) -> str:
        return f"{self.MARKERS}/{encode_component(user_id)}.json"

    def _stored_turns(self, user_id: str) -> int:
        try:
            return int(json.loads(self.store.read_bytes(self._marker(user_id)))["turns"])
        except NotFoundError:
            return 0
        except (ValueError, KeyError, TypeError):
            return -1  # unreadable marker: trust the store's blob, not the cache

    def get(self, user_id: str, config: ModelConfig, version: str, keep: float) -> UserSlot:
        """The user's slot, loaded from the store on a miss or when the cached copy is stale."""
        slot = self._slots.get(user_id)
        if slot is None or (not self.saver.busy(user_id) and slot.turns != self._stored_turns(user_id)):
            self.flush(user_id)
            slot = self._load(user_id, config, version)
            self._slots[user_id] = slot
        self._slots.move_to_end(user_id)
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)  # its newest state is saved or pending in the saver: only the copy goes
        if slot.version != version:
            slot.state = slot.state.after_promotion(config, keep)
            slot.version = version
        return slot

    def _load(self, user_id: str, config: ModelConfig, version: str) -> UserSlot:
        self.loads += 1
        found = self.states.load(user_id)
        if found is None:
            return UserSlot(user_id, FastState.empty(config, 1, device=self.device), version)
        tensors, meta = found
        try:
            state = FastState(**tensors)
            state.validate(config)
        except (TypeError, ValueError) as error:
            log.warning("fast state of %r does not fit the current model (%s); starting it empty", user_id, error)
            return UserSlot(user_id, FastState.empty(config, 1, device=self.device), version)
        state = state.to(self.device)
        return UserSlot(user_id, state, str(meta["base_version"]), int(meta.get("turns", 0)))

    def _save(self, user_id: str, pending: PendingSave) -> None:
        row = pending.state.rows(slice(pending.row, pending.row + 1))
        tensors = {k: v.detach().contiguous() for k, v in row.tensors().items()}
        self.states.save(user_id, tensors, {"base_version": pending.version, "turns": pending.turns})
        self.store.write_bytes(self._marker(user_id), json.dumps({"turns": pending.turns}).encode())

    def save_behind(self, slots: list[UserSlot], on_host: FastState) -> None:
        """Hand each slot as it is now to the saver (coalesced per user; see workers.state_saver) and return.
        on_host: the slots' states as one batch in CPU memory (one device-to-host copy per batch, made
        by the caller; save threads copying rows from a GPU would queue behind the next batch's kernels)."""
        for i, slot in enumerate(slots):
            self.saver.submit(slot.user_id, PendingSave(on_host, slot.version, slot.turns, row=i))

    def flush(self, user_id: str | None = None) -> None:
        """Save the user's (or everyone's) pending state now and wait; raises the error of a failed save (once)."""
        self.saver.flush(user_id)

    def close(self) -> None:
        """Save what is pending and stop the save threads."""
        self.saver.close()

    def reset(self, user_id: str) -> None:
        """Forget the user everywhere: the resident copy, the stored state, the marker."""
        self.saver.discard(user_id)
        self._slots.pop(user_id, None)
        self.states.delete(user_id)
        self.store.delete(self._marker(user_id))

    def evict(self, user_id: str) -> None:
        """Drop the resident copy only (tests and memory pressure); the stored state stays."""
        self._slots.pop(user_id, None)


def _copy_rows_into(slots: list[UserSlot], state: FastState) -> None:
    """Row i of `state` into slot i's own tensors, by foreach copies: a clone per user and tensor
    was 16 launches a user on a GPU, a visible part of what learning cost a served batch. One call
    per dtype: the fused multi-tensor copy takes lists of one dtype, and falls back to a copy per
    tensor otherwise. Each slot owns its tensors (loaded, empty, soft-reset or copied there), so
    nothing else sees them change."""
    by_dtype: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name, tensor in state.tensors().items():
        targets, sources = by_dtype.setdefault(tensor.dtype, ([], []))
        targets.extend(getattr(slot.state, name) for slot in slots)
        sources.extend(tensor.split(1))
    for targets, sources in by_dtype.values():
        torch._foreach_copy_(targets, sources)


def _batch_on_host(state: FastState) -> FastState:
    """The batch's states in host memory, for the saver. From a GPU: into pinned memory, every
    tensor's copy queued at once and one wait for all (a pageable copy waits and goes through a
    bounce buffer each; `base` moves 8.8 MB a user)."""
    if state.pos.device.type != "cuda":
        return state.to("cpu")
    on_host = state.map(lambda t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True))
    torch.cuda.current_stream(state.pos.device).synchronize()
    return on_host


# --- the engine -------------------------------------------------------------------------------


class ServingEngine:
    """Model + user states + deltas + experience log of one replica. Thread-safe (one lock)."""

    def __init__(self, config: ServingConfig = ServingConfig(), replica_id: str = "local") -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.replica_id = replica_id
        storage = config.storage()
        self.store = open_store(storage.root, storage)
        self.registry = CheckpointRegistry(self.store)
        self.deltas = DeltaStore(self.store)
        root = _local_root(storage)
        spool = str(root / ".spool") if root else storage.spool_dir
        self.writer = ExperienceWriter(self.store, WriterConfig(spool_dir=spool, flush_age_s=5.0))
        self._lock = threading.RLock()
        self._delta_cache: dict[str, tuple[float, BitDelta | DenseDelta | None]] = {}
        self.version = ""
        self.model: ReverieLM | None = None
        self.decode_graphs: DecodeGraphs | None = None
        self._load_version(ensure_current_version(self.registry, storage, config.preset))
        self.states = UserStates(self.store, config.users_per_replica, config.device, config.save_interval_s,
                                 config.save_threads)
        self._checked_at = time.monotonic()
        self.served = {"batches": 0, "requests": 0, "busy_s": 0.0}  # since start: batch sizes and utilisation

    # -- versions ------------------------------------------------------------------------------
    def _load_version(self, version: str) -> None:
        tensors, manifest = self.registry.load(version)
        model_config = config_of_manifest(manifest, self.config.preset)
        if self.model is None or self.model.config != model_config:
            self.model = ReverieLM(model_config).to(self.config.device).eval()
            on_gpu = self.config.cuda_graphs and torch.device(self.config.device).type == "cuda"
            self.decode_graphs = DecodeGraphs(self.model) if on_gpu else None
        load_weights(self.model, tensors, source=f"checkpoint {version}")
        self.version = version
        self._delta_cache.clear()
        log.info("replica %s now serves %s", self.replica_id, version)

    def maybe_swap(self, force: bool = False) -> str:
        """Switch to the registry's current version if it moved; call only between batches."""
        with self._lock:
            now = time.monotonic()
            if force or now - self._checked_at >= self.config.poll_interval_s:
                self._checked_at = now
                current = self.registry.current()
                if current is not None and current != self.version:
                    self._load_version(current)
            return self.version

    # -- deltas --------------------------------------------------------------------------------
    def _user_delta(self, user_id: str) -> BitDelta | DenseDelta | None:
        cached = self._delta_cache.get(user_id)
        if cached is not None and time.monotonic() - cached[0] < self.config.delta_ttl_s:
            return cached[1]
        found = self.deltas.load_user_delta(user_id, self.version)
        delta = stored_delta(*found) if found is not None else None
        if len(self._delta_cache) >= self.config.users_per_replica:
            self._delta_cache.clear()
        self._delta_cache[user_id] = (time.monotonic(), delta)
        return delta

    # -- requests ------------------------------------------------------------------------------
    def serve_batch(self, requests: list[GenerateRequest]) -> list[dict[str, Any] | Exception]:
        """One reply (or the exception that stopped it) per request, in order."""
        with self._lock:
            started = time.perf_counter()
            self.maybe_swap()
            results: list[dict[str, Any] | Exception | None] = [None] * len(requests)
            for group in self._groups(requests):
                try:
                    replies = self._serve_group([requests[i] for i in group])
                except Exception as error:  # one bad group (e.g. a corrupt delta) fails only itself
                    log.exception("serving %d request(s) failed", len(group))
                    replies = [error] * len(group)
                for i, reply in zip(group, replies):
                    results[i] = reply
            try:
                self.writer.flush()
            except Exception as error:  # not logged durably: the turns must not be acknowledged
                results = [error] * len(requests)
            self.served["batches"] += 1
            self.served["requests"] += len(requests)
            self.served["busy_s"] += time.perf_counter() - started
            return results  # type: ignore[return-value]

    def _groups(self, requests: list[GenerateRequest]) -> list[list[int]]:
        """Indices that can share one generate_batch: same settings, same delta, distinct users."""
        groups: list[list[int]] = []
        keys: list[tuple] = []
        for i, request in enumerate(requests):
            delta_owner = request.user_id if self._user_delta(request.user_id) is not None else None
            key = (request.max_new_bytes, request.temperature, request.learn, delta_owner)
            for group, group_key in zip(groups, keys):
                if group_key == key and all(requests[j].user_id != request.user_id for j in group):
                    group.append(i)
                    break
            else:
                groups.append([i])
                keys.append(key)
        return groups

    def _serve_group(self, requests: list[GenerateRequest]) -> list[dict[str, Any]]:
        assert self.model is not None
        first = requests[0]
        slots = [self.states.get(r.user_id, self.model.config, self.version, self.config.soft_reset_keep)
                 for r in requests]
        generation = GenerationConfig(max_new_bytes=first.max_new_bytes, temperature=first.temperature,
                                      learn=first.learn)
        delta = self._user_delta(first.user_id)
        handle = apply_delta(self.model, delta, base_version=self.version) if delta is not None else None
        try:
            outputs, state = generate_batch(self.model, [r.prompt for r in requests],
                                            FastState.cat([s.state for s in slots]), generation, self.decode_graphs)
        finally:
            if handle is not None:
                remove_delta(self.model, handle)
        if first.learn:  # learn=false reads the users' memory but leaves it as it was
            _copy_rows_into(slots, state)
            for slot in slots:
                slot.turns += 1
            self.states.save_behind(slots, _batch_on_host(state))
        replies = []
        for request, slot, output in zip(requests, slots, outputs):
            record = ExperienceRecord(user_id=request.user_id, session_id=slot.session_id, prompt=request.prompt,
                                      response=output.response, model_version=self.version,
                                      surprise=float(output.metrics["surprise_bits"]))
            self.writer.append(record)
            metrics = dict(output.metrics, batch_size=len(requests))
            if metrics.get("complexity") != metrics.get("complexity"):  # NaN: no adaptive depth policy
                metrics["complexity"] = complexity(request.prompt)
            replies.append(generate_response(output.response, self.version, metrics, record.event_id))
        return replies

    def reset(self, user_id: str) -> dict[str, Any]:
        with self._lock:
            self.states.reset(user_id)
            return {"user_id": user_id, "reset": True}

    def user_info(self, user_id: str) -> dict[str, Any]:
        """Sizes and counters of the user's state; never its contents."""
        with self._lock:
            assert self.model is not None
            self.states.flush(user_id)  # report what is saved, not what a crash could still lose
            resident = user_id in self.states
            slot = self.states.get(user_id, self.model.config, self.version, self.config.soft_reset_keep)
            return {"user_id": user_id, "model_version": self.version, "state_version": slot.version,
                    "turns": slot.turns, "resident": resident, "replica": self.replica_id,
                    "has_delta": self._user_delta(user_id) is not None, **slot.state.write_counts()}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self.version, "replica": self.replica_id,
                "resident_users": len(self.states), "served": dict(self.served)}

    def close(self) -> None:
        self.states.close()
        self.writer.close()
