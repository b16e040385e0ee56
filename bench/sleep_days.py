"""The proof: D simulated days of users teaching facts online, each followed by a night's sleep.

Each day every simulated user teaches new facts through online fast-memory writes (`generate`
with learn=True: serving's path). At night each method consolidates each user's day into that
user's personal weights (privacy routing is the same for every method, only the recipe differs).
Then fast memory is wiped and every fact taught so far is probed by exact-match greedy completion,
held-out bpb is measured, and each user's facts are probed with another user's weights (leakage).

Methods: reverie (replay + distill + the user's earlier turns replayed + corpus rehearsal + anchor),
reverie_lean (the same with a quarter of the earlier and rehearsal rows: measured to forget some
earlier facts), reverie_fast (a quarter of the rehearsal rows, made up for by a lower lr, a
stronger anchor and earlier turns weighted 4x, for a model that already knows its language: a bulk
night's speed lever),
no_sleep, naive_finetune (the day's turns only), rehearsal_only (the day's turns + corpus rehearsal).
Every method gets each user's earlier turns; only recipes with `earlier_replay` use them.
The sleep here is `model.consolidation.sleep` called directly (the same function the Ray tasks of
the nightly flow run), so the numbers measure the learning, not Prefect or Ray.

    python bench/sleep_days.py --days 30            # writes bench/results/sleep_days.{json,png}
    python bench/sleep_days.py --methods reverie,half --recipe half:earlier_fraction=0.5,rehearsal_fraction=0.5,earlier_weight=4 \
        --seed 1 --out /tmp/half-seed1                 # a recipe of your own against the default
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig, preset
from model.consolidation import METHODS, Replay, SleepConfig, cpu_weights, model_from, sleep
from model.corpus import Corpus, embedded_corpus
from model.evaluation import Fact, bpb, recalled, relative_rise
from model.fast_state import FastState
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


@dataclass
class World:
    """What every method starts from: the pretrained base, the data, and who teaches what when."""

    config: ModelConfig
    base: dict[str, torch.Tensor]
    base_bpb: float
    rehearsal: bytes
    heldout: bytes
    taught: dict[str, list[list[Fact]]]  # user -> day -> facts taught that day
    known_by_base: dict[str, list[bool]]  # user -> which of their facts the base already recalls


def build_world(base: ReverieLM, corpus: Corpus, users: int, days: int, facts_per_day: int, seed: int) -> World:
    rng = random.Random(seed)
    used: set[bytes] = set()
    names = [f"user{i}" for i in range(users)]
    taught = {u: [make_facts(rng, facts_per_day, used) for _ in range(days)] for u in names}
    return World(base.config, cpu_weights(base), bpb(base, corpus.heldout[:50_000]), corpus.train[:200_000],
                 corpus.heldout[:50_000], taught,
                 {u: recalled(base, [f for day in taught[u] for f in day]) for u in names})


def taught_until(world: World, user: str, days: int) -> list[Fact]:
    """The facts `user` taught in the first `days` days, in order."""
    return [f for day in world.taught[user][:days] for f in day]


def teach(served: ReverieLM, facts: list[Fact], state: FastState | None) -> tuple[list[bytes], FastState]:
    """A day of one user: each fact said to the model online (fast-memory writes), as serving does."""
    turns = []
    for fact in facts:
        reply, state = generate(served, fact.text(), state,
                                GenerationConfig(max_new_bytes=16, temperature=0.0, stop_byte=10))
        turns.append(fact.text() + reply.response)
    return turns, state


def simulate(world: World, recipe: SleepConfig | None, days: int, seed: int = 0, log: str = "") -> dict:
    """Run `days` days of teaching and nights of `recipe` (None: no sleep); returns the method's
    metrics. Each user's weights only ever see that user's own turns (privacy routing)."""
    users = list(world.taught)
    weights = {u: world.base for u in users}
    states: dict[str, FastState | None] = {u: None for u in users}
    history: dict[str, list[bytes]] = {u: [] for u in users}  # each user's turns so far (their own, private)
    recall_by_day, seconds = [], 0.0
    for day in range(days):
        for u in users:
            today, states[u] = teach(model_from(world.config, weights[u]), world.taught[u][day], states[u])
            if recipe is not None:
                tick = time.perf_counter()
                night = dataclasses.replace(recipe, seed=seed + day)
                result = sleep(world.config, weights[u], weights[u], [Replay(today, states[u], history[u])],
                               world.rehearsal, night)
                weights[u], states[u] = result.weights, states[u].soft_reset(0.5)
                seconds += time.perf_counter() - tick
            history[u] += today
        so_far = {u: taught_until(world, u, day + 1) for u in users}
        hits = sum(sum(recalled(model_from(world.config, weights[u]), so_far[u])) for u in users)
        recall_by_day.append(hits / sum(len(facts) for facts in so_far.values()))
        if log:
            print(f"{log:15s} day {day + 1:3d} recall {recall_by_day[-1]:.3f}", flush=True)
    return {"recall_by_day": recall_by_day, **final_metrics(world, weights, days), "sleep_seconds": seconds}


def final_metrics(world: World, weights: dict[str, dict[str, torch.Tensor]], days: int) -> dict[str, float]:
    """Day-1 facts recalled at the end, held-out bpb drift, and leakage: each user's facts recalled
    by the next user's weights, not counting those the base weights already recalled."""
    users = list(weights)
    final = {u: model_from(world.config, weights[u]) for u in users}
    day1 = sum(sum(recalled(final[u], world.taught[u][0])) for u in users) / sum(len(world.taught[u][0]) for u in users)
    drift = sum(relative_rise(world.base_bpb, bpb(final[u], world.heldout)) for u in users) / len(users)
    leaks, total = 0, 0
    for i, u in enumerate(users):
        facts = taught_until(world, u, days)
        hits = recalled(final[users[(i + 1) % len(users)]], facts)
        leaks += sum(h and not k for h, k in zip(hits, world.known_by_base[u][:len(facts)], strict=True))
        total += len(facts)
    return {"day1_recall_final": day1, "bpb_drift": drift, "leakage": leaks / total if len(users) > 1 else 0.0}


