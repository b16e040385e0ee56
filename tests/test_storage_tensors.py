"""Fast states, deltas and episodic indexes: tensor blobs on the same URI layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.deltas import DeltaStore
from storage.episodic_index import load_episodic_index, save_episodic_index
from storage.errors import CorruptDataError
from storage.fast_states import FastStateStore
from storage.uri import Store


def fast_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pm.keys": torch.randn(2, 8, 4, generator=generator),
        "em.strength": torch.rand(2, 16, generator=generator),
        "scan.carry": torch.randn(2, 8, generator=generator).to(torch.float16),
        "wm.length": torch.tensor([3, 5], dtype=torch.int32),
    }


def bitdelta(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight.signs": torch.randint(0, 256, (32,), dtype=torch.uint8, generator=generator),
        "layer.weight.scale": torch.rand((), generator=generator),
    }


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


# -- fast states ----------------------------------------------------------------------------------
def test_fast_state_round_trips_with_its_base_version(store: Store) -> None:
    states = FastStateStore(store)
    states.save("alice", fast_state(1), {"base_version": "v0003", "turns": 12})
    tensors, meta = states.load("alice")
    assert_same_tensors(tensors, fast_state(1))
    assert meta["base_version"] == "v0003" and meta["turns"] == 12 and meta["user_id"] == "alice"


def test_fast_state_save_requires_the_slow_weights_version(store: Store) -> None:
    with pytest.raises(ValueError, match="base_version"):
        FastStateStore(store).save("alice", fast_state(1), {})


def test_unknown_user_has_no_fast_state(store: Store) -> None:
    assert FastStateStore(store).load("nobody") is None


def test_awkward_user_ids_are_kept_apart_and_listed_back(store: Store) -> None:
    states = FastStateStore(store)
    ids = ["bob", "../etc/passwd", ".hidden", "a/b", "ünï cødé", "bob "]
    for i, user in enumerate(ids):
        states.save(user, fast_state(i), {"base_version": "v0001"})
    assert sorted(states.users()) == sorted(ids)
    for i, user in enumerate(ids):
        assert_same_tensors(states.load(user)[0], fast_state(i))
    states.delete("a/b")
    assert "a/b" not in states.users() and states.load("a/b") is None


def test_corrupt_fast_state_raises_naming_the_file(store: Store) -> None:
    states = FastStateStore(store)
    states.save("carol", fast_state(1), {"base_version": "v0001"})
    store.write_bytes("fast_states/carol.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CorruptDataError, match="fast_states/carol.safetensors"):
        states.load("carol")


# -- deltas ---------------------------------------------------------------------------------------
def test_user_delta_round_trips_packed_bits_and_scales(store: Store) -> None:
    deltas = DeltaStore(store)
    deltas.save_user_delta("alice", "v0002", bitdelta(1), {"format": "bitdelta/1"})
    tensors, meta = deltas.load_user_delta("alice", "v0002")
    assert_same_tensors(tensors, bitdelta(1))
    assert meta["format"] == "bitdelta/1" and meta["base_version"] == "v0002"


def test_user_delta_for_another_base_is_never_returned(store: Store) -> None:
    deltas = DeltaStore(store)
    deltas.save_user_delta("alice", "v0002", bitdelta(1))
    assert deltas.load_user_delta("alice", "v0003") is None
    assert deltas.load_user_delta("bob", "v0002") is None
    assert deltas.user_bases("alice") == ["v0002"]


def test_delta_metadata_cannot_claim_another_base(store: Store) -> None:
    with pytest.raises(ValueError, match="v0001"):
        DeltaStore(store).save_user_delta("alice", "v0002", bitdelta(1), {"base_version": "v0001"})


def test_aggregates_are_listed_and_loaded_per_base(store: Store) -> None:
    deltas = DeltaStore(store)
    deltas.save_aggregate("round-2", "v0002", bitdelta(2), {"clients": 5})
    deltas.save_aggregate("round-1", "v0002", bitdelta(1), {"clients": 4})
    deltas.save_aggregate("round-1", "v0001", bitdelta(9))
    deltas.save_user_delta("alice", "v0002", bitdelta(3))
    loaded = deltas.load_aggregates("v0002")
    assert [a.name for a in loaded] == ["round-1", "round-2"]
    assert_same_tensors(loaded[0].tensors, bitdelta(1))
    assert loaded[1].meta["clients"] == 5
    assert deltas.base_versions() == ["v0001", "v0002"]
    assert deltas.users("v0002") == ["alice"]
    assert deltas.load_aggregates("v0009") == []


# -- episodic index -------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_episodic_index_is_rebuilt_with_the_same_search_results(store: Store, metric: str) -> None:
    import faiss

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((200, 32)).astype(np.float32)
    metadata = [{"item": i, "user": "alice"} for i in range(200)]
    original = faiss.IndexFlatIP(32) if metric == "ip" else faiss.IndexFlatL2(32)
    original.add(keys)
    save_episodic_index(store, "episodic/alice/block0.safetensors", keys, metadata, metric=metric)

    index, loaded = load_episodic_index(store, "episodic/alice/block0.safetensors")
    queries = rng.standard_normal((10, 32)).astype(np.float32)
    expected_distances, expected_ids = original.search(queries, 4)
    distances, ids = index.search(queries, 4)
    assert loaded == metadata and index.ntotal == 200
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-6)


def test_empty_episodic_index_round_trips(store: Store) -> None:
    save_episodic_index(store, "episodic/empty.safetensors", np.zeros((0, 16), np.float32), [])
    index, metadata = load_episodic_index(store, "episodic/empty.safetensors")
    assert index.ntotal == 0 and index.d == 16 and metadata == []


def test_episodic_keys_and_metadata_must_pair_up(store: Store) -> None:
    with pytest.raises(ValueError, match="pair up"):
        save_episodic_index(store, "episodic/x.safetensors", np.zeros((3, 4), np.float32), [{}])
    with pytest.raises(ValueError, match="NaN"):
        save_episodic_index(store, "episodic/x.safetensors", np.full((1, 4), np.nan, np.float32), [{}])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.int64, torch.bool), (torch.bfloat16, torch.float32)])
def test_packed_tensors_are_the_bytes_the_torch_writer_makes(dtypes) -> None:
    """pack_tensors takes safetensors' faster numpy writer where it can; blobs must not change."""
    from safetensors.torch import save as torch_save

    from storage.blobs import _meta_header, pack_tensors, unpack_tensors

    tensors = {f"t{i}": (torch.arange(12) % 3).to(dtype).reshape(3, 4) for i, dtype in enumerate(dtypes)}
    packed = pack_tensors(tensors, {"base_version": "v1"})
    assert packed == torch_save(tensors, metadata=_meta_header({"base_version": "v1"}))
    loaded, meta = unpack_tensors(packed, "test")
    assert meta == {"base_version": "v1"} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
