"""The checkpoint registry: versions, manifests, and the compare-and-swap `current` pointer.

Run as a script, this file is a promoter process for the concurrency test: it prints READY, then
for every line "VERSION EXPECTED" on stdin promotes VERSION and prints WON or LOST <message>.
    python test_storage_checkpoints.py ROOT_URI ENDPOINT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from storage.checkpoints import CheckpointRegistry
from storage.errors import ConflictError, CorruptDataError, NotFoundError, StorageError
from storage.s3_store import S3Store
from storage.uri import Store


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=generator),
        "head.bias": torch.randn(16, generator=generator, dtype=torch.float64),
        "blocks.0.scale": torch.randn(8, generator=generator).to(torch.bfloat16),
        "step": torch.tensor(seed, dtype=torch.int64),
    }


@pytest.fixture
def registry(store: Store) -> CheckpointRegistry:
    return CheckpointRegistry(store)


def test_saved_weights_load_back_bit_exact_with_their_manifest(registry: CheckpointRegistry) -> None:
    version = registry.save(weights(1), {"metrics": {"bpb": 1.23}, "config": {"d_model": 8}}, parent=None)
    tensors, manifest = registry.load(version)
    assert tensors.keys() == weights(1).keys()
    for name, tensor in weights(1).items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor)
    assert manifest["version"] == version and manifest["parent"] is None
    assert manifest["metrics"] == {"bpb": 1.23} and manifest["config"] == {"d_model": 8}
    assert manifest["created"] and len(manifest["weights"]["sha256"]) == 64


def test_versions_are_monotone_and_record_their_parent(registry: CheckpointRegistry) -> None:
    v1 = registry.save(weights(1), {}, parent=None)
    v2 = registry.save(weights(2), {}, parent=v1)
    v3 = registry.save(weights(3), {}, parent=v2)
    assert [v1, v2, v3] == ["v0001", "v0002", "v0003"] == registry.versions()
    assert registry.manifest(v3)["parent"] == v2


def test_concurrent_saves_never_share_a_version_number(local_store: Store) -> None:
    registry = CheckpointRegistry(local_store)
    results: list[str] = []

    def save(seed: int) -> None:
        results.append(registry.save(weights(seed), {}, parent=None))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == registry.versions() == [f"v{i:04d}" for i in range(1, 7)]


def test_interrupted_save_is_invisible_and_its_number_not_reused(registry: CheckpointRegistry) -> None:
    v1 = registry.save(weights(1), {}, parent=None)
    registry.store.write_bytes("checkpoints/v0002/weights.safetensors", b"half a save, no manifest")
    assert registry.versions() == [v1]
    assert registry.save(weights(3), {}, parent=v1) == "v0003"


def test_manifest_may_not_override_registry_fields(registry: CheckpointRegistry) -> None:
    with pytest.raises(ValueError, match="version"):
        registry.save(weights(1), {"version": "v9999"}, parent=None)
    with pytest.raises(ValueError, match="parent"):
        registry.save(weights(1), {}, parent="v0042")


def test_promote_rollback_and_current(registry: CheckpointRegistry) -> None:
    assert registry.current() is None
    v1 = registry.save(weights(1), {}, parent=None)
    v2 = registry.save(weights(2), {}, parent=v1)
    registry.promote(v1, expected_current=None)
    registry.promote(v2, expected_current=v1)
    assert registry.current() == v2
    assert registry.rollback() == v1
    assert registry.current() == v1
    with pytest.raises(StorageError, match="no parent"):
        registry.rollback()


def test_promote_with_a_stale_expectation_conflicts_naming_both_versions(registry: CheckpointRegistry) -> None:
    v1 = registry.save(weights(1), {}, parent=None)
    v2 = registry.save(weights(2), {}, parent=v1)
    v3 = registry.save(weights(3), {}, parent=v1)
    registry.promote(v1, expected_current=None)
    registry.promote(v2, expected_current=v1)
    with pytest.raises(ConflictError, match=rf"{v3}.*expected current to be {v1}.*current is {v2}"):
        registry.promote(v3, expected_current=v1)
    with pytest.raises(ConflictError, match=rf"{v3}.*unset.*current is {v2}"):
        registry.promote(v3, expected_current=None)
    assert registry.current() == v2


def test_only_saved_versions_can_be_promoted(registry: CheckpointRegistry) -> None:
    with pytest.raises(NotFoundError, match="v0007"):
        registry.promote("v0007", expected_current=None)


def test_corrupt_weights_raise_naming_the_file(registry: CheckpointRegistry) -> None:
    version = registry.save(weights(1), {}, parent=None)
    key = f"checkpoints/{version}/weights.safetensors"
    data = bytearray(registry.store.read_bytes(key))
    data[-1] ^= 0xFF
    registry.store.write_bytes(key, bytes(data))
    with pytest.raises(CorruptDataError, match=f"{version}/weights.safetensors"):
        registry.load(version)


def test_corrupt_manifest_raises_naming_the_file(registry: CheckpointRegistry) -> None:
    version = registry.save(weights(1), {}, parent=None)
    registry.store.write_bytes(f"checkpoints/{version}/manifest.json", b"{not json")
    with pytest.raises(CorruptDataError, match=f"{version}/manifest.json"):
        registry.manifest(version)


def test_files_are_safetensors_and_json_never_pickle(registry: CheckpointRegistry) -> None:
    version = registry.save(weights(1), {}, parent=None)
    registry.promote(version, expected_current=None)
    blob = registry.store.read_bytes(f"checkpoints/{version}/weights.safetensors")
    header_length = int.from_bytes(blob[:8], "little")
    assert json.loads(blob[8 : 8 + header_length])["embed.weight"]["dtype"] == "F32"
    assert not blob.startswith(b"\x80")  # no pickle protocol header, no zip archive
    json.loads(registry.store.read_bytes(f"checkpoints/{version}/manifest.json"))
    assert json.loads(registry.store.read_bytes("checkpoints/CURRENT.json"))["version"] == version


# -- two processes promoting at once --------------------------------------------------------------
def _start_promoter(store: Store) -> subprocess.Popen:
    endpoint = store.config.s3_endpoint_url if isinstance(store, S3Store) else ""
    process = subprocess.Popen(
        [sys.executable, __file__, store.uri, endpoint],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert process.stdout.readline().strip() == "READY"
    return process


def test_concurrent_promoters_exactly_one_wins(registry: CheckpointRegistry) -> None:
    rounds = 6
    base = registry.save(weights(0), {}, parent=None)
    registry.promote(base, expected_current=None)
    promoters = [_start_promoter(registry.store) for _ in range(2)]
    try:
        for _ in range(rounds):
            expected = registry.current()
            candidates = [registry.save(weights(i), {}, parent=expected) for i in range(2)]
            for process, version in zip(promoters, candidates, strict=True):
                process.stdin.write(f"{version} {expected}\n")
            for process in promoters:  # both lines are sent before either answer is read
                process.stdin.flush()
            answers = [process.stdout.readline().strip() for process in promoters]
            winners = [v for v, a in zip(candidates, answers, strict=True) if a == "WON"]
            assert len(winners) == 1, answers
            loser_answer = next(a for a in answers if a != "WON")
            loser = candidates[answers.index(loser_answer)]
            assert loser_answer.startswith("LOST") and loser in loser_answer and winners[0] in loser_answer
            assert registry.current() == winners[0]
    finally:
        for process in promoters:
            process.stdin.close()
            process.wait(timeout=30)


def _promoter_process(root: str, endpoint: str) -> None:
    from storage.config import StorageConfig

    registry = CheckpointRegistry(root, StorageConfig(root=root, s3_endpoint_url=endpoint or None))
    print("READY", flush=True)
    for line in sys.stdin:
        version, expected = line.split()
        try:
            registry.promote(version, expected_current=expected)
            print("WON", flush=True)
        except ConflictError as e:
            print(f"LOST {e}", flush=True)


if __name__ == "__main__":
    _promoter_process(sys.argv[1], sys.argv[2])
