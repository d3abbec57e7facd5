"""Peak memory of one training step with the fused head + loss (model/head_loss.py) vs the plain head.

The plain head keeps the [tokens, vocab] logits and log-probabilities for the backward; the fused one keeps
one slice. Each variant runs in its own process (peak RSS is per process), alternating, on the CPU:
a 1-layer 256-wide RWKV-7 with a 50304 vocabulary, 2 x 2048 tokens, float32, L2Wrap on.

    python benchmarks/bench_head_memory.py [--repeats 2] [--json out.json]
    python benchmarks/bench_head_memory.py --eval [--repeats 3]   # one evaluation forward (torch.no_grad)

--eval: a 2 x 256 RWKV-7, vocab 65536, 8 x 512 tokens, float32, under torch.no_grad: "plain" keeps the
logits (what evaluation did before session 13), "fused" is what `Trainer.evaluate` runs now.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEP = r"""
import json, resource, sys, time, torch
from kaggletrain import ModelConfig, RWKVModel
torch.manual_seed(0)
m = RWKVModel(ModelConfig(hidden_size=256, num_layers=1, vocab_size=50304, head_size=64))
x = torch.randint(0, 50304, (2, 2049))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
out = m(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=sys.argv[1] == "plain", l2wrap=True)
out.loss.backward()
print(json.dumps({"variant": sys.argv[1], "peak_growth_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      - base) / 2**20, "seconds": time.perf_counter() - t, "loss": out.loss.item()}))
"""

EVAL = r"""
import json, resource, sys, time, torch
from kaggletrain import ModelConfig, RWKVModel
torch.manual_seed(0)
m = RWKVModel(ModelConfig(hidden_size=256, num_layers=2, vocab_size=65536, head_size=64, wkv_impl="chunked")).eval()
x = torch.randint(0, 65536, (8, 512))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
with torch.no_grad():
    out = m(x, labels=x, return_logits=sys.argv[1] == "plain")
print(json.dumps({"variant": sys.argv[1] + " eval", "peak_growth_gib": (resource.getrusage(resource.RUSAGE_SELF)
      .ru_maxrss - base) / 2**20, "seconds": time.perf_counter() - t, "loss": out.loss.item()}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--eval", action="store_true", help="an evaluation forward instead of a training step")
    args = ap.parse_args(argv)
    script = EVAL if args.eval else STEP
    rows = []
    for _ in range(args.repeats):
        for variant in ("plain", "fused"):
            p = subprocess.run([sys.executable, "-c", script, variant], capture_output=True, text=True, check=True)
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
