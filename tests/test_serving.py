"""Serving over HTTP: a real local Ray cluster, Serve's proxy on 127.0.0.1, two model replicas.

One Ray/Serve start for the module (it dominates the run time on two cores); each test uses its
own user ids so tests do not depend on one another's state, except the hot-swap test, which
moves the registry's `current` and therefore runs last.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow.dataset as ds
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.bitdelta import compress, select_matrices
from model.config import ModelConfig
from model.fast_state import FastState
from model.generate import GenerationConfig, generate
from model.lm import ReverieLM
from storage.checkpoints import CheckpointRegistry
from storage.deltas import DeltaStore
from tests.conftest import free_port

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from workers.serving import build_app  # noqa: E402

PROBE = {"prompt": "The secret number is", "max_new_bytes": 16, "temperature": 0.0, "learn": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-data")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"data_root": str(root), "num_replicas": 2, "poll_interval_s": 0.2}),
              name="reverie", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "root": root, "registry": CheckpointRegistry(str(root))}
    serve.shutdown()
    ray.shutdown()


def post(server, path: str, body) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server["url"] + path, data=data, timeout=60)


def generate_ok(server, user_id: str, **fields) -> dict:
    response = post(server, "/v1/generate", {"user_id": user_id, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def probe(server, user_id: str) -> bytes:
    return base64.b64decode(generate_ok(server, user_id, **PROBE)["response_b64"])


def user_info(server, user_id: str) -> dict:
    response = requests.get(f"{server['url']}/v1/users/{user_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def teach(server, user_id: str, turns: int = 3) -> None:
    for _ in range(turns):
        generate_ok(server, user_id, prompt="The secret number is 7431. Remember 7431. " * 2,
                    max_new_bytes=8, temperature=0.0)


def test_health_and_reply_shape(server):
    assert requests.get(server["url"] + "/healthz", timeout=30).json()["status"] == "ok"
    reply = generate_ok(server, "shape-user", prompt="hello", max_new_bytes=5, temperature=0.0)
    assert set(reply) >= {"text", "response_b64", "model_version", "metrics"}
    assert len(base64.b64decode(reply["response_b64"])) == 5
    assert reply["model_version"] == server["registry"].current()
    assert set(reply["metrics"]) == {"active_params", "latency_ms", "complexity", "memory_writes", "batch_size"}


def test_concurrent_users_are_decoded_in_shared_batches(server):
    body = {"prompt": "Hello there, how are you today?", "max_new_bytes": 16, "temperature": 0.0}
    with ThreadPoolExecutor(12) as pool:
        for _ in range(2):  # the first wave may meet replicas still idle
            replies = list(pool.map(lambda i: generate_ok(server, f"batch-{i}", **body), range(12)))
    assert max(r["metrics"]["batch_size"] for r in replies) > 1


def test_fast_memory_is_used_by_its_user_and_no_one_else(server):
    fresh = probe(server, "iso-fresh")
    teach(server, "iso-a")
    assert user_info(server, "iso-a")["memory_writes"] > 0
    assert probe(server, "iso-a") != fresh  # A's next request reads what A taught
    assert probe(server, "iso-b") == fresh  # B's never does
    info_b = user_info(server, "iso-b")
    assert (info_b["memory_writes"], info_b["bytes_seen"], info_b["turns"]) == (0, 0, 0)


def test_reset_returns_a_user_to_the_baseline(server):
    fresh = probe(server, "reset-fresh")
    teach(server, "reset-a", turns=1)
    assert probe(server, "reset-a") != fresh
    assert post(server, "/v1/reset", {"user_id": "reset-a"}).status_code == 200
    assert user_info(server, "reset-a")["memory_writes"] == 0
    assert probe(server, "reset-a") == fresh


def test_every_turn_is_logged_exactly_once(server):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: generate_ok(server, f"log-{i % 4}", prompt=f"turn {i}", max_new_bytes=4),
                                range(16)))
    ours = {r["event_id"] for r in replies}
    assert len(ours) == 16
    table = ds.dataset(str(server["root"] / "experience"), format="parquet", partitioning="hive").to_table()
    counts = Counter(e for e in table.column("event_id").to_pylist() if e in ours)
    assert counts == Counter({e: 1 for e in ours})  # raw files, before any reader-side dedup
    rows = [r for r in table.to_pylist() if r["event_id"] in ours]
    assert all(r["model_version"] == server["registry"].current() and r["surprise"] > 0 for r in rows)


def test_personal_delta_is_served_only_to_its_owner(server):
    registry = server["registry"]
    version = registry.current()
    tensors, manifest = registry.load(version)
    model = ReverieLM(ModelConfig.from_dict(manifest["config"]))
    names = select_matrices(model)
    tuned = {k: v + 0.05 * torch.randn_like(v) if k in names else v for k, v in tensors.items()}
    delta = compress(tensors, tuned, names, version)
    DeltaStore(str(server["root"])).save_user_delta("delta-owner", version, delta.to_tensors(), delta.metadata())
    fresh = probe(server, "delta-fresh")
    assert user_info(server, "delta-owner")["has_delta"]
    assert probe(server, "delta-owner") != fresh
    assert probe(server, "delta-other") == fresh


def _replica_actor_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ReverieModel" in a["name"]]


def saved_info(server, user_id: str, turns: int) -> dict:
    """The user's info once it reports all `turns` taught turns as saved. Serve's sticky routing is
    best effort: a replica that does not hold the user answers from the store, which can lag the
    one that does by up to its save interval (1 s here)."""
    deadline = time.monotonic() + 30
    while (info := user_info(server, user_id))["turns"] != turns:
        assert info["turns"] < turns and time.monotonic() < deadline, info
        time.sleep(0.2)
    return info


def test_killed_replica_loses_no_saved_state(server):
    teach(server, "kill-a", turns=2)
    before_info, before_probe = saved_info(server, "kill-a", turns=2), probe(server, "kill-a")
    victim = next(n for n in _replica_actor_names() if n.endswith(before_info["replica"]))
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while True:
        response = requests.get(f"{server['url']}/v1/users/kill-a", timeout=30)
        if response.status_code == 200 and response.json()["replica"] != before_info["replica"]:
            break
        assert response.status_code in (200, 503) and time.monotonic() < deadline, response.text
        time.sleep(0.5)
    after = response.json()
    for key in ("turns", "bytes_seen", "memory_writes", "pm_slots_used", "em_slots_used"):
        assert after[key] == before_info[key], key
    assert probe(server, "kill-a") == before_probe


def _offline_reply(registry: CheckpointRegistry, version: str) -> bytes:
    tensors, manifest = registry.load(version)
    model = ReverieLM(ModelConfig.from_dict(manifest["config"])).eval()
    model.load_state_dict(tensors)
    config = GenerationConfig(max_new_bytes=PROBE["max_new_bytes"], temperature=0.0, learn=False)
    return generate(model, PROBE["prompt"].encode(), FastState.empty(model.config, 1), config)[0].response


def test_hot_swap_under_load_drops_nothing_and_names_the_producing_version(server):
    registry = server["registry"]
    old = registry.current()
    tensors, manifest = registry.load(old)
    # An untrained tied-embedding model greedily repeats the last byte whatever its init; flipping the
    # final norm flips the logits, so greedy replies tell the two versions apart.
    new_tensors = {**tensors, "final_norm.weight": -tensors["final_norm.weight"]}
    new = registry.save(new_tensors, {k: manifest[k] for k in ("config", "preset")}, parent=old)
    expected = {old: _offline_reply(registry, old), new: _offline_reply(registry, new)}
    assert expected[old] != expected[new]
    teach(server, "swap-learner", turns=1)
    results, stop, counter = [], threading.Event(), iter(range(10**6))

    def client() -> None:
        while not stop.is_set():
            user = f"swap-{next(counter)}"  # fresh users: the reply is a function of the version alone
            response = post(server, "/v1/generate", {"user_id": user, **PROBE})
            results.append((response.status_code, response.json()))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    registry.promote(new, expected_current=old)
    deadline = time.monotonic() + 60
    while not any(r.get("model_version") == new for _, r in list(results)[-6:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # both replicas serve the new version now; keep the load on a little longer
    stop.set()
    for t in threads:
        t.join()
    assert [s for s, _ in results if s != 200] == []
    versions = Counter(r["model_version"] for _, r in results)
    assert set(versions) == {old, new} and versions[old] > 0 and versions[new] > 0
    for _, reply in results:
        assert base64.b64decode(reply["response_b64"]) == expected[reply["model_version"]]
    generate_ok(server, "swap-learner", prompt="after the swap", max_new_bytes=2)
    assert user_info(server, "swap-learner")["state_version"] == new


BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    ({"prompt": "x"}, "user_id is required"),
    ({"user_id": "u" * 129, "prompt": "x"}, "user_id must be 1 to 128"),
    ({"user_id": "u", "prompt": "x" * 9000}, "limit is 8192"),
    ({"user_id": "u", "prompt": "x", "prompt_b64": "eA=="}, "exactly one of"),
    ({"user_id": "u"}, "exactly one of"),
    ({"user_id": "u", "prompt_b64": "%%%"}, "not valid base64"),
    (b'{"user_id": "u", "prompt": "\\ud800"}', "lone surrogate"),
    ({"user_id": "u", "prompt": "x", "max_new_bytes": -1}, "max_new_bytes must be in"),
    ({"user_id": "u", "prompt": "x", "temperature": 1e9}, "temperature must be in"),
    (b'{"user_id": "u", "prompt": "x", "temperature": NaN}', "temperature must be in"),
    ({"user_id": "u", "prompt": "x", "learn": "yes"}, "learn must be"),
]


@pytest.mark.parametrize(("body", "message"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(server, body, message):
    response = post(server, "/v1/generate", body)
    assert 400 <= response.status_code < 500 and message in response.json()["error"], response.text


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                     max_size=3), max_leaves=5)
request_bodies = st.fixed_dictionaries({}, optional={
    "user_id": st.text(max_size=12) | json_values, "prompt": st.text(max_size=20) | json_values,
    "prompt_b64": st.sampled_from(["aGk=", "", "!!", "aGk"]) | json_values,
    "max_new_bytes": st.integers(-5, 5000) | json_values, "temperature": st.floats() | json_values,
    "learn": json_values})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=request_bodies)
def test_fuzzed_requests_over_http_never_get_a_5xx(server, body):
    if isinstance(body.get("max_new_bytes"), int) and not isinstance(body["max_new_bytes"], bool):
        body["max_new_bytes"] = min(body["max_new_bytes"], 4)  # keep the valid ones cheap
    response = post(server, "/v1/generate", json.dumps(body).encode())
    assert response.status_code < 500, response.text
