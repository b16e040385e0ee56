"""The shared sleep through Ray Train on CPU workers, and where its scale is configured.

`train_shared` shards tonight's texts by rank (`texts[rank::world]`), each rank draws its own
batches (seed + rank), and DDP averages the ranks' gradients every step. Two workers of batch B
therefore take the same optimizer steps as one worker of batch 2B in expectation, on different
bytes: the runs agree statistically, not bit for bit. Measured on this recipe (tiny, 30 steps,
lr 3e-3, 2 cores): bits per byte of one worker and of two differ by under 1%, as much as two seeds
of one worker do; a rank training alone (no gradient averaging) is 6% worse on the lines only the
other rank saw. So the comparison is made at equal global batch, within 2%, and the lines only
rank 1 read must be learned as well as rank 0's.
"""

from __future__ import annotations

import pytest
import ray
import torch

import pipelines.consolidate
from bench.sleep_scaling import notices
from model.config import preset
from model.consolidation import SleepConfig, model_from
from model.corpus import embedded_corpus
from model.evaluation import bpb
from model.lm import ReverieLM
from pipelines.cli import main
from pipelines.settings import Settings
from workers.consolidation import train_shared

pytestmark = pytest.mark.timeout(400)
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_two_workers_learn_what_one_worker_learns_at_equal_global_batch(local_ray, tmp_path):
    torch.manual_seed(0)
    config = preset("tiny")
    start = {k: v.detach().clone() for k, v in ReverieLM(config).state_dict().items()}
    taught, unseen = notices(8, seed=0), notices(8, seed=1)
    corpus = embedded_corpus()

    def sleep_with(workers: int) -> tuple[dict[str, float], dict[str, float]]:
        recipe = SleepConfig(steps=30, batch_size=GLOBAL_BATCH // workers, lr=3e-3)
        weights, metrics = train_shared(config=config, start=start, teacher=start, texts=taught, earlier=[],
                                        rehearsal=corpus.train[:200_000], sleep_config=recipe,
                                        storage_path=str(tmp_path / "ray_train"), run_name=f"{workers}-workers",
                                        num_workers=workers)
        model = model_from(config, weights)

        def bits(lines: list[bytes]) -> float:
            return bpb(model, b"\n".join(lines * 8), seq_len=64, max_batches=4)

        return {"rank0_lines": bits(taught[0::2]), "rank1_lines": bits(taught[1::2]), "unseen": bits(unseen),
                "heldout": bpb(model, corpus.heldout[:50_000])}, metrics

    one, one_metrics = sleep_with(1)
    two, two_metrics = sleep_with(2)
    assert one["rank0_lines"] < 0.7 * 8.0  # from a fresh model (8 bits per byte): both runs learned
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=0.02), (key, one, two)
    assert two["rank1_lines"] < two["rank0_lines"] + 0.05  # gradients from the other rank arrive
    assert two["rank1_lines"] < two["unseen"]
    assert two_metrics["anchor"] == pytest.approx(one_metrics["anchor"], rel=0.05)  # the update has the same size


def test_sleep_workers_gpu_and_train_storage_are_set_by_the_environment_alone(monkeypatch, tmp_path):
    env = {"REVERIE_SLEEP_WORKERS": "4", "REVERIE_SLEEP_GPU": "true", "REVERIE_TRAIN_STORAGE": "s3://bucket/ray_train",
           "REVERIE_USER_NIGHT_GPUS": "0.25", "REVERIE_CONFIG": str(tmp_path / "absent.toml")}
    settings = Settings.load(env=env)
    assert (settings.sleep_workers, settings.sleep_gpu, settings.train_storage, settings.user_night_gpus) == (
        4, True, "s3://bucket/ray_train", 0.25)
    with pytest.raises(ValueError, match="REVERIE_SLEEP_WORKERS"):
        Settings.load(env={**env, "REVERIE_SLEEP_WORKERS": "two"})
    with pytest.raises(ValueError, match="REVERIE_USER_NIGHT_GPUS='a quarter' is not a number"):
        Settings.load(env={**env, "REVERIE_USER_NIGHT_GPUS": "a quarter"})

    calls = []
    monkeypatch.setattr(pipelines.consolidate, "consolidate", lambda **kwargs: calls.append(kwargs) or {})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["sleep", "--night", "2026-01-05"]) == 0
    assert {k: calls[0][k] for k in ("num_workers", "use_gpu", "train_storage", "user_night_gpus")} == {
        "num_workers": 4, "use_gpu": True, "train_storage": "s3://bucket/ray_train", "user_night_gpus": 0.25}
