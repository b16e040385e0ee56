"""Serving load: N concurrent simulated users against the Ray Serve app over HTTP, learning on vs off.

Each simulated user sends turns back to back (a closed loop); learn on and learn off alternate in
`--rounds` rounds of `--seconds` each, so a change in machine load hits both alike; learn_on
writes the user's fast memory every turn (and saves it behind the replies, at most every
`--save-interval-s` per user), learn_off reads it and writes nothing. Both
phases log every turn to the experience log. Reports requests/s, p50/p99 latency and generated
bytes/s per phase and ratio = learn_on / learn_off bytes/s. ANCHORS.md: Serve itself adds ~1-2 ms
per request, so on the tiny preset the model and the state saves dominate.

Writes bench/results/serve_load.json (section "cpu"; `--device cuda` on the lent GPU writes the
section "gpu") and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results_file import save_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve_load.json"


@dataclass
class Phase:
    """What one setting (learn on or off) measured, summed over its rounds."""

    latencies: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)  # metrics.batch_size of each reply
    generated: int = 0
    failures: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        latencies = sorted(self.latencies)
        return {"requests": len(latencies), "failures": self.failures, "seconds": round(self.seconds, 2),
                "req_per_s": round(len(latencies) / self.seconds, 2),
                "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
                "p99_ms": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1) if latencies else None,
                "bytes_per_s": round(self.generated / self.seconds, 1),
                "mean_batch_size": round(statistics.fmean(self.batch_sizes), 2) if self.batch_sizes else None}


def run_round(url: str, users: int, seconds: float, learn: bool, max_new_bytes: int, tag: str, into: Phase) -> None:
    """`users` closed-loop clients for `seconds`; adds what they measured to `into`."""
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
                    into.latencies.append(elapsed)
                    into.batch_sizes.append(response.json()["metrics"]["batch_size"])
                    into.generated += max_new_bytes
                else:
                    into.failures += 1
            turn += 1

    started = time.monotonic()
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    into.seconds += time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--users", type=int, default=16, help="concurrent simulated users")
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and setting")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (learn on, learn off), order alternating, so load drift hits both alike")
    parser.add_argument("--max-new-bytes", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=None,
                        help="how long a batch waits to fill (default: workers.serving.BATCH_WAIT_TIMEOUT_S)")
    parser.add_argument("--save-interval-s", type=float, default=None,
                        help="how often a user's fast state is saved at most (default: ServingConfig's; 0: every turn)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--device", default="cpu", help="where replicas run the model: cpu or cuda")
    parser.add_argument("--gpus-per-replica", type=float, default=1.0,
                        help="with --device cuda: 0.5 puts two replicas on one GPU (two processes, two GILs)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on a GPU, replicas decode through CUDA graphs (ServingConfig.cuda_graphs)")
    parser.add_argument("--section", default=None, help="results section to write (default: cpu, or gpu with --device cuda)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.section = args.section or ("gpu" if gpu else "cpu")

    import ray
    import torch
    from ray import serve

    from workers.serving import BATCH_WAIT_TIMEOUT_S, build_app
    from workers.serving_engine import ServingConfig

    if args.batch_wait_timeout_s is None:
        args.batch_wait_timeout_s = BATCH_WAIT_TIMEOUT_S
    if args.save_interval_s is None:
        args.save_interval_s = ServingConfig().save_interval_s

    with tempfile.TemporaryDirectory() as data_root:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app({"data_root": data_root, "preset": args.preset, "num_replicas": args.replicas,
                             "max_batch_size": args.max_batch_size, "device": args.device,
                             "batch_wait_timeout_s": args.batch_wait_timeout_s, "save_interval_s": args.save_interval_s,
                             "cuda_graphs": args.cuda_graphs, "num_gpus": args.gpus_per_replica if gpu else 0}), name="reverie", route_prefix="/")
        url = f"http://127.0.0.1:{args.port}"
        try:
            run_round(url, args.users, 3.0, True, args.max_new_bytes, "warmup", Phase())
            phases = {True: Phase(), False: Phase()}
            for r in range(args.rounds):
                for learn in ((True, False) if r % 2 == 0 else (False, True)):
                    run_round(url, args.users, args.seconds, learn, args.max_new_bytes, "on" if learn else "off",
                              phases[learn])
            learn_on, learn_off = phases[True].summary(), phases[False].summary()
        finally:
            serve.shutdown()
            ray.shutdown()

    section = {
        "preset": args.preset, "users": args.users, "seconds_per_round": args.seconds, "rounds": args.rounds,
        "max_new_bytes": args.max_new_bytes, "replicas": args.replicas, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "save_interval_s": args.save_interval_s,
        "gpus_per_replica": args.gpus_per_replica if gpu else 0, "cuda_graphs": args.cuda_graphs and gpu,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "machine": {"cpus": os.cpu_count(), "ray_num_cpus": args.num_cpus, "python": platform.python_version(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "learn_on": learn_on, "learn_off": learn_off,
        "ratio": round(learn_on["bytes_per_s"] / learn_off["bytes_per_s"], 3) if learn_off["bytes_per_s"] else None,
    }
    save_section(RESULTS, args.section, section)
    print(f"{args.users} users, {args.preset}, {args.replicas} replica(s), {args.rounds} x {args.seconds:.0f} s per setting")
    for name in ("learn_on", "learn_off"):
        p = section[name]
        print(f"{name:9s} {p['req_per_s']:7.2f} req/s  p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms  "
              f"{p['bytes_per_s']:8.1f} bytes/s  batch {p['mean_batch_size']}  failures {p['failures']}")
    print(f"ratio (learn_on / learn_off bytes/s): {section['ratio']}")


if __name__ == "__main__":
    main()
