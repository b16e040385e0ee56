"""The proof: D simulated days of users teaching facts online, each followed by a night's sleep.

Each day every simulated user teaches new facts through online fast-memory writes (`generate`
with learn=True: serving's path). At night each method consolidates each user's day into that
user's personal weights (privacy routing is the same for every method, only the recipe differs).
Then fast memory is wiped and every fact taught so far is probed by exact-match greedy completion,
held-out bpb is measured, and each user's facts are probed with another user's weights (leakage).

Methods: reverie (distill + replay + rehearsal + anchor), no_sleep, naive_finetune (the day's
turns only: no rehearsal, no anchor, no distill), rehearsal_only (replay + rehearsal).
The sleep here is `model.consolidation.sleep` called directly (the same function the Ray tasks of
the nightly flow run), so the numbers measure the learning, not Prefect or Ray.

    python bench/sleep_days.py --days 30            # writes bench/results/sleep_days.{json,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from model.config import preset
from model.consolidation import METHODS, Replay, cpu_weights, model_from, sleep
from model.corpus import embedded_corpus
from model.evaluation import Fact, bpb, recalled, relative_rise
from model.generate import GenerationConfig, generate
from model.lm import ReverieLM
from model.training import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "ne", "pi", "dar", "ul", "fe", "zo", "gri", "be", "ta"]


def make_facts(rng: random.Random, count: int, used: set[bytes]) -> list[Fact]:
    facts = []
    while len(facts) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        word = "".join(rng.choice(SYLLABLES) for _ in range(2))
        cue = f"The secret word of {name} is ".encode()
        if cue not in used:
            used.add(cue)
            facts.append(Fact(cue, f"{word}.".encode()))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--facts-per-day", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--base", help="safetensors weights of a pretrained model of --preset (skips pretraining)")
    parser.add_argument("--steps", type=int, default=40, help="sleep steps per user per night")
    parser.add_argument("--methods", default="reverie,no_sleep,naive_finetune,rehearsal_only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = embedded_corpus()
    rehearsal, heldout = corpus.train[:200_000], corpus.heldout[:50_000]
    model = ReverieLM(preset(args.preset))
    started = time.perf_counter()
    if args.base:
        from safetensors.torch import load_file  # noqa: PLC0415
        model.load_state_dict(load_file(args.base))
    else:
        train(model, corpus, TrainConfig(steps=args.pretrain_steps, device="cpu", progress=False, seed=args.seed))
    base = cpu_weights(model)
    base_bpb = bpb(model, heldout)
    methods = args.methods.split(",")
    users = [f"user{i}" for i in range(args.users)]
    used: set[bytes] = set()
    taught = {u: [make_facts(rng, args.facts_per_day, used) for _ in range(args.days)] for u in users}
    known_by_base = {u: recalled(model, [f for day in taught[u] for f in day]) for u in users}
    out = {"days": args.days, "config": {**vars(args), "base_heldout_bpb": base_bpb,
                                         "sleep": {m: dataclasses.asdict(METHODS[m]) for m in methods if m in METHODS}},
           "methods": {}}
    for method in methods:
        weights = {u: base for u in users}
        states = {u: None for u in users}
        history = {u: [] for u in users}  # each user's turns so far (their own, private)
        recall_by_day, seconds = [], 0.0
        for day in range(args.days):
            for u in users:
                served = model_from(model.config, weights[u])
                today = []
                for fact in taught[u][day]:
                    reply, states[u] = generate(served, fact.text(), states[u],
                                                GenerationConfig(max_new_bytes=16, temperature=0.0, stop_byte=10))
                    today.append(fact.text() + reply.response)
                if method != "no_sleep":
                    tick = time.perf_counter()
                    recipe = dataclasses.replace(METHODS[method], steps=args.steps, seed=args.seed + day)
                    result = sleep(model.config, weights[u], weights[u], [Replay(today, states[u])],
                                   rehearsal + b"\n".join(history[u]), recipe)
                    weights[u] = result.weights
                    states[u] = states[u].soft_reset(0.5)
                    seconds += time.perf_counter() - tick
                history[u] += today
            so_far = [sum(recalled(model_from(model.config, weights[u]), [f for d in taught[u][:day + 1] for f in d]))
                      for u in users]
            recall_by_day.append(sum(so_far) / (len(users) * args.facts_per_day * (day + 1)))
            print(f"{method:15s} day {day + 1:3d} recall {recall_by_day[-1]:.3f}", flush=True)
        final = {u: model_from(model.config, weights[u]) for u in users}
        day1 = sum(sum(recalled(final[u], taught[u][0])) for u in users) / (len(users) * args.facts_per_day)
        drift = sum(relative_rise(base_bpb, bpb(final[u], heldout)) for u in users) / len(users)
        leaks, total = 0, 0
        for i, u in enumerate(users):
            facts = [f for d in taught[u] for f in d]
            foreign = final[users[(i + 1) % len(users)]]
            hits = recalled(foreign, facts)
            leaks += sum(h and not k for h, k in zip(hits, known_by_base[u], strict=True))
            total += len(facts)
        out["methods"][method] = {"recall_by_day": recall_by_day, "day1_recall_final": day1, "bpb_drift": drift,
                                  "leakage": leaks / total if len(users) > 1 else 0.0, "sleep_seconds": seconds}
        print(json.dumps({method: {k: v for k, v in out["methods"][method].items() if k != "recall_by_day"}}))
    out["config"]["wall_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sleep_days.json").write_text(json.dumps(out, indent=2))
    plot(out, RESULTS / "sleep_days.png")


def plot(out: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in out["methods"].items():
        days = range(1, len(result["recall_by_day"]) + 1)
        ax.plot(days, result["recall_by_day"], marker="o", ms=3,
                label=f"{name} (day-1 final {result['day1_recall_final']:.2f}, bpb drift {result['bpb_drift']:+.1%})")
    ax.set_xlabel("day")
    ax.set_ylabel("recall of all facts taught so far (fast memory wiped)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(f"Reverie sleep over {out['days']} days ({out['config']['preset']}, {out['config']['users']} users)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
