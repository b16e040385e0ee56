"""Federation specifications that need no Flower runtime: settings, the wire format, validation
of updates, robust aggregation, DP, attacks and local personalization, on the tiny preset."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.aggregation import RobustConfig, aggregate, clipped_mean, sign_vote, trimmed_mean
from federation.attacks import ATTACKS, corrupt, parse_attackers
from federation.data import synthetic_corpus, synthetic_documents
from federation.settings import FederationSettings
from federation.task import Recipe, local_update, matrix_shapes, round_version
from federation.validation import ArraySpec, RoundExpectation, UpdateRejected, validate_update
from federation.wire import SCALES, SIGNS, dense_nbytes, from_wire, payload_nbytes, to_wire
from model.bitdelta import BitDelta
from model.config import preset
from model.lm import ReverieLM
from model.personalize import PersonalizeConfig, personalize

ROOT = Path(__file__).resolve().parent.parent
VERSION = "v0001"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models on a shared 2-core machine: one thread is faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model() -> ReverieLM:
    torch.manual_seed(0)
    return ReverieLM(preset("tiny")).eval()


@pytest.fixture(scope="module")
def shapes(base_model) -> dict[str, tuple[int, ...]]:
    return matrix_shapes(base_model, "linear")


@pytest.fixture(scope="module")
def recipe(base_model) -> Recipe:
    return Recipe(model_config=base_model.config.to_json(), local_steps=4, local_lr=3e-3, batch_size=4, seq_len=32,
                  select="linear", distill_steps=2, max_scale=4 * 3e-3, seed=0)


@pytest.fixture(scope="module")
def honest_deltas(base_model, recipe) -> list[BitDelta]:
    """Real BitDeltas of three simulated users fine-tuned from the same base."""
    return [local_update(base_model, synthetic_corpus(p, 3000), recipe, VERSION, 1).delta for p in range(3)]


def expectation(shapes, **changes) -> RoundExpectation:
    values = {"server_round": 2, "model_version": VERSION, "shapes": shapes, "max_scale": 0.012, **changes}
    return RoundExpectation(**values)


def check(arrays: dict[str, np.ndarray], expect: RoundExpectation, claimed_round: int = 2,
          claimed_version: str = VERSION) -> BitDelta:
    specs = {k: ArraySpec(str(a.dtype), a.shape, a.nbytes + 128) for k, a in arrays.items()}
    return validate_update(claimed_round, claimed_version, specs, lambda: arrays, expect)


# --- settings ----------------------------------------------------------------------------------


def test_pyproject_run_config_lists_every_setting_with_its_default():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert table["components"] == {"serverapp": "federation.server_app:app",
                                   "clientapp": "federation.client_app:app"}
    assert table["config"] == FederationSettings().to_run_config()
    assert FederationSettings.from_run_config(table["config"]) == FederationSettings()


def test_settings_refuse_unknown_keys_and_dp_without_a_fixed_clip_norm():
    with pytest.raises(ValueError, match="unknown federation settings.*num-rounds"):
        FederationSettings.from_run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="fixed clip-norm"):
        FederationSettings(dp_noise_multiplier=1.0)
    assert FederationSettings.from_run_config({"clip-norm": 2}).clip_norm == 2.0  # TOML int where float is meant


def test_scale_bound_defaults_to_what_adam_can_move_a_weight():
    assert FederationSettings(local_lr=1e-3, local_steps=20).scale_bound == pytest.approx(0.02)
    assert FederationSettings(max_scale=0.5).scale_bound == 0.5


def test_round_versions_differ_per_round_and_per_run():
    assert round_version("v0003", "abc", 1) == "v0003"
    assert len({round_version("v0003", tag, r) for tag in ("abc", "def") for r in (2, 3)}) == 4


# --- wire format -------------------------------------------------------------------------------


def test_wire_round_trip_gives_back_the_same_bitdelta(honest_deltas, shapes):
    delta = honest_deltas[0]
    arrays = to_wire(delta, list(shapes))
    assert set(arrays) == {SIGNS, SCALES} and arrays[SIGNS].dtype == np.uint8
    back = from_wire(arrays[SIGNS], arrays[SCALES], shapes, VERSION, max_scale=1.0)
    for name in shapes:
        assert torch.equal(back.signs[name], delta.signs[name])
        assert back.scales[name].item() == pytest.approx(delta.scales[name].item())


def test_upload_is_about_16x_smaller_than_an_fp16_delta(shapes):
    payload = payload_nbytes(shapes)
    assert payload == sum(math.ceil(math.prod(s) / 8) for s in shapes.values()) + 4 * len(shapes)
    assert dense_nbytes(shapes, 2) / payload > 15.0
    assert dense_nbytes(shapes, 4) / payload > 30.0


# --- validation --------------------------------------------------------------------------------


def test_an_honest_update_passes_validation(honest_deltas, shapes):
    arrays = to_wire(honest_deltas[0], list(shapes))
    delta = check(arrays, expectation(shapes))
    assert delta.base_version == VERSION and delta.shapes == shapes


@pytest.mark.parametrize("attack, code", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "shape"),
                                          ("scale", "scale-bound"), ("bloat", "size-limit"), ("stale", "stale-round")])
def test_each_malformed_attack_is_rejected_with_its_reason(honest_deltas, shapes, attack, code):
    expect = expectation(shapes)
    arrays, claimed_round = corrupt(to_wire(honest_deltas[0], list(shapes)), attack, 2, expect.max_scale)
    with pytest.raises(UpdateRejected) as rejected:
        check(arrays, expect, claimed_round=claimed_round)
    assert rejected.value.code == code


def test_the_flip_attack_passes_validation_so_aggregation_must_bound_it(honest_deltas, shapes):
    expect = expectation(shapes)
    arrays, _ = corrupt(to_wire(honest_deltas[0], list(shapes)), "flip", 2, expect.max_scale)
    flipped = check(arrays, expect)
    name = next(iter(shapes))
    assert torch.equal(flipped.signs[name], ~honest_deltas[0].signs[name])


def test_update_against_other_weights_is_rejected(honest_deltas, shapes):
    arrays = to_wire(honest_deltas[0], list(shapes))
    with pytest.raises(UpdateRejected, match="computed against 'v0000'") as rejected:
        check(arrays, expectation(shapes), claimed_version="v0000")
    assert rejected.value.code == "base-version"


def test_wrong_dtype_is_refused_before_deserializing(shapes):
    specs = {SIGNS: ArraySpec("float32", (10,), 168), SCALES: ArraySpec("float32", (len(shapes),), 216)}

    def never():
        raise AssertionError("a mistyped update must not be deserialized")

    with pytest.raises(UpdateRejected) as rejected:
        validate_update(2, VERSION, specs, never, expectation(shapes))
    assert rejected.value.code == "dtype"


def test_negative_scale_is_out_of_bounds(honest_deltas, shapes):
    arrays = to_wire(honest_deltas[0], list(shapes))
    arrays[SCALES][3] = -0.001
    with pytest.raises(UpdateRejected, match="outside") as rejected:
        check(arrays, expectation(shapes))
    assert rejected.value.code == "scale-bound"


def test_attackers_spec_parses_and_refuses_unknown_attacks():
    assert parse_attackers("3:nan, 7:flip") == {3: "nan", 7: "flip"}
    assert set(ATTACKS) >= {"nan", "inf", "shape", "scale", "flip", "stale"}
    with pytest.raises(ValueError, match="attacker"):
        parse_attackers("3:meltdown")


# --- robust aggregation ------------------------------------------------------------------------


def test_clipped_mean_bounds_any_single_update_to_bound_over_n():
    honest = torch.full((4, 10), 0.1)
    attacker = torch.full((1, 10), -1000.0)
    bound = float(honest[0].norm())
    mean = clipped_mean(torch.cat([honest, attacker]), bound)
    assert float((mean - honest.mean(0) * 4 / 5).norm()) <= bound / 5 + 1e-6


def test_trimmed_mean_ignores_extreme_coordinates():
    updates = torch.tensor([[1.0], [1.1], [0.9], [1.0], [1e6]])
    assert trimmed_mean(updates, 0.2).item() == pytest.approx(1.0, abs=0.05)


def test_sign_vote_takes_the_majority_sign_and_the_median_scale():
    updates = torch.tensor([[0.1, -0.1], [0.2, -0.2], [-5.0, 5.0]])
    scales = torch.tensor([[0.1], [0.2], [5.0]])
    assert sign_vote(updates, scales, [2]).tolist() == pytest.approx([0.2, -0.2])


@pytest.mark.parametrize("method", ["clipped-mean", "trimmed-mean", "sign-vote"])
def test_a_sign_flipped_scaled_update_is_bounded_and_reported(honest_deltas, shapes, method):
    expect = expectation(shapes, max_scale=1.0)
    arrays, _ = corrupt(to_wire(honest_deltas[0], list(shapes)), "flip", 2, 0.05)
    flipped = check(arrays, expect)
    honest_only = aggregate(honest_deltas, RobustConfig(method=method))
    attacked = aggregate([*honest_deltas, flipped], RobustConfig(method=method, trim_fraction=0.25))
    assert [o.index for o in attacked.outliers] == [3]
    shift = math.sqrt(sum(float((attacked.delta[n] - honest_only.delta[n]).pow(2).sum()) for n in shapes))
    assert shift < 1.5 * honest_only.norm  # the flipped update is ~40x the honest norm, unbounded it would dominate


def test_dp_adds_gaussian_noise_of_z_clip_over_n_and_reports_the_multiplier(honest_deltas):
    config = RobustConfig(method="clipped-mean", clip_norm=0.5, dp_noise_multiplier=1.0)
    noisy = aggregate(honest_deltas, config, torch.Generator().manual_seed(0))
    clean = aggregate(honest_deltas, RobustConfig(method="clipped-mean", clip_norm=0.5))
    assert noisy.noise_multiplier == 1.0 and noisy.noise_std == pytest.approx(0.5 / 3)
    noise = torch.cat([(noisy.delta[n] - clean.delta[n]).reshape(-1) for n in clean.delta])
    assert noise.std().item() == pytest.approx(0.5 / 3, rel=0.05)
    with pytest.raises(ValueError, match="fixed clip_norm"):
        RobustConfig(method="sign-vote", dp_noise_multiplier=1.0)


# --- the device side ---------------------------------------------------------------------------


def test_personalize_moves_only_the_trainable_matrices_and_leaves_the_model_alone(base_model):
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    names = list(matrix_shapes(base_model, "linear"))[:2]
    recipe = PersonalizeConfig(steps=2, batch_size=2, seq_len=32)
    tuned = personalize(base_model, synthetic_corpus(0, 3000).train, recipe, trainable=names)
    for key, value in base_model.state_dict().items():
        assert torch.equal(value, before[key])
        assert torch.equal(tuned[key], value) == (key not in names)


def test_local_update_improves_the_devices_heldout_bits_and_bitdelta_keeps_most_of_it(base_model, recipe):
    corpus = synthetic_corpus(5, 4000)
    update = local_update(base_model, corpus, recipe.__class__(**{**recipe.__dict__, "local_steps": 10}), VERSION, 1)
    m = update.metrics
    assert m["heldout-bpb-dense"] < m["heldout-bpb-before"] - 0.1
    assert m["heldout-bpb-bitdelta"] < m["heldout-bpb-before"] - 0.05
    assert m["upload-bytes"] == update.delta.nbytes and update.delta.base_version == VERSION


def test_synthetic_users_are_deterministic_and_different():
    assert synthetic_documents(1, 2000) == synthetic_documents(1, 2000)
    assert synthetic_documents(1, 2000) != synthetic_documents(2, 2000)
    corpus = synthetic_corpus(1, 5000)
    assert len(corpus.train) > 3 * len(corpus.heldout) > 0
