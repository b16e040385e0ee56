"""The `reverie` command as a new user runs it: train, then talk as one user across calls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import free_port


def reverie(*args: str, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_then_generate_keeps_the_users_fast_memory_between_calls(tmp_path):
    env = {**os.environ, "REVERIE_DATA": str(tmp_path / "data")}
    trained = reverie("train", "--preset", "tiny", "--steps", "20", "--no-progress", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr
    sidecar = json.loads((tmp_path / "data" / "train" / "tiny.json").read_text())
    assert 0 < sidecar["heldout_bpb"] < 8.0
    assert "held-out bits per byte" in trained.stdout

    first = reverie("generate", "--user", "alice", "My door code is 4711.", "--max-new-bytes", "8",
                    cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    state_file = tmp_path / "data" / "users" / "alice.safetensors"
    assert state_file.exists()
    second = reverie("generate", "--user", "alice", "The code is", "--max-new-bytes", "8", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "memory_writes" in second.stdout


def test_generate_without_a_checkpoint_says_what_to_do(tmp_path):
    env = {**os.environ, "REVERIE_DATA": str(tmp_path / "empty")}
    result = reverie("generate", "--user", "bob", "hi", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "reverie train" in result.stderr


def test_serve_and_demo_name_a_taken_port_before_starting_ray(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["REVERIE_DATA"] = str(tmp_path / "data")
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        for command in (["serve"], ["demo"]):
            result = reverie(*command, "--port", str(port), cwd=tmp_path, env=env)
            assert result.returncode == 2, result.stderr
            assert f"port {port} on 127.0.0.1 is taken" in result.stderr
            assert "--port" in result.stderr
            assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "demo").exists()  # nothing pretrained, nothing wiped


def test_sleep_names_a_bad_recipe_before_starting_anything(tmp_path):
    """A bad value on the command line, or a recipe name in the environment that does not exist,
    is said at once, with what is known; nothing is started or written."""
    env = {**os.environ, "REVERIE_DATA": str(tmp_path / "data")}
    result = reverie("sleep", "--rehearsal-fraction", "0", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "rehearsal_fraction must be in (0, 1], got 0.0" in result.stdout
    result = reverie("sleep", cwd=tmp_path, env={**env, "REVERIE_SLEEP_RECIPE": "reverie_fastest"})
    assert result.returncode == 2
    assert "unknown sleep recipe 'reverie_fastest'; known:" in result.stdout
    assert "reverie_fast," in result.stdout
    assert not (tmp_path / "data").exists()
