"""The nightly flow end to end: Prefect (test harness), a local Ray cluster, a tiny model."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import ray
from prefect.testing.utilities import prefect_test_harness

import pipelines.consolidate as nightly
from model.consolidation import add_delta, dense_delta, model_from
from model.evaluation import Fact, recalled
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from storage.experience import ExperienceRecord, ExperienceWriter
from storage.uri import open_store

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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def test_failing_gate_promotes_nothing_and_says_why(data):
    state = nightly.consolidate(night=NIGHT, data=data, sleep_config={"steps": 2}, gate={"min_recall": 1.0},
                                return_state=True)
    assert state.is_failed() and "recall=" in state.message
    registry = CheckpointRegistry(open_store(data))
    assert registry.current() == "v0001" and "v0002" in registry.versions()


def test_shareable_turns_train_shared_weights_through_ray_train(tmp_path):
    uri = (tmp_path / "data").as_uri()
    write_night(uri, shareable_text=b"Public note: the library opens at nine.")
    result = nightly.consolidate(night=NIGHT, data=uri, sleep_config={**SLEEP, "steps": 10},
                                 gate={"min_recall": 0.0, "max_bpb_rise": 1.0, "max_personal_bpb_rise": 1.0})
    manifest = CheckpointRegistry(open_store(uri)).manifest(result["version"])
    assert manifest["shareable_turns"] == 1 and manifest["shared_metrics"]
