"""`reverie generate`: talk to a trained model as one user, with fast memory kept between calls."""

from __future__ import annotations

import argparse

from pipelines.paths import trained_checkpoint, user_state_file
from pipelines.settings import Settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample a reply; the user's fast memory persists between calls",
        description="Reads the prompt (writing fast memory), samples a reply, and saves the user's "
                    "FastState to <data root>/users/<user>.safetensors, so what you tell it in one "
                    "call can be recalled in the next.")
    parser.add_argument("prompt", help="text to feed the model")
    parser.add_argument("--user", required=True, help="whose fast memory to use")
    parser.add_argument("--checkpoint", help="weights (default: <data root>/train/<preset>.safetensors)")
    parser.add_argument("--preset", help="preset whose trained checkpoint to use (default: settings)")
    parser.add_argument("--max-new-bytes", type=int, default=80)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-learn", action="store_true", help="read fast memory but write none")
    parser.add_argument("--reset", action="store_true", help="forget this user's fast memory first")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.fast_state import FastState
    from model.generate import GenerationConfig, generate

    settings = Settings.load(args.config)
    model, _ = load_checkpoint(args.checkpoint or trained_checkpoint(settings, args.preset or settings.preset))
    model.eval()
    state_file = user_state_file(settings, args.user)
    if args.reset:
        state_file.unlink(missing_ok=True)
    state = FastState.load(state_file, model.config) if state_file.exists() else None
    config = GenerationConfig(max_new_bytes=args.max_new_bytes, temperature=args.temperature,
                              learn=not args.no_learn, seed=args.seed)
    generation, state = generate(model, args.prompt.encode("utf-8"), state, config)
    state.save(state_file, model.config)
    print(generation.response.decode("utf-8", errors="replace"))
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in generation.metrics.items())
    print(f"[{args.user}] {metrics}; state {state.nbytes:,} bytes in {state_file}")
    return 0
