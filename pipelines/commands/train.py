"""`reverie train`: train slow weights on the embedded corpus or on your own text."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from pipelines.paths import trained_checkpoint
from pipelines.settings import Settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a base model",
        description="Train ReverieLM from scratch. Default corpus: the Python installation's own "
                    "documentation, embedded, nothing downloaded. Saves safetensors + a JSON sidecar "
                    "with the config, steps and held-out bits per byte.")
    parser.add_argument("--preset", default=None, help="model preset: tiny, small or base (default: settings)")
    parser.add_argument("--data", help="corpus: a text file, a directory, a Parquet file or s3://bucket/prefix")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--device", help="cpu, cuda or auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="checkpoint path (default: <data root>/train/<preset>.safetensors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def train_checkpoint(settings: Settings, preset_name: str, out: str | Path, overrides: dict[str, Any] | None = None,
                     data: str | None = None, seed: int = 0, compile: bool = False,
                     progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train a fresh `preset_name` model and save it at `out` (safetensors + JSON sidecar).

    overrides: TrainConfig fields (steps, batch_size, seq_len, lr, device) over the preset's.
    data: a corpus location (default: the embedded corpus). Returns (path, sidecar info).
    `reverie train` and `reverie demo` (when it has no checkpoint yet) both train through here.
    """
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.corpus import Corpus, embedded_corpus
    from model.lm import ReverieLM
    from model.training import TRAIN_PRESETS, train

    model_config = preset(preset_name)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    train_config = dataclasses.replace(TRAIN_PRESETS[preset_name], compile=compile, seed=seed, progress=progress,
                                       **{"device": settings.device, **overrides})
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {train_config.seq_len} exceeds the preset's max_seq_len "
                         f"{model_config.max_seq_len}")
    if data:
        from storage.corpus import read_documents

        corpus = Corpus.split(read_documents(data, settings.storage))
    else:
        corpus = embedded_corpus()
    torch.manual_seed(seed)
    model = ReverieLM(model_config)
    print(f"training {preset_name} ({model.num_params():,} params) on {len(corpus.train):,} bytes "
          f"({len(corpus.heldout):,} held out), {train_config.steps} steps on {train_config.resolved_device()}")
    result = train(model, corpus, train_config)
    info = {"preset": preset_name, "steps": result.steps, "heldout_bpb": result.heldout_bpb,
            "train_bpb": result.final_loss_bpb, "bytes_per_s": result.bytes_per_s, "seconds": result.seconds,
            "corpus": data or "embedded:python-docs"}
    return save_checkpoint(model, out, info), info


def run(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    preset_name = args.preset or settings.preset
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                 "device": args.device}
    path, info = train_checkpoint(settings, preset_name, args.out or trained_checkpoint(settings, preset_name),
                                  overrides, data=args.data, seed=args.seed, compile=args.compile,
                                  progress=not args.no_progress)
    print(json.dumps(info, indent=2))
    print(f"held-out bits per byte: {info['heldout_bpb']:.3f} (uniform baseline 8.0); saved {path}")
    return 0
