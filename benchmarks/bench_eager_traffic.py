"""Memory traffic of one eager training step, counted op by op on the CPU: a proxy for eager-mode GPU time.

On a GPU the elementwise kernels, casts and reductions of an eager step are bound by memory bandwidth
(the H200 profile of the 0.1B model at B=8, T=4096: 250 of 296 ms per step in such kernels). Their time
follows the bytes they read and write, which do not depend on the device. This script runs one forward +
backward of an RWKV-7 under bf16 autocast on the CPU, records every ATen call below autograd with a
TorchDispatchMode, and sums the bytes each one reads and writes (inputs + outputs, at their dtypes).
Matrix products and the WKV recurrence are counted apart (their GPU cost is compute or the CUDA kernel's).

    python benchmarks/bench_eager_traffic.py [--width 768 --layers 2 --vocab 50304] [--json out.json]

Prints the non-matmul bytes per token (the slope between two sequence lengths: what grows with B x T), the
number of non-matmul calls per step, and the top ops by bytes.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_dot_product_flash_attention",
          "embedding", "embedding_dense_backward"}
FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "squeeze", "unsqueeze",
        "slice", "select", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "empty",
        "empty_like", "new_empty", "empty_strided", "new_empty_strided", "lift_fresh", "_to_copy_noop", "chunk",
        "is_same_size", "_reshape_alias", "unfold", "diagonal", "view_as"}


def _bytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class TrafficCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.paused = False
        self.by_op = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            if name not in FREE:
                ins, _ = tree_flatten((args, kwargs))
                outs, _ = tree_flatten(out)
                self.by_op[name] += sum(map(_bytes, ins)) + sum(map(_bytes, outs))
                self.calls[name] += 1
        return out


def measure(width: int, layers: int, seq: int, vocab: int) -> tuple[collections.Counter, collections.Counter]:
    """Bytes and calls per ATen op for one bf16-autocast training step of one sequence of `seq` tokens."""
    from kaggletrain import ModelConfig, RWKVModel

    wkv_module = sys.modules["kaggletrain.ops.wkv"]
    counter = TrafficCounter()
    real_dispatch = wkv_module._dispatch

    class Opaque(torch.autograd.Function):
        """The recurrence is the CUDA kernel's job on a GPU: neither its forward nor its backward is counted
        (the outputs come from the real recurrence, the gradients it returns are uncounted zeros)."""

        @staticmethod
        def forward(ctx, r, w, k, v, a, b, s0):
            counter.paused = True
            try:
                ctx.shapes = [(t.shape, t.dtype) if t is not None else None for t in (r, w, k, v, a, b, s0)]
                return real_dispatch(r, w, k, v, a, b, s0, "chunked")
            finally:
                counter.paused = False

        @staticmethod
        def backward(ctx, dy, ds):
            counter.paused = True
            try:
                return tuple(None if s is None else torch.zeros(s[0], dtype=s[1]) for s in ctx.shapes)
            finally:
                counter.paused = False

    def wkv_uncounted(r, w, k, v, a, b, state, impl):
        return Opaque.apply(r, w, k, v, a, b, state)

    wkv_module._dispatch = wkv_uncounted
    try:
        torch.manual_seed(0)
        model = RWKVModel(ModelConfig(hidden_size=width, num_layers=layers, vocab_size=vocab))
        model.enable_mixed_precision(torch.bfloat16)
        x = torch.randint(0, vocab, (1, seq + 1))
        with counter:
            loss = model(x[:, :-1], labels=x[:, 1:], shift_labels=False, return_logits=False).loss
            loss.backward()
    finally:
        wkv_module._dispatch = real_dispatch
    return counter.by_op, counter.calls


def per_token(width: int, layers: int, vocab: int, seqs=(64, 192)) -> dict:
    """Traffic that grows with the tokens of a step (the slope between two sequence lengths), without the
    per-step part (weights cast to bf16, parameter gradients), which a 32k-token step makes negligible."""
    (bytes_a, _), (bytes_b, calls) = (measure(width, layers, s, vocab) for s in seqs)
    n = seqs[1] - seqs[0]
    growth = {op: (bytes_b[op] - bytes_a[op]) / n for op in set(bytes_a) | set(bytes_b) if op not in MATMUL}
    rows = sorted(growth.items(), key=lambda kv: -kv[1])
    return {
        "shape": {"width": width, "layers": layers, "vocab": vocab, "seqs": list(seqs)},
        "torch": torch.__version__,
        "non_matmul_bytes_per_token": sum(growth.values()),
        "non_matmul_calls_per_step": sum(c for op, c in calls.items() if op not in MATMUL),
        "top_ops": [{"op": op, "bytes_per_token": v, "calls": calls[op]} for op, v in rows[:15]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = per_token(args.width, args.layers, args.vocab)
    C, L = args.width, args.layers
    print(f"non-matmul traffic per token: {res['non_matmul_bytes_per_token'] / 1e3:.1f} kB "
          f"(= {res['non_matmul_bytes_per_token'] / L / C:.0f} bytes x C per layer incl. the head's share, C={C}, "
          f"L={L}); {res['non_matmul_calls_per_step']} non-matmul calls per step")
    for r in res["top_ops"]:
        print(f"  {r['op']:28s} {r['bytes_per_token'] / 1e3:9.1f} kB/token  x{r['calls']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
