"""The serving engine without Ray: user-state LRU over the store, learn=false, soft reset on promotion."""

from __future__ import annotations

import pytest
import torch

from workers.serving_api import GenerateRequest
from workers.serving_engine import ServingConfig, ServingEngine


@pytest.fixture
def engine(tmp_path):
    engine = ServingEngine(ServingConfig(data_root=str(tmp_path), users_per_replica=1, poll_interval_s=0.0))
    yield engine
    engine.close()


def turn(user: str, prompt: bytes = b"Remember 7431. ", learn: bool = True) -> GenerateRequest:
    return GenerateRequest(user, prompt, max_new_bytes=4, temperature=0.0, learn=learn)


def state_of(engine: ServingEngine, user: str):
    return engine.states.get(user, engine.model.config, engine.version, 0.5).state.clone()


def test_evicted_state_comes_back_exactly(engine):
    engine.serve_batch([turn("ann"), turn("ann", b"and 1234")])
    before = state_of(engine, "ann")
    engine.serve_batch([turn("bob")])  # capacity 1: ann is evicted
    assert "ann" not in engine.states
    loads = engine.states.loads
    after = state_of(engine, "ann")
    assert engine.states.loads == loads + 1
    for name, tensor in before.tensors().items():
        assert torch.equal(tensor, after.tensors()[name]), name


def test_saves_behind_the_replies_land_in_order_and_a_new_replica_reads_the_last(engine):
    for k in range(5):
        engine.serve_batch([turn("ann", f"turn {k}. ".encode())])
    last = state_of(engine, "ann")
    engine.states.flush()
    other = ServingEngine(ServingConfig(data_root=engine.config.data_root))
    try:
        assert other.user_info("ann")["turns"] == 5
        reloaded = other.states.get("ann", other.model.config, other.version, 0.5).state
        for name, tensor in last.tensors().items():
            assert torch.equal(tensor, reloaded.tensors()[name]), name
    finally:
        other.close()


def test_same_user_twice_in_a_batch_is_served_in_order(engine):
    replies = engine.serve_batch([turn("ann"), turn("ann", b"second")])
    assert engine.user_info("ann")["turns"] == 2 and all(isinstance(r, dict) for r in replies)


def test_learn_false_leaves_the_state_unchanged(engine):
    engine.serve_batch([turn("ann")])
    before = engine.user_info("ann")
    engine.serve_batch([turn("ann", learn=False)])
    assert engine.user_info("ann") == before


def test_promotion_swaps_weights_between_batches_and_soft_resets_states(engine):
    engine.serve_batch([turn("ann")])
    strengths = state_of(engine, "ann").em_s.clone()
    assert strengths.sum() > 0
    old = engine.version
    tensors, manifest = engine.registry.load(old)
    new = engine.registry.save(tensors, {"config": manifest["config"]}, parent=old)
    engine.registry.promote(new, expected_current=old)
    reply = engine.serve_batch([turn("ann", learn=False)])[0]
    assert reply["model_version"] == new
    assert torch.allclose(state_of(engine, "ann").em_s, strengths * engine.config.soft_reset_keep)


def test_promotion_to_another_architecture_starts_states_empty_in_it(engine):
    import dataclasses

    from model.lm import ReverieLM

    engine.serve_batch([turn("ann")])
    old = engine.version
    smaller = dataclasses.replace(engine.model.config, d_model=32, n_heads=2)
    weights = {k: v.detach().contiguous() for k, v in ReverieLM(smaller).state_dict().items()}
    new = engine.registry.save(weights, {"model_config": smaller.to_dict()}, parent=old)
    engine.registry.promote(new, expected_current=old)
    reply = engine.serve_batch([turn("ann")])[0]
    assert not isinstance(reply, Exception), reply
    assert reply["model_version"] == new and engine.model.config == smaller
    state_of(engine, "ann").validate(smaller)


def test_dense_personal_delta_written_by_a_sleep_is_served_to_its_owner_only(engine):
    from model.checkpoint import weights
    from model.consolidation import personal_delta
    from storage.deltas import DeltaStore

    base = weights(engine.model)
    tuned = {name: t + 0.05 if t.is_floating_point() and t.dim() == 2 else t for name, t in base.items()}
    tensors, meta = personal_delta(base, tuned, engine.version, "dense")
    DeltaStore(engine.store).save_user_delta("ann", engine.version, tensors, meta)
    probe = b"The secret word is "
    ann, bob = engine.serve_batch([turn("ann", probe, learn=False), turn("bob", probe, learn=False)])
    assert not isinstance(ann, Exception) and not isinstance(bob, Exception), (ann, bob)
    plain = ServingEngine(ServingConfig(data_root=engine.config.data_root))
    try:
        (expected,) = plain.serve_batch([turn("carol", probe, learn=False)])
    finally:
        plain.close()
    assert bob["response_b64"] == expected["response_b64"]
    assert ann["response_b64"] != expected["response_b64"]
    assert torch.equal(weights(engine.model)["embed.weight"], base["embed.weight"])  # removed again


def test_turns_within_the_save_interval_are_saved_once_and_user_info_saves_at_once(tmp_path):
    engine = ServingEngine(ServingConfig(data_root=str(tmp_path), save_interval_s=60.0))
    try:
        stored_turns = lambda: engine.states.states.load("ann")[1]["turns"]  # noqa: E731
        engine.serve_batch([turn("ann")])  # not saved within the interval: saved right behind the reply
        engine.states.saver.flush("ann")
        saves = engine.states.saver.saves
        engine.serve_batch([turn("ann", b"and 1234")])
        engine.serve_batch([turn("ann", b"and 5678")])
        assert stored_turns() == 1 and engine.states.saver.busy("ann")  # coalescing: held for the interval
        assert engine.user_info("ann")["turns"] == 3  # reports saved state, so it saves now
        assert stored_turns() == 3 and engine.states.saver.saves == saves + 1
    finally:
        engine.close()