def parse_recipe(text: str) -> tuple[str, SleepConfig]:
    """`name:field=value,...` -> (name, the default recipe with those SleepConfig fields changed)."""
    name, _, assignments = text.partition(":")
    types = {f.name: type(getattr(SleepConfig(), f.name)) for f in dataclasses.fields(SleepConfig)}
    changes = {}
    for assignment in filter(None, assignments.split(",")):
        key, _, value = assignment.partition("=")
        if key not in types or not value:
            raise argparse.ArgumentTypeError(f"{assignment!r} in --recipe {text!r}: want field=value with a field "
                                             f"of SleepConfig ({', '.join(types)})")
        changes[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
    if not name or name in METHODS or name == "no_sleep":
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: name it (NAME:field=value,...), not after a method "
                                         f"of METHODS or no_sleep")
    return name, dataclasses.replace(METHODS["reverie"], **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--facts-per-day", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=2000,
                        help="the base's pretraining steps; a base that has not yet learned the corpus "
                             "(200 steps: 3.66 bits/byte) goes on learning it from rehearsal, which hides "
                             "forgetting (default: %(default)s, 2.28 bits/byte)")
    parser.add_argument("--base", help="safetensors weights of a pretrained model of --preset (skips pretraining)")
    parser.add_argument("--steps", type=int, help="sleep steps per user per night (default: each recipe's own)")
    parser.add_argument("--methods", default="reverie,reverie_fast,reverie_lean,no_sleep,naive_finetune,rehearsal_only")
    parser.add_argument("--recipe", type=parse_recipe, action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                        help="a method of your own: the default recipe with these SleepConfig fields changed "
                             "(repeatable; name it in --methods)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "sleep_days",
                        help="where the results go: OUT.json and OUT.png (default: bench/results/sleep_days)")
    args = parser.parse_args()
    known = {**METHODS, **dict(args.recipe)}
    unknown = [m for m in args.methods.split(",") if m not in known and m != "no_sleep"]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {sorted(known)} and no_sleep, or define one with --recipe")
    if args.users * args.days * args.facts_per_day > len(SYLLABLES) ** 2:
        parser.error(f"{args.users} users x {args.days} days x {args.facts_per_day} facts a day need more distinct "
                     f"names than the {len(SYLLABLES) ** 2} that two syllables make: ask for fewer")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    corpus = embedded_corpus()
    model = ReverieLM(preset(args.preset))
    started = time.perf_counter()
    if args.base:
        from safetensors.torch import load_file  # noqa: PLC0415
        model.load_state_dict(load_file(args.base))
    else:
        train(model, corpus, TrainConfig(steps=args.pretrain_steps, device="cpu", progress=False, seed=args.seed))
    world = build_world(model, corpus, args.users, args.days, args.facts_per_day, args.seed)
    methods = args.methods.split(",")
    recipes = {m: dataclasses.replace(known[m], **({"steps": args.steps} if args.steps else {}))
               for m in methods if m != "no_sleep"}
    settings = {**vars(args), "recipe": [name for name, _ in args.recipe], "out": str(args.out)}
    out = {"days": args.days, "config": {**settings, "base_heldout_bpb": world.base_bpb,
                                         "sleep": {m: dataclasses.asdict(r) for m, r in recipes.items()}},
           "methods": {}}
    for method in methods:
        out["methods"][method] = simulate(world, recipes.get(method), args.days, args.seed, log=method)
        print(json.dumps({method: {k: v for k, v in out["methods"][method].items() if k != "recall_by_day"}}))
    out["config"]["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2))
    plot(out, args.out.with_suffix(".png"))


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
