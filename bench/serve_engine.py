"""The serving engine in-process, learn on vs off: where a batch's time goes, without HTTP or Ray.

`bench/serve_load.py` measures the whole path (clients, Serve's proxy, the replica); this runs
`ServingEngine.serve_batch` directly on batches of `--users` users, learn on and off alternating
in rounds, and splits each batch's wall time into parts: reading the prompts (prefill), the decode
steps, fetching user states, copying each user's new state back (keep_rows), the batch's states
to host memory (to_host), handing them to the saver, the experience log, and the rest (sampling,
building replies). On a GPU the host syncs wait for the kernels queued before them,
so their time is counted where the sync is: in the decode for eager steps; with the decode steps
CUDA-graphed (the default on a GPU, model/decode_graph.py) the decode part is the replays'
launches, and the wait for their kernels lands in `other`, where the replies are read back.
Writes bench/results/serve_engine.json (section cpu, or gpu with --device cuda) and prints a table.

    python bench/serve_engine.py                       # tiny, 16 users, CPU
    python bench/serve_engine.py --device cuda --users 32 [--no-cuda-graphs --section gpu_eager]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.results_file import save_section  # noqa: E402
import model.generate  # noqa: E402
from model.decode_graph import GraphedStep  # noqa: E402
from model.lm import ReverieLM  # noqa: E402
from storage.experience import ExperienceWriter  # noqa: E402
from workers.serving_api import GenerateRequest  # noqa: E402
from workers import serving_engine  # noqa: E402
from workers.serving_engine import ServingConfig, ServingEngine, UserStates  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve_engine.json"
PARTS = {"prefill": [(model.generate, "_prefill")], "decode": [(ReverieLM, "step"), (GraphedStep, "__call__")],
         "get_state": [(UserStates, "get")], "keep_rows": [(serving_engine, "_copy_rows_into")],
         "to_host": [(serving_engine, "_batch_on_host")], "save_behind": [(UserStates, "save_behind")],
         "log": [(ExperienceWriter, "append")]}


class PartTimer:
    """Wall time spent inside chosen functions, summed by part, while `part` is set (outer calls only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.active: str | None = None  # the learn setting being measured; None: not recording
        self._inside = False

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.active is None or self._inside:
                return fn(*args, **kwargs)
            self._inside = True
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[f"{self.active}/{part}"] += time.perf_counter() - started
                self._inside = False
        return timed

    def install(self) -> None:
        for part, functions in PARTS.items():
            for owner, name in functions:
                setattr(owner, name, self.wrap(part, getattr(owner, name)))


def requests_for(users: int, turn: int, learn: bool, max_new_bytes: int) -> list[GenerateRequest]:
    """The prompts bench/serve_load.py sends."""
    tag = "on" if learn else "off"
    return [GenerateRequest(f"{tag}-{i}", f"user {i} turn {turn}: my favourite number is {i * 7}. ".encode(),
                            max_new_bytes, 0.8, learn) for i in range(users)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--users", type=int, default=16, help="users per batch")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (learn on, learn off), order alternating")
    parser.add_argument("--batches", type=int, default=5, help="batches per round and setting")
    parser.add_argument("--max-new-bytes", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-interval-s", type=float, default=ServingConfig().save_interval_s)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=ServingConfig().cuda_graphs,
                        help="on a GPU, decode through CUDA graphs (ServingConfig.cuda_graphs)")
    parser.add_argument("--section", default=None, help="results section (default: cpu, or gpu on a GPU)")
    args = parser.parse_args()
    section = args.section or ("gpu" if args.device.startswith("cuda") else "cpu")
    timer = PartTimer()
    timer.install()
    with tempfile.TemporaryDirectory() as data_root:
        engine = ServingEngine(ServingConfig(data_root=data_root, preset=args.preset, device=args.device,
                                             save_interval_s=args.save_interval_s, cuda_graphs=args.cuda_graphs))
        for turn in range(3):  # warm up: allocator, kernels, the users' first states
            for learn in (True, False):
                engine.serve_batch(requests_for(args.users, turn, learn, args.max_new_bytes))
        engine.states.flush()
        wall = {True: 0.0, False: 0.0}
        turn = 3
        for r in range(args.rounds):
            for learn in ((True, False) if r % 2 == 0 else (False, True)):
                timer.active = "on" if learn else "off"
                started = time.perf_counter()
                for _ in range(args.batches):
                    for reply in engine.serve_batch(requests_for(args.users, turn, learn, args.max_new_bytes)):
                        if isinstance(reply, Exception):
                            raise reply
                    turn += 1
                wall[learn] += time.perf_counter() - started
                timer.active = None
        engine.close()
    batches = args.rounds * args.batches
    result: dict = {"preset": args.preset, "users": args.users, "batches_per_setting": batches,
                    "max_new_bytes": args.max_new_bytes, "save_interval_s": args.save_interval_s,
                    "cuda_graphs": args.cuda_graphs and args.device.startswith("cuda"),
                    "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
                    "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    for learn, key in ((True, "learn_on"), (False, "learn_off")):
        tag = "on" if learn else "off"
        parts = {part: timer.seconds[f"{tag}/{part}"] / batches * 1000 for part in PARTS}
        batch_ms = wall[learn] / batches * 1000
        parts["other"] = batch_ms - sum(parts.values())
        result[key] = {"batch_ms": round(batch_ms, 2), "bytes_per_s": round(args.users * args.max_new_bytes / batch_ms * 1000, 1),
                       "parts_ms": {k: round(v, 2) for k, v in parts.items()}}
    result["ratio"] = round(result["learn_on"]["bytes_per_s"] / result["learn_off"]["bytes_per_s"], 3)
    save_section(RESULTS, section, result)
    print(f"{args.users} users a batch, {args.preset}, {args.device}, {batches} batches per setting (ms per batch)")
    print(f"{'part':12s} {'learn on':>9s} {'learn off':>9s}")
    for part in ["batch", *PARTS, "other"]:
        on, off = ((result[k]["batch_ms"] if part == "batch" else result[k]["parts_ms"][part]) for k in ("learn_on", "learn_off"))
        print(f"{part:12s} {on:9.2f} {off:9.2f}")
    print(f"ratio (learn on / off bytes/s): {result['ratio']}")


if __name__ == "__main__":
    main()
