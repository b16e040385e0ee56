"""Where a step's GPU time goes: one training, decode or sleep step under torch.profiler, kernels grouped.

A CUDA graph hides its kernels from the profiler, so this runs the step the suite captures
(bench/gpu_suite.py) without the graph and sums the GPU time of its kernels by name: the next
lever is chosen from a measurement. Prints the top kernels and adds a run to
bench/results/kernel_profile.json under its name.

    python bench/kernel_profile.py train                      # base, b=16, T=2048, writes compiled
    python bench/kernel_profile.py train --compile-layers     # as reverie-graph-compiled
    python bench/kernel_profile.py decode --batch 256 --learn --compile   # one graph+compile step
    python bench/kernel_profile.py sleep --batch 64 --seq-len 256 --ops   # one shared-bulk sleep step
    python bench/kernel_profile.py train --preset tiny --batch 2 --seq-len 128   # anywhere (CPU ops)
    python bench/kernel_profile.py train --preset small --batch 2 --seq-len 1024 --bytes   # ops and bytes written

--bytes counts the aten ops of the step and the bytes their outputs hold (views excluded): the
memory traffic a step asks for, the same on any device, so a CPU can compare two versions of the
code exactly where its timings would be noise.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from bench.gpu_suite import Sizes, warm_state  # noqa: E402
from model.decode_graph import GraphedStep  # noqa: E402
from bench.results_file import save_section  # noqa: E402
from model.config import preset  # noqa: E402
from bench.float8_rowwise import use_float8  # noqa: E402
from model.fused_loop import fused_loop_supported  # noqa: E402
from model.lm import ReverieLM, bits_per_byte  # noqa: E402
from model.memory import compiled_writes  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kernel_profile.json"
# (rows, bytes per row) the GPU suite times, so a profile without --batch/--seq-len is of the same step
# (session 18 profiled the sleep at the old shared default, 16 x 2048: twice the suite's bytes).
_SUITE = Sizes()
SUITE_SHAPES = {"train": (_SUITE.train_batch, _SUITE.seq_len), "sleep": _SUITE.sleep_bulk, "decode": (16, _SUITE.seq_len)}


def training_step(lm: ReverieLM, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=device.type == "cuda")
    data = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)
    if args.float8:
        use_float8(lm)
    if args.compile_layers:
        lm.compile_layers()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = lm(data[:, :-1])
            loss = bits_per_byte(logits, data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def decode_step(lm: ReverieLM, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """The suite's decode step (`GraphedStep`: sync-free, donated buffers, autocast's matrices held
    in bf16 on a GPU) from a warm state at 2K context, run without its graph."""
    lm.eval()
    cuda = device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        decode = GraphedStep(lm, args.batch, args.learn, device, capture=False, compile=args.compile,
                             matrix_dtype=torch.bfloat16 if cuda else None)
        decode.load(warm_state(lm.config, args.batch, device, seed=args.batch, start=lm.config.max_seq_len))
    byte = torch.randint(0, 256, (args.batch,), device=device)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            decode(byte)
    return step


def sleep_step(lm: ReverieLM, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """One eager step of `model.consolidation.consolidate` (`step_rows`, then `train_on`) as the
    suite's shared bulk run times it: the student reads tonight's and rehearsal rows, the teacher
    (with a user's state) tonight's. (Until session 16 the replay had earlier turns too, which the
    suite's has not: a third more student rows than the step the suite times.)"""
    import random

    from model.consolidation import Replay, SleepConfig, TeacherState, step_rows, train_on
    from model.sleep_graph import on_device

    config = SleepConfig(batch_size=args.batch, seq_len=args.seq_len)
    teacher = ReverieLM(lm.config).to(device).eval().requires_grad_(False)
    if device.type == "cuda":  # as `consolidate` holds it under amp
        teacher.hold_matrices(torch.bfloat16)
    if args.float8:
        for model in (lm, teacher):
            use_float8(model)
    if args.compile_layers:
        for model in (lm, teacher):
            model.compile_layers()
    texts = [f"user: remember that door {i} is blue. assistant: noted, door {i} is blue.".encode() for i in range(512)]
    replay = Replay(texts=texts, state=warm_state(lm.config, 1, device, seed=7, start=4 * lm.config.span))
    rehearsal = torch.randint(32, 127, (200_000,), dtype=torch.uint8)
    anchor = {n: p.detach().clone() for n, p in lm.named_parameters()}
    optimizer = torch.optim.AdamW(lm.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    lm.train()
    state = TeacherState.of(replay, config.batch_size, device)

    def one_step() -> None:
        rows = step_rows(replay, rehearsal, config, rng, generator)
        train_on(lm, teacher, on_device(rows.data, device), rows.streams, state, config, optimizer, anchor)
    return one_step


class WrittenBytes(TorchDispatchMode):
    """Counts the aten ops run inside it, those that write new memory (a kernel each, eagerly on a
    GPU; views write none) and the bytes of their outputs that are new memory."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.writing_ops, self.bytes = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = [t.numel() * t.element_size() for t in tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given]
        self.ops += 1
        self.writing_ops += bool(new)
        self.bytes += sum(new)
        return out


def op_table(prof: profile) -> list[dict]:
    """Device time by the operator that launched it (aten ops, compiled graphs), self time only."""
    rows = [{"op": e.key[:90], "count": e.count, "ms": round(e.self_device_time_total / 1000.0, 3)}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda row: -row["ms"])


def stack_table(prof: profile, frames: int, cuda: bool) -> list[dict]:
    """Device time (CPU time without a GPU) of each aten op by the model's Python functions that
    called it, innermost first, or by the autograd node that ran it in the backward: which part of
    the model launched the kernels an op table only names. Self time only."""
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        callers, parent = [], event.cpu_parent
        while parent is not None and len(callers) < frames:
            if "model/" in parent.name and ".py(" in parent.name:
                callers.append(parent.name.split("model/")[-1])
            elif parent.name.startswith("autograd::engine::evaluate_function: "):
                callers.append(parent.name.split(": ", 1)[1])
            parent = parent.cpu_parent
        entry = totals[(event.name, tuple(callers))]
        entry[0] += 1
        entry[1] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000.0
    rows = [{"op": op, "stack": list(callers), "count": count, "ms": round(ms, 3)}
            for (op, callers), (count, ms) in totals.items() if ms > 0]
    return sorted(rows, key=lambda row: -row["ms"])


def kernel_table(prof: profile, cuda: bool) -> dict[str, list[float]]:
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        # On the GPU a record_function range (the optimizer's "Optimizer.step#AdamW.step") is also an
        # event, spanning kernels counted on their own: until session 18 the totals counted it again.
        on_device = (event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
                     if cuda else event.cpu_parent is None)
        if on_device:
            entry = kernels[event.name[:90]]
            entry[0] += 1
            entry[1] += (event.device_time if cuda else event.cpu_time_total) / 1000.0
    return kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("train", "decode", "sleep"))
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows (default: the GPU suite's: train 16, sleep 64; decode 16)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="train, sleep: bytes per row (default: the GPU suite's: train 2048, sleep 256)")
    parser.add_argument("--eager-writes", action="store_true", help="train: the eager memory write, not the compiled one")
    parser.add_argument("--compile-layers", action="store_true", help="train, sleep: ReverieLM.compile_layers() first")
    parser.add_argument("--float8", action="store_true",
                        help="train, sleep: the mixers', feed-forwards' and working memory's GEMMs in float8 first")
    parser.add_argument("--compile-loops", action="store_true",
                        help="train: each memory's span loop as one compiled function (compiled_writes(loops=True))")
    parser.add_argument("--learn", action="store_true", help="decode: write fast memory")
    parser.add_argument("--compile", action="store_true", help="decode: torch.compile the step")
    parser.add_argument("--ops", action="store_true", help="also the device time by the operator that launched it")
    parser.add_argument("--bytes", action="store_true",
                        help="count the step's aten ops and the bytes they write (views excluded), then stop")
    parser.add_argument("--stacks", type=int, default=0, metavar="FRAMES",
                        help="also the device time by the Python lines (FRAMES deep) that launched it")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    suite_batch, suite_seq_len = SUITE_SHAPES[args.what]
    args.batch = args.batch or suite_batch
    args.seq_len = args.seq_len or suite_seq_len
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # as bench/gpu_suite.py: the fp32 memory math on tensor cores
    torch.manual_seed(0)
    lm = ReverieLM(preset(args.preset)).to(device)
    if args.what == "train":
        step = training_step(lm, args, device)
        name = (f"train, writes {'eager' if args.eager_writes else 'compiled'}" + (", loops compiled" if args.compile_loops else "")
                + (", layers compiled" if args.compile_layers else "") + (", float8" if args.float8 else ""))
        fused = fused_loop_supported(torch.empty(0, device=device)) and not args.compile_loops
        name += ", loops fused" if fused else ""
        settings = {"seq_len": args.seq_len, "compile_layers": args.compile_layers, "compile_loops": args.compile_loops,
                    "float8": args.float8,
                    "write_loops": "fused kernels (model/fused_loop.py)" if fused else "torch"}
    elif args.what == "sleep":
        step = sleep_step(lm, args, device)
        name = (f"sleep b={args.batch}x{args.seq_len}" + (", layers compiled" if args.compile_layers else "")
                + (", float8" if args.float8 else ""))
        settings = {"seq_len": args.seq_len, "compile_layers": args.compile_layers, "float8": args.float8}
    else:
        step = decode_step(lm, args, device)
        name = f"decode b={args.batch}, learn {'on' if args.learn else 'off'}" + (", compiled" if args.compile else "")
        settings = {"learn": args.learn, "compile": args.compile}
    if args.bytes:
        step()  # warm up: lazily built state, optimizer buffers
        with WrittenBytes() as counted:
            step()
        print(f"{args.what} ({args.preset}, b={args.batch}, seq {args.seq_len}): {counted.ops:,} aten ops, "
              f"{counted.writing_ops:,} of them writing {counted.bytes / 1e9:.2f} GB")
        return
    with compiled_writes(args.what == "train" and not args.eager_writes, loops=args.compile_loops):
        for _ in range(3):  # compile and warm up
            step()
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                     with_stack=args.stacks > 0) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    kernels = kernel_table(prof, cuda)
    total_ms = sum(ms for _, ms in kernels.values())
    launches = sum(count for count, _ in kernels.values())
    rows = sorted(({"name": k, "count": count, "ms": round(ms, 3)} for k, (count, ms) in kernels.items()),
                  key=lambda row: -row["ms"])
    result = {"what": args.what, "preset": args.preset, "batch": args.batch, **settings,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
              "kernel_ms_total": round(total_ms, 3), "kernels": launches, "top": rows[:args.top]}
    if args.ops:
        result["top_ops"] = op_table(prof)[:args.top]
    if args.stacks:
        result["top_stacks"] = stack_table(prof, args.stacks, cuda)[:args.top]
    save_section(RESULTS, name, result)
    print(f"{name} ({args.preset}, b={args.batch}): {launches} kernels, {total_ms:.2f} ms of kernel time")
    print(f"{'ms':>9} {'share':>6} {'count':>7}  kernel")
    for row in rows[:args.top]:
        print(f"{row['ms']:9.3f} {row['ms'] / total_ms:6.1%} {row['count']:7d}  {row['name']}")
    for row in result.get("top_ops", []):
        print(f"{row['ms']:9.3f} {row['ms'] / total_ms:6.1%} {row['count']:7d}  op {row['op']}")
    for row in result.get("top_stacks", []):
        print(f"{row['ms']:9.3f} {row['ms'] / total_ms:6.1%} {row['count']:7d}  {row['op']} at {' < '.join(row['stack'])}")


if __name__ == "__main__":
    main()
