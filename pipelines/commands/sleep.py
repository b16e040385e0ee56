"""`reverie sleep`: run tonight's consolidation flow in this process (Prefect's ephemeral mode)."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sleep", help="consolidate a day's experience into weights",
        description="Run the `consolidate` Prefect flow here: snapshot fast states, read the day's "
                    "experience, sleep on Ray, evaluate, promote. No server needed (Prefect's "
                    "ephemeral mode); set PREFECT_API_URL to report to a server instead.")
    parser.add_argument("--night", help="UTC day to consolidate, YYYY-MM-DD (default: yesterday)")
    parser.add_argument("--preset", default=None, help="model preset if the store has no checkpoint yet")
    parser.add_argument("--steps", type=int, help="sleep steps per user (default: SleepConfig's)")
    parser.add_argument("--num-workers", type=int,
                        help="Ray Train workers for the shared sleep (default: REVERIE_SLEEP_WORKERS or 1)")
    parser.add_argument("--gpu", action="store_true", default=None,
                        help="Ray Train workers use one GPU each (default: REVERIE_SLEEP_GPU)")
    parser.add_argument("--user-night-gpus", type=float, metavar="SHARE",
                        help="each user's night on this share of a GPU, e.g. 0.25 for four a GPU; 0 = a CPU "
                             "(default: REVERIE_USER_NIGHT_GPUS or 0)")
    parser.add_argument("--student", metavar="search[:RUN_ID]",
                        help="distill into the best genome of a `reverie search` run (the latest with 'search'): "
                             "a fresh model of that architecture learns the served one; promoted only if it "
                             "passes the same gate")
    parser.add_argument("--architecture-steps", type=int,
                        help="shared steps when --student changes the architecture (default: SleepConfig's)")
    parser.add_argument("--recipe", choices=("reverie", "reverie_fast"), default=None,
                        help="the night's recipe (model.consolidation.METHODS). reverie_fast, for a model that "
                             "already knows its language: a quarter of the rehearsal rows (a bulk night ~1.36x "
                             "faster, H200), lr 3e-3, a stronger anchor and earlier turns weighted 4x; measured "
                             "(tiny from 2000-step bases, 30 days, 4 facts a night) to forget as much of the corpus "
                             "as the default (held-out bpb +20-24%%) and keep as many facts (lowest recall over days "
                             "22-30 0.95-0.97 against 0.93-0.96); a barely "
                             "trained model does not learn its first night's facts with it (default: REVERIE_SLEEP_RECIPE "
                             "or reverie.toml's sleep_recipe, else reverie)")
    parser.add_argument("--rehearsal-fraction", type=float, metavar="SHARE",
                        help="rehearsal rows a step reads, a share of the replayed ones (default: the recipe's, "
                             "1.0 or 0.25). 0.25 at the default's lr makes a bulk night ~1.36x faster (H200) but "
                             "forgets more of what the model knew: held-out bpb +35-37%% by day 30 against "
                             "+19-21%% (tiny; bench/NOTES.md, session 20)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # The embedded (ephemeral) Prefect server can take longer than Prefect's 20 s default to start
    # on a busy small machine; a user's own setting wins.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from model.consolidation import named_recipe  # noqa: PLC0415
    from pipelines.consolidate import GateFailed, consolidate  # noqa: PLC0415 - Prefect loads slowly
    from pipelines.settings import Settings  # noqa: PLC0415

    settings = Settings.load(args.config)
    recipe = args.recipe or settings.sleep_recipe
    flags = {"steps": args.steps, "architecture_steps": args.architecture_steps,
             "rehearsal_fraction": args.rehearsal_fraction}
    sleep_config = {name: value for name, value in flags.items() if value is not None}
    try:
        named_recipe(recipe, **sleep_config)  # a bad name or value is said now, not after Prefect and Ray start
    except ValueError as error:
        print(f"reverie sleep: {error}")
        return 2
    try:
        result = consolidate(night=args.night, data=settings.storage.root, preset_name=args.preset or settings.preset,
                             ray_address=settings.ray_address, num_workers=args.num_workers or settings.sleep_workers,
                             use_gpu=settings.sleep_gpu if args.gpu is None else args.gpu,
                             user_night_gpus=(settings.user_night_gpus if args.user_night_gpus is None
                                              else args.user_night_gpus),
                             train_storage=settings.train_storage, sleep_config=sleep_config or None, recipe=recipe,
                             student=args.student)
    except GateFailed as error:
        print(f"reverie sleep: nothing promoted: {error}")
        return 1
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2, default=str))
    return 0

