"""Serving load: N concurrent simulated users against the Ray Serve app over HTTP, learning on vs off.

Each simulated user sends turns back to back (a closed loop) for `--seconds` per phase; learn_on
writes and saves the user's fast memory every turn, learn_off reads it and writes nothing. Both
phases log every turn to the experience log. Reports requests/s, p50/p99 latency and generated
bytes/s per phase and ratio = learn_on / learn_off bytes/s. ANCHORS.md: Serve itself adds ~1-2 ms
per request, so on the tiny preset the model and the per-turn state save dominate.

Writes bench/results/serve_load.json (section "cpu"; the GPU section is added by a GPU run with
--section gpu) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

RESULTS = Path(__file__).parent / "results" / "serve_load.json"


def run_phase(url: str, users: int, seconds: float, learn: bool, max_new_bytes: int, tag: str) -> dict:
    latencies: list[float] = []
    generated, failures = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def user(i: int) -> None:
        session = requests.Session()
        turn = 0
        while time.monotonic() < stop_at:
            body = {"user_id": f"{tag}-{i}", "prompt": f"user {i} turn {turn}: my favourite number is {i * 7}. ",
                    "max_new_bytes": max_new_bytes, "temperature": 0.8, "learn": learn}
            started = time.perf_counter()
            response = session.post(f"{url}/v1/generate", json=body, timeout=120)
            elapsed = (time.perf_counter() - started) * 1000.0
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                    generated[0] += max_new_bytes
                else:
                    failures[0] += 1
            turn += 1

    started = time.monotonic()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    latencies.sort()
    return {"requests": len(latencies), "failures": failures[0], "seconds": round(wall, 2),
            "req_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1) if latencies else None,
            "bytes_per_s": round(generated[0] / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--users", type=int, default=16, help="concurrent simulated users")
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--max-new-bytes", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--section", default="cpu", help="results section to write (cpu or gpu)")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from workers.serving import build_app

    with tempfile.TemporaryDirectory() as data_root:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app({"data_root": data_root, "preset": args.preset, "num_replicas": args.replicas,
                             "max_batch_size": args.max_batch_size}), name="reverie", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        try:
            run_phase(url, args.users, 3.0, True, args.max_new_bytes, "warmup")
            learn_on = run_phase(url, args.users, args.seconds, True, args.max_new_bytes, "on")
            learn_off = run_phase(url, args.users, args.seconds, False, args.max_new_bytes, "off")
        finally:
            serve.shutdown()
            ray.shutdown()

    section = {
        "preset": args.preset, "users": args.users, "seconds_per_phase": args.seconds,
        "max_new_bytes": args.max_new_bytes, "replicas": args.replicas, "max_batch_size": args.max_batch_size,
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "learn_on": learn_on, "learn_off": learn_off,
        "ratio": round(learn_on["bytes_per_s"] / learn_off["bytes_per_s"], 3) if learn_off["bytes_per_s"] else None,
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.section] = section
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{args.users} users, {args.preset}, {args.replicas} replica(s), {args.seconds:.0f} s per phase")
    for name in ("learn_on", "learn_off"):
        p = section[name]
        print(f"{name:9s} {p['req_per_s']:7.2f} req/s  p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  "
              f"{p['bytes_per_s']:8.1f} bytes/s  failures {p['failures']}")
    print(f"ratio (learn_on / learn_off bytes/s): {section['ratio']}")


if __name__ == "__main__":
    main()
