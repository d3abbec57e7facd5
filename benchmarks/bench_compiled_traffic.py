"""Memory traffic of RWKV-7 blocks, eager against per-block torch.compile, counted on the CPU: a proxy for what
compiling buys on a GPU.

bench_eager_traffic.py counts the bytes every eager ATen call reads and writes; this script runs the same
blocks (ln1 -> time-mix -> ln2 -> channel-mix, forward + backward, bf16 autocast, float32 weights) both ways:
- eager: every non-matmul ATen call's inputs + outputs, as bench_eager_traffic.py counts them;
- compiled (`blk.compile()`, as `train.compile: true` does): inductor's own count for each kernel it
  generates, the bytes of the buffers the kernel reads and writes (what stays in registers inside a fused
  kernel is not counted), forward and backward graphs.
Matrix products and the WKV recurrence are left out of both (their GPU cost is compute or the CUDA kernel's).
The WKV runs as the CUDA path's custom operators, through the CPU emulator (KAGGLETRAIN_WKV_EMULATE), so the
compiled graph holds the kernel as one opaque call, as on a GPU. Inductor's CPU backend fuses as its Triton
backend does in the main (pointwise and reductions into one loop nest), so the ratio is the quantity to read.

    python benchmarks/bench_compiled_traffic.py [--width 768 --layers 2] [--json out.json]
    python benchmarks/bench_compiled_traffic.py --head [--width 768 --vocab 50304]   # the training head + loss

Prints bytes per token per layer (the slope between two sequence lengths), both ways, and the compiled
kernels with the most traffic.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager_traffic import MATMUL, TrafficCounter  # noqa: E402

# Inductor extern kernels that are matrix products or the WKV kernel (not counted, as in eager mode).
EXTERN_SKIP = ("mm", "addmm", "bmm", "wkv7", "kaggletrain", "embedding")


def _blocks(width: int, layers: int):
    from kaggletrain import ModelConfig, RWKVModel

    torch.manual_seed(0)
    model = RWKVModel(ModelConfig(hidden_size=width, num_layers=layers, vocab_size=256))
    model.enable_mixed_precision(torch.bfloat16)
    return model


def _step(model, seq: int) -> None:
    """Forward + backward through the blocks alone (no embedding or head), one sequence of `seq` tokens."""
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(1, seq, model.config.hidden_size, generator=g).requires_grad_()
    up = torch.randn(1, seq, model.config.hidden_size, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, v_first = x, None
        for blk in model.blocks:
            h, v_first, _, _ = blk(h, v_first, None)
    (h.float() * up).sum().backward()


def eager_bytes(width: int, layers: int, seq: int) -> collections.Counter:
    model = _blocks(width, layers)
    counter = TrafficCounter()
    with counter:
        _step(model, seq)
    return collections.Counter({op: b for op, b in counter.by_op.items() if op not in MATMUL})


def _inductor_bytes(run) -> collections.Counter:
    """Bytes per inductor kernel (keyed by the ops it fuses), over every graph compiled while `run()` runs."""
    import torch._inductor.config as ind_config
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    torch._dynamo.reset()
    ind_config.fx_graph_cache = False  # every graph is lowered here, so every kernel is counted
    ind_config.autotune_local_cache = False
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = False
    found = collections.Counter()
    real = GraphLowering.compile_to_module

    def counting(self):
        mod = real(self)
        for node in self.scheduler.nodes:
            if isinstance(node, ExternKernelSchedulerNode):
                name = str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)
                if any(s in name for s in EXTERN_SKIP):
                    continue
                key = f"extern {name}"
            else:
                origins = sorted({o.target.__name__ if hasattr(o.target, "__name__") else str(o.target)
                                  for n in node.get_nodes() for o in getattr(n.node, "origins", ())
                                  if o.op == "call_function"})
                key = "+".join(origins[:6]) + ("+..." if len(origins) > 6 else "")
            found[key] += node.get_read_write_buffers_sizes()
        return mod

    GraphLowering.compile_to_module = counting
    try:
        run()
    finally:
        GraphLowering.compile_to_module = real
    return found


def compiled_bytes(width: int, layers: int, seq: int) -> collections.Counter:
    def run():
        model = _blocks(width, layers)
        for blk in model.blocks:
            blk.compile()
        _step(model, seq)

    return _inductor_bytes(run)


def _head_step(width: int, vocab: int, n: int, compiled: bool) -> None:
    """The training head (model/head_loss.py) on `n` tokens: bf16 products, L2Wrap, forward + backward."""
    import kaggletrain.model.head_loss as hl

    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, width, generator=g).requires_grad_()
    w = (torch.randn(vocab, width, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    hl._COMPILED.clear()  # compiled afresh for this n (counted below)
    loss, _ = hl.head_loss(h, w, t, torch.bfloat16, 1e-4 / n, compile_backend="inductor" if compiled else None)
    loss.backward()


def head_bytes(width: int, vocab: int, seq: int, compiled: bool) -> collections.Counter:
    if compiled:
        return _inductor_bytes(lambda: _head_step(width, vocab, seq, True))
    counter = TrafficCounter()
    with counter:
        _head_step(width, vocab, seq, False)
    return collections.Counter({op: b for op, b in counter.by_op.items() if op not in MATMUL})


def per_token(width: int, layers: int, seqs=(64, 192)) -> dict:
    from rwkv_cuda.emulated import ENV, load_emulated

    os.environ[ENV] = "1"
    load_emulated()
    n, L = seqs[1] - seqs[0], layers
    out = {"shape": {"width": width, "layers": layers, "seqs": list(seqs)}, "torch": torch.__version__}
    for mode, fn in (("eager", eager_bytes), ("compiled", compiled_bytes)):
        a, b = (fn(width, layers, s) for s in seqs)
        growth = {k: (b[k] - a[k]) / n / L for k in set(a) | set(b)}
        out[mode] = {
            "bytes_per_token_per_layer": sum(growth.values()),
            "top": [{"what": k, "bytes_per_token_per_layer": v}
                    for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:12]],
        }
    out["ratio"] = out["eager"]["bytes_per_token_per_layer"] / out["compiled"]["bytes_per_token_per_layer"]
    return out


def head_per_token(width: int, vocab: int, seqs=(64, 192)) -> dict:
    """The training head's non-matmul bytes per token, eager and compiled (train.compile)."""
    out = {"shape": {"width": width, "vocab": vocab, "seqs": list(seqs)}, "torch": torch.__version__}
    for mode in ("eager", "compiled"):
        a, b = (head_bytes(width, vocab, s, mode == "compiled") for s in seqs)
        growth = {k: (b[k] - a[k]) / (seqs[1] - seqs[0]) for k in set(a) | set(b)}
        out[mode] = {"bytes_per_token": sum(growth.values()),
                     "top": [{"what": k, "bytes_per_token": v}
                             for k, v in sorted(growth.items(), key=lambda kv: -kv[1])[:8]]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50304, help="the head's vocabulary (--head)")
    p.add_argument("--head", action="store_true", help="the training head + loss instead of the blocks")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.head:
        res, key, unit, per = head_per_token(args.width, args.vocab), "bytes_per_token", "V", args.vocab
    else:
        res, key, unit, per = per_token(args.width, args.layers), "bytes_per_token_per_layer", "C", args.width
    for mode in ("eager", "compiled"):
        r = res[mode]
        print(f"{'head ' if args.head else ''}{mode:9s} non-matmul traffic: {r[key] / 1e3:8.1f} kB per token"
              f"{'' if args.head else ' per layer'} (= {r[key] / per:.1f} bytes x {unit})")
        for t in r["top"][:8]:
            print(f"    {t[key] / 1e3:8.1f} kB  {t['what']}")
    if "ratio" in res:
        print(f"eager / compiled: {res['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
