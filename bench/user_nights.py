"""Users' nights through Ray, as the nightly flow runs them: users per second on CPUs or GPU shares.

`bench/gpu_suite.py` times one user's night step by step on a GPU that is already warm. The flow
pays more per user: a Ray task starts, the weights arrive through the object store, the student
and the teacher are built on the host and moved to the device, a graphed night captures its step,
and the delta goes back. This runs `workers.consolidation.consolidate_users`, the flow's own call,
on `--users` synthetic users, each with `--texts` interactions and a fast state grown by reading
them, and reports the wall time and each user's finish time.

    python bench/user_nights.py                                   # CPU tasks here, tiny -> "cpu"
    python bench/user_nights.py --preset base --gpus-per-user 0.25 --cuda-graph   # -> "gpus_0.25"
    python bench/user_nights.py --preset base --gpus-per-user 1 --cuda-graph --in-process   # no Ray

Writes bench/results/user_nights.json (a section per run label, earlier sections kept) and prints
a table. RAY_ADDRESS joins a cluster; unset, a local Ray starts with this machine's CPUs and GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "user_nights.json"

from model.config import preset  # noqa: E402
from model.consolidation import SleepConfig  # noqa: E402
from model.corpus import embedded_corpus  # noqa: E402
from model.fast_state import FastState  # noqa: E402
from model.lm import ReverieLM  # noqa: E402
from workers.consolidation import (UserNight, UserResult, consolidate_user, consolidate_users,  # noqa: E402
                                   ensure_ray)

WORDS = ["door", "code", "blue", "river", "seven", "lamp", "north", "violin", "tea", "garden", "Mara", "Olek"]


def interactions(count: int, rng: random.Random) -> list[bytes]:
    """Turns of the size the GPU suite uses (~170 bytes): what a user says and the reply."""
    said = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(count)]
    return [f"user: remember that {s}. assistant: noted, {s}.".encode() for s in said]


@torch.no_grad()
def fast_state_after(model: ReverieLM, texts: list[bytes]) -> bytes:
    """The user's fast state after the model read their turns (serving's writes), as the flow stores it."""
    state = FastState.empty(model.config, 1)
    for text in texts:
        _, state = model(torch.tensor(list(text))[None], state)
    return state.to_bytes(model.config)


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = preset(args.preset)
    served = ReverieLM(config).eval()
    weights = {k: v.detach().contiguous() for k, v in served.state_dict().items()}
    rng = random.Random(0)
    nights = []
    for user in range(args.users):
        texts = interactions(args.texts, rng)
        nights.append(UserNight(f"user{user}", texts, state=fast_state_after(served, texts)))
    sleep_config = SleepConfig(cuda_graph=args.cuda_graph, **({"steps": args.steps} if args.steps else {}))
    rehearsal = embedded_corpus().train[:200_000]
    finished: list[float] = []

    def on_done(result: UserResult) -> None:
        finished.append(time.perf_counter() - started)
        print(f"  {result.user_id} done at {finished[-1]:6.1f} s", flush=True)

    if args.in_process:  # the same nights one after another here: what a night costs without Ray
        device = "cuda" if args.gpus_per_user else "cpu"
        started = time.perf_counter()
        for night in nights:
            on_done(consolidate_user(config.to_json(), weights, weights, night, rehearsal, sleep_config, "v0001",
                                     device=device))
    else:
        ensure_ray(os.environ.get("RAY_ADDRESS"), num_cpus=None)
        started = time.perf_counter()
        consolidate_users(config, weights, weights, nights, rehearsal, sleep_config, "v0001", on_done,
                          gpus_per_user=args.gpus_per_user)
    wall = time.perf_counter() - started
    return {"preset": args.preset, "users": args.users, "interactions_per_user": args.texts,
            "gpus_per_user": args.gpus_per_user, "in_process": args.in_process, "cuda_graph": args.cuda_graph,
            "steps": sleep_config.steps, "torch_threads": torch.get_num_threads(),
            "batch_size": sleep_config.batch_size, "seq_len": sleep_config.seq_len, "wall_s": wall,
            "users_per_s": args.users / wall, "interactions_per_s": args.users * args.texts / wall,
            "first_user_s": finished[0], "finish_times_s": finished,
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                     "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "torch": torch.__version__, "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--texts", type=int, default=32, help="interactions per user (the GPU suite's 32)")
    parser.add_argument("--steps", type=int, help="sleep steps per user (default: SleepConfig's)")
    parser.add_argument("--gpus-per-user", type=float, default=0.0,
                        help="each night's share of a GPU, as REVERIE_USER_NIGHT_GPUS (default 0: CPU tasks)")
    parser.add_argument("--cuda-graph", action="store_true", help="SleepConfig.cuda_graph (on GPU shares)")
    parser.add_argument("--in-process", action="store_true",
                        help="no Ray: the nights one after another in this process (on CUDA if --gpus-per-user "
                             "is set), to tell a night's own cost from what the Ray tasks add")
    parser.add_argument("--label", help="the results section (default: cpu, or gpus_<share>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.gpus_per_user and not torch.cuda.is_available() and not os.environ.get("RAY_ADDRESS"):
        parser.error("--gpus-per-user needs a GPU on this machine, or RAY_ADDRESS of a cluster with GPUs")
    label = args.label or ((f"gpus_{args.gpus_per_user:g}" if args.gpus_per_user else "cpu")
                           + ("_in_process" if args.in_process else ""))
    result = run(args)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("\n| run | preset | users | steps | wall s | first user s | users/s | interactions/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['preset']} | {r['users']} | {r['steps']} | {r['wall_s']:.1f} | {r['first_user_s']:.1f} "
              f"| {r['users_per_s']:.3f} | {r['interactions_per_s']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
