"""`reverie train`: train slow weights on the embedded corpus or on your own text."""

from __future__ import annotations

import argparse
import dataclasses
import json

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


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.corpus import Corpus, embedded_corpus
    from model.lm import ReverieLM
    from model.training import TRAIN_PRESETS, train

    settings = Settings.load(args.config)
    preset_name = args.preset or settings.preset
    model_config = preset(preset_name)
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                   "lr": args.lr, "device": args.device or settings.device}.items() if v is not None}
    train_config = dataclasses.replace(TRAIN_PRESETS[preset_name], compile=args.compile, seed=args.seed,
                                       progress=not args.no_progress, **overrides)
    if train_config.seq_len > model_config.max_seq_len:
        raise ValueError(f"--seq-len {train_config.seq_len} exceeds the preset's max_seq_len "
                         f"{model_config.max_seq_len}")
    if args.data:
        from storage.corpus import read_documents

        corpus = Corpus.split(read_documents(args.data, settings.storage))
    else:
        corpus = embedded_corpus()
    torch.manual_seed(args.seed)
    model = ReverieLM(model_config)
    print(f"training {preset_name} ({model.num_params():,} params) on {len(corpus.train):,} bytes "
          f"({len(corpus.heldout):,} held out), {train_config.steps} steps on {train_config.resolved_device()}")
    result = train(model, corpus, train_config)
    out = args.out or trained_checkpoint(settings, preset_name)
    info = {"preset": preset_name, "steps": result.steps, "heldout_bpb": result.heldout_bpb,
            "train_bpb": result.final_loss_bpb, "bytes_per_s": result.bytes_per_s, "seconds": result.seconds,
            "corpus": args.data or "embedded:python-docs"}
    path = save_checkpoint(model, out, info)
    print(json.dumps(info, indent=2))
    print(f"held-out bits per byte: {result.heldout_bpb:.3f} (uniform baseline 8.0); saved {path}")
    return 0
