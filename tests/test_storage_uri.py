"""The Store contract, run against file:// and a real S3 API alike."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.config import StorageConfig
from storage.errors import ConflictError, NotFoundError
from storage.local_store import LocalStore
from storage.s3_store import S3Store
from storage.uri import Store, check_key, decode_component, encode_component, open_store


def test_written_bytes_read_back_identically(store: Store) -> None:
    store.write_bytes("a/b/blob.bin", b"\x00hello\xff")
    assert store.read_bytes("a/b/blob.bin") == b"\x00hello\xff"
    assert store.exists("a/b/blob.bin")


def test_overwrite_replaces_the_whole_object(store: Store) -> None:
    store.write_bytes("k", b"long original content")
    store.write_bytes("k", b"new")
    assert store.read_bytes("k") == b"new"


def test_missing_key_raises_not_found_naming_the_uri(store: Store) -> None:
    with pytest.raises(NotFoundError, match="nothing/here"):
        store.read_bytes("nothing/here")
    assert not store.exists("nothing/here")


def test_list_is_a_sorted_string_prefix_match(store: Store) -> None:
    for key in ["x/2", "x/1", "xy/3", "y/4"]:
        store.write_bytes(key, b"")
    assert store.list("x/") == ["x/1", "x/2"]
    assert store.list("x") == ["x/1", "x/2", "xy/3"]
    assert store.list() == ["x/1", "x/2", "xy/3", "y/4"]
    assert store.list("absent/") == []


def test_delete_removes_and_is_idempotent(store: Store) -> None:
    store.write_bytes("gone", b"1")
    store.delete("gone")
    store.delete("gone")
    assert not store.exists("gone")


def test_create_if_absent_succeeds_exactly_once(store: Store) -> None:
    assert store.create_if_absent("once", b"first")
    assert not store.create_if_absent("once", b"second")
    assert store.read_bytes("once") == b"first"


def test_compare_and_swap_moves_only_from_the_state_that_was_read(store: Store) -> None:
    store.write_bytes("ptr", b"A")
    _, token = store.read_with_token("ptr")
    new_token = store.compare_and_swap("ptr", b"B", token)
    assert store.read_with_token("ptr") == (b"B", new_token)
    with pytest.raises(ConflictError, match="changed"):
        store.compare_and_swap("ptr", b"C", token)  # stale token
    assert store.read_bytes("ptr") == b"B"


def test_compare_and_swap_on_a_deleted_object_conflicts(store: Store) -> None:
    store.write_bytes("ptr", b"A")
    _, token = store.read_with_token("ptr")
    store.delete("ptr")
    with pytest.raises(ConflictError):
        store.compare_and_swap("ptr", b"B", token)


def test_pyarrow_filesystem_and_path_address_the_same_objects(store: Store) -> None:
    table = pa.table({"x": [1, 2, 3]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write_bytes("tables/t.parquet", sink.getvalue().to_pybytes())
    assert pq.read_table(store.path("tables/t.parquet"), filesystem=store.filesystem()).equals(table)


def test_local_temp_and_lock_files_are_never_listed(local_store: Store) -> None:
    local_store.write_bytes("p/k", b"1")
    _, token = local_store.read_with_token("p/k")
    local_store.compare_and_swap("p/k", b"2", token)  # leaves a .k.lock beside it
    (local_store.root / "p" / ".k.123.tmp").write_bytes(b"partial")
    assert local_store.list() == ["p/k"]


def test_dot_components_and_traversal_are_rejected() -> None:
    for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "a/.tmp", "a\\b"]:
        with pytest.raises(ValueError):
            check_key(bad)
    assert check_key("a/b-c_d/e.parquet") == "a/b-c_d/e.parquet"


@given(st.text(min_size=1, max_size=16))  # 16 chars encode to at most 192 bytes, under the 200-byte limit
def test_any_name_encodes_to_one_safe_reversible_component(name: str) -> None:
    component = encode_component(name)
    assert decode_component(component) == name
    assert "/" not in component and not component.startswith(".")
    check_key(f"users/{component}")


def test_open_store_picks_the_backend_from_the_uri(tmp_path, s3_config: StorageConfig) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", s3_config)
    assert isinstance(s3, S3Store)
    assert s3.path("k") == "bucket/some/prefix/k"
    assert s3.uri_of("k") == "s3://bucket/some/prefix/k"


def test_config_from_env_reads_the_documented_variables(tmp_path) -> None:
    env = {
        "REVERIE_DATA": str(tmp_path / "d"),
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_REGION": "eu-west-1",
        "REVERIE_SPOOL": str(tmp_path / "spool"),
    }
    config = StorageConfig.from_env(env)
    assert config.root == (tmp_path / "d").as_uri()
    assert (config.s3_endpoint_url, config.s3_region, config.spool_dir) == (
        "http://127.0.0.1:9",
        "eu-west-1",
        str(tmp_path / "spool"),
    )
    env["REVERIE_S3_ENDPOINT_URL"] = "http://127.0.0.1:10"
    env["REVERIE_DATA"] = "s3://b/p"
    config = StorageConfig.from_env(env)
    assert (config.root, config.s3_endpoint_url) == ("s3://b/p", "http://127.0.0.1:10")


def test_config_defaults_to_a_local_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = StorageConfig.from_env({})
    assert config.root == (tmp_path / "reverie-data").as_uri()
    assert config.s3_endpoint_url is None and config.region == "us-east-1"


def test_s3_store_survives_pickling_for_worker_processes(s3_store: Store) -> None:
    import pickle

    s3_store.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(s3_store))
    assert clone.read_bytes("k") == b"v"
