"""One device's results file from several calls of `bench/gpu_suite.py`.

Every section of the suite takes more than one 10-minute device call (its --help gives the two
calls), and each call writes its own JSON. This joins them into one file, a later call's section
over an earlier one's, and recomputes the summary from the joined sections, so that the training
ratio, the MFU of the measured matmul rate and BitDelta's fraction of the copy bandwidth are all
taken from runs on the one device:

    python bench/gpu_merge.py call1.json call2.json --out bench/results/gpu.json

Calls from different devices, or the CPU smoke run, are refused: gpu.json holds the H100's
figures, gpu_h200.json the H200's. What the file held before stays in git's history.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_suite import SECTIONS, summarize, table  # noqa: E402


class MergeError(ValueError):
    """A call's file that can't go into one device's results; the message says which and why."""


def load_call(path: Path) -> dict:
    """A call's JSON as `gpu_suite.py` wrote it (`--out`, or `$OUT/gpu.json` on the device)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: can't be read as JSON ({error}); give the file a device call of "
                         f"bench/gpu_suite.py wrote") from error
    meta = results.get("meta") if isinstance(results, dict) else None
    if not isinstance(meta, dict) or "device" not in meta:
        raise MergeError(f"{path}: has no meta.device, so it is not bench/gpu_suite.py's output")
    if meta.get("smoke") or meta["device"] == "cpu":
        raise MergeError(f"{path}: is a run on the CPU (--smoke or no CUDA): its sizes are no device's "
                         f"figures; merge only device calls")
    return results


def merge_calls(calls: list[tuple[str, dict]]) -> tuple[dict, list[str]]:
    """(name, results) of each call, oldest first -> the joined results and a line for each section
    saying which call it came from. A later call's section replaces an earlier one's, unless it
    finished no item (a section skipped when its call's time ran out keeps the earlier figures)."""
    devices = {results["meta"]["device"] for _, results in calls}
    if len(devices) > 1:
        raise MergeError(f"the calls ran on {sorted(devices)}: one results file holds one device's "
                         f"figures (gpu.json the H100's, gpu_h200.json the H200's); merge each device's calls apart")
    sections: dict = {}  # in the suite's order
    origin: dict[str, str] = {}
    for section in SECTIONS:
        for name, results in calls:
            new = results.get(section)
            if new is None or (section in sections and not new.get("items")):
                continue
            sections[section], origin[section] = new, name
    if not sections:
        raise MergeError(f"none of the calls holds a section of the suite ({', '.join(SECTIONS)}): nothing to merge")
    runs = [{"file": name, "sections": [s for s in SECTIONS if s in results], "device": results["meta"]["device"],
             "torch": results["meta"].get("torch"), "started": results["meta"].get("started"),
             "total_s": results["meta"].get("total_s"), "sizes": results["meta"].get("sizes")}
            for name, results in calls]
    torch_versions = sorted({run["torch"] for run in runs if run["torch"]})
    merged = {"meta": {"device": devices.pop(), "torch": ", ".join(torch_versions), "smoke": False,
                       "started": min((run["started"] for run in runs if run["started"]), default=None),
                       "total_s": sum(run["total_s"] or 0.0 for run in runs), "runs": runs}, **sections}
    merged["summary"] = summarize(merged)
    return merged, [f"{section:<11} from {name}" for section, name in origin.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("calls", nargs="+", type=Path, help="the calls' JSON files, oldest first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json",
                        help="the results file to write (default bench/results/gpu.json, the H100's)")
    args = parser.parse_args()
    try:
        merged, origins = merge_calls([(str(path), load_call(path)) for path in args.calls])
    except MergeError as error:
        parser.exit(2, f"gpu_merge.py: error: {error}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    print("\n".join(origins))
    print(f"wrote {args.out}\n\n{table(merged)}")


if __name__ == "__main__":
    main()
