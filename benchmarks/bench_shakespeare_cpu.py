"""Issue 3's quality-and-speed check: character-level tinyshakespeare on this CPU.

Runs the whole `kaggletrain train configs/shakespeare_char.yaml` command as a subprocess (startup,
tokenisation, training, the final validation and checkpoint all inside the timed wall clock), then
evaluates the saved checkpoint on the WHOLE validation split (the last 10% of the file; not timed).
Target: validation loss <= 1.80 within 100 s of wall time.

    python benchmarks/bench_shakespeare_cpu.py [--data PATH] [--json OUT] [override ...]

The corpus defaults to ../shared/data/tinyshakespeare.txt next to the repository (the development
machines' copy); pass --data for yours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_LOSS, TARGET_S = 1.80, 100.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared/data/tinyshakespeare.txt"))
    ap.add_argument("--config", default=str(REPO / "configs/shakespeare_char.yaml"))
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("overrides", nargs="*", help="extra dotted overrides for the train command")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"error: {args.data}: no such file (pass --data PATH to tinyshakespeare.txt)", file=sys.stderr)
        return 2

    sys.path.insert(0, str(REPO))
    from kaggletrain.bench.machine import cpu_name

    with tempfile.TemporaryDirectory(prefix="kt-shakespeare-") as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "kaggletrain", "train", args.config, f"data.source={args.data}",
               f"out_dir={run}", f"data.cache_dir={Path(tmp) / 'cache'}", "--no-progress", *args.overrides]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
            return proc.returncode
        summary = json.loads((run / "summary.json").read_text())
        ev = subprocess.run([sys.executable, "-m", "kaggletrain", "eval", str(run), "--batches", "100000", "--json"],
                            capture_output=True, text=True, check=True)
        full = json.loads(ev.stdout)

    import torch

    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        "torch": torch.__version__, "command": " ".join(["kaggletrain"] + cmd[3:]),
        "load_average_before": load_before, "load_average_after": load_after,
        "wall_s": wall, "steps": summary["steps"], "train_tokens_per_s": summary["tokens_per_s"],
        "val_loss_in_run": summary["val_loss"], "val_loss_full_split": full["val_loss"],
        "val_tokens_full_split": full["tokens"],
        "meets_target": bool(full["val_loss"] <= TARGET_LOSS and summary["val_loss"] <= TARGET_LOSS
                             and wall <= TARGET_S),
    }
    print(f"tinyshakespeare char: wall {wall:.1f} s (target <= {TARGET_S:.0f}), val loss {summary['val_loss']:.4f} "
          f"in the run, {full['val_loss']:.4f} on the whole validation split ({full['tokens']:,} tokens; "
          f"target <= {TARGET_LOSS}); {summary['steps']} steps at {summary['tokens_per_s']:,.0f} tok/s; "
          f"load {load_before:.1f} -> {load_after:.1f}: {'MEETS' if res['meets_target'] else 'MISSES'} the target")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
