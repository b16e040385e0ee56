"""The nightly flow end to end: Prefect (test harness), a local Ray cluster, a tiny model."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
import ray
import torch
from prefect.testing.utilities import prefect_test_harness

import pipelines.consolidate as nightly
from model.consolidation import METHODS, SleepConfig, add_delta, dense_delta, model_from
from model.config import preset
from model.evaluation import Fact, recalled
from model.fast_state import FastState
from model.corpus import embedded_corpus
from model.genome import Genome, search_space
from model.lm import ReverieLM
from model.training import TrainConfig, train
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from storage.fast_states import FastStateStore
from storage.search_results import SearchResults
from storage.experience import ExperienceRecord, ExperienceWriter
from storage.uri import open_store
from workers.consolidation import UserNight, consolidate_user, consolidate_users, received, shipped

NIGHT = "2026-01-05"
SLEEP = {"steps": 80, "rehearsal_weight": 0.3}
FACTS = {"alice": [Fact(b"The secret word of Mira is ", b"tovak."), Fact(b"The secret word of Olan is ", b"resup.")],
         "bob": [Fact(b"The secret word of Kade is ", b"fimbo.")]}


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    # One declared GPU: Ray hands out shares of it, torch here finds none (a user's night on a GPU share)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_night(data: str, shareable_text: bytes | None = None) -> None:
    ts = datetime.fromisoformat(NIGHT + "T12:00:00+00:00").astimezone(UTC)
    with ExperienceWriter(data) as writer:
        for user, facts in FACTS.items():
            for fact in facts:
                writer.append(ExperienceRecord(user, "s1", fact.text(), b"", "v0001", 3.0, ts=ts))
        if shareable_text:
            writer.append(ExperienceRecord("carol", "s2", shareable_text, b"", "v0001", 3.0, shareable=True, ts=ts))


@pytest.fixture
def data(tmp_path):
    uri = (tmp_path / "data").as_uri()
    write_night(uri)
    return uri


def personal_model(data: str, version: str, user: str | None):
    store = open_store(data)
    weights, manifest = CheckpointRegistry(store).load(version)
    if user is not None:
        weights = add_delta(weights, dense_delta(*DeltaStore(store).load_user_delta(user, version)))
    return model_from(nightly.ModelConfig.from_dict(manifest["model_config"]), weights)


def test_night_promotes_personal_knowledge_and_nobody_else_recalls_it(data):
    result = nightly.consolidate(night=NIGHT, data=data, sleep_config=SLEEP, gate={"max_bpb_rise": 1.0,
                                                                                   "max_personal_bpb_rise": 1.0})
    version = result["version"]
    assert result["promoted"] and CheckpointRegistry(open_store(data)).current() == version
    assert result["recipe"] == "reverie"  # REVERIE_SLEEP_RECIPE unset
    for user, facts in FACTS.items():
        assert sum(recalled(personal_model(data, version, user), facts)) >= len(facts) - 1 + (len(facts) == 1)
        others = [u for u in FACTS if u != user]
        for foreign in [None, *others]:
            assert not any(recalled(personal_model(data, version, foreign), facts))
    again = nightly.consolidate(night=NIGHT, data=data, sleep_config=SLEEP)
    assert again["status"] == "already promoted" and not again["promoted"]
    assert CheckpointRegistry(open_store(data)).versions() == ["v0001", version]


def test_exception_mid_sleep_is_retried_and_promotes_once(data, monkeypatch):
    real, calls = nightly.consolidate_users, []

    def crash_after_first_user(*args, **kwargs):
        calls.append(1)
        on_done = args[-1]
        if len(calls) == 1:
            def crash(result):
                on_done(result)
                raise RuntimeError("injected: worker lost mid-sleep")
            return real(*args[:-1], crash)
        return real(*args, **kwargs)

    monkeypatch.setattr(nightly, "consolidate_users", crash_after_first_user)
    result = nightly.consolidate(night=NIGHT, data=data, sleep_config=SLEEP, gate={"max_bpb_rise": 1.0,
                                                                                   "max_personal_bpb_rise": 1.0})
    registry = CheckpointRegistry(open_store(data))
    assert len(calls) == 2 and result["promoted"]
    assert len(result["users"]["trained"]) == 1 and len(result["users"]["skipped"]) == 1  # no double training
    assert registry.versions() == ["v0001", "v0002"] and registry.current() == "v0002"
    assert registry.manifest("v0002")["night"] == NIGHT


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA here the night would train on it")
def test_a_night_on_a_gpu_share_says_when_torch_finds_no_gpu():
    """REVERIE_USER_NIGHT_GPUS makes each user's night a Ray task that asks for a share of a GPU;
    where Ray grants one that torch cannot use, the night stops with what to change, and whose it was."""
    weights = {k: v.detach() for k, v in ReverieLM(preset("tiny")).state_dict().items()}
    night = UserNight("alice", [fact.text() for fact in FACTS["alice"]])
    with pytest.raises(ray.exceptions.RayTaskError, match=r"given GPU .*0.* by Ray.*REVERIE_USER_NIGHT_GPUS=0") as failed:
        consolidate_users(preset("tiny"), weights, weights, [night], embedded_corpus().train[:4096],
                          SleepConfig(steps=4), "v0001", on_done=lambda result: None, gpus_per_user=0.5)
    assert any("'alice'" in note for note in failed.value.__notes__)  # whose night it was
    with pytest.raises(ValueError, match="a share of one GPU, 0 to 1"):
        consolidate_users(preset("tiny"), weights, weights, [night], b"", SleepConfig(), "v0001",
                          on_done=lambda result: None, gpus_per_user=2)


def test_weights_cross_the_object_store_as_arrays_and_come_back_exact():
    """`shipped` weights (numpy arrays, passed by reference to Ray's shared memory) come back from
    the object store as the same tensors; a dtype numpy lacks travels as a tensor; `writable`
    copies give tensors the caller may change."""
    weights = {"w": torch.randn(3, 4), "n": torch.arange(5), "h": torch.randn(2, dtype=torch.bfloat16)}
    back = ray.get(ray.put(shipped(weights)))
    assert isinstance(back["h"], torch.Tensor) and not isinstance(back["w"], torch.Tensor)
    for writable in (False, True):
        tensors = received(back, writable=writable)
        assert all(torch.equal(tensors[name], t) and tensors[name].dtype == t.dtype for name, t in weights.items())
    tensors["w"].add_(1.0)  # a writable copy, not the object store's memory


def test_a_night_through_ray_equals_the_night_in_process():
    """A user's night as a Ray task (weights in and the delta out as shipped arrays) gives the
    delta that `consolidate_user` gives here, from an old delta and a fast state. Torch on one
    thread, as in a Ray worker: a CPU product's sums depend on its threads."""
    config = preset("tiny")
    torch.manual_seed(0)
    served = {k: v.detach().clone() for k, v in ReverieLM(config).state_dict().items()}
    candidate = {k: v + 1e-3 for k, v in served.items()}
    texts = [fact.text() for fact in FACTS["alice"]]
    _, state = model_from(config, served)(torch.tensor(list(texts[0]))[None])
    old = {name: 1e-3 * torch.ones_like(t) for name, t in list(served.items())[:3]}
    night = UserNight("alice", texts, state=state.to_bytes(config), old_delta=old)
    rehearsal, sleep = embedded_corpus().train[:4096], SleepConfig(steps=4)
    [through_ray] = consolidate_users(config, served, candidate, [night], rehearsal, sleep, "v0002",
                                      on_done=lambda result: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = consolidate_user(config.to_json(), served, candidate, night, rehearsal, sleep, "v0002")
    finally:
        torch.set_num_threads(threads)
    assert (through_ray.meta, through_ray.metrics) == (here.meta, here.metrics)
    assert through_ray.tensors.keys() == here.tensors.keys()
    assert all(torch.equal(through_ray.tensors[name], t) for name, t in here.tensors.items())


def test_failing_gate_promotes_nothing_and_says_why(data, monkeypatch):
    """Also: REVERIE_SLEEP_RECIPE names the night's recipe, and sleep_config changes it."""
    real, recipes = nightly.consolidate_users, []

    def record_recipe(*args, **kwargs):
        recipes.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(nightly, "consolidate_users", record_recipe)
    monkeypatch.setenv("REVERIE_SLEEP_RECIPE", "reverie_fast")
    state = nightly.consolidate(night=NIGHT, data=data, sleep_config={"steps": 2}, gate={"min_recall": 1.0},
                                return_state=True)
    assert state.is_failed() and "recall=" in state.message
    assert recipes == [dataclasses.replace(METHODS["reverie_fast"], steps=2)]
    registry = CheckpointRegistry(open_store(data))
    assert registry.current() == "v0001" and "v0002" in registry.versions()


def test_shareable_turns_train_shared_weights_through_ray_train(tmp_path):
    uri = (tmp_path / "data").as_uri()
    write_night(uri, shareable_text=b"Public note: the library opens at nine.")
    result = nightly.consolidate(night=NIGHT, data=uri, sleep_config={**SLEEP, "steps": 10},
                                 gate={"min_recall": 0.0, "max_bpb_rise": 1.0, "max_personal_bpb_rise": 1.0})
    manifest = CheckpointRegistry(open_store(uri)).manifest(result["version"])
    assert manifest["shareable_turns"] == 1 and manifest["shared_metrics"]


def pretrained_base(data: str, steps: int = 100) -> None:
    """v0001 = a tiny model briefly trained on the corpus: a teacher worth distilling from."""
    torch.manual_seed(0)
    model = ReverieLM(preset("tiny"))
    train(model, embedded_corpus(), TrainConfig(steps=steps, batch_size=8, seq_len=64, lr=3e-3, warmup=10,
                                                device="cpu", progress=False))
    registry = CheckpointRegistry(open_store(data))
    version = registry.save({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                            {"model_config": preset("tiny").to_dict()}, parent=None)
    registry.promote(version, expected_current=None)


def test_architecture_night_distills_into_the_searched_genome(data):
    pretrained_base(data)
    genome = Genome(**{**Genome.from_config(preset("tiny")).to_dict(), "d_model": 48, "em_slots": 8})
    student = search_space("tiny").to_config(genome)
    SearchResults(data, "run-1").save_best_genome({"genome": genome.to_dict(), "config": student.to_dict()})
    FastStateStore(open_store(data)).save("alice", FastState.empty(preset("tiny")).tensors(), {"base_version": "v0001"})
    with pytest.raises(ValueError, match="student must be"):
        nightly.consolidate(night=NIGHT, data=data, student="evolution")
    # The default gate: the fresh student must come within 2% of the teacher's held-out bits per byte.
    result = nightly.consolidate(night=NIGHT, data=data, student="search",
                                 sleep_config={**SLEEP, "architecture_steps": 100})
    version = result["version"]
    manifest = CheckpointRegistry(open_store(data)).manifest(version)
    assert result["promoted"] and manifest["model_config"] == student.to_dict()
    assert manifest["architecture_from"]["teacher_config"] == preset("tiny").to_dict()
    assert result["metrics"]["recall"] >= 0.5 and result["metrics"]["leakage"] == 0.0
    for user in FACTS:  # personal deltas are learned anew in the new architecture
        personal_model(data, version, user)
    state, meta = FastStateStore(open_store(data)).load("alice")
    FastState(**state).validate(student)
    assert meta["base_version"] == version
