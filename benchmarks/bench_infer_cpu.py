"""CPU inference speed, kaggletrain vs the official `rwkv` package (0.8.32), side by side in one run.

Model: random weights in the RWKV-7 World 0.1B shape (12 layers, C=768, vocab 65536), float32.
  prefill: tokens/s for one prompt of --prefill-len tokens, from a zero state, last-token logits
  decode:  tokens/s for one-token steps carrying the state (batch 1 for both; batch --batch for ours)
  generate: end-to-end `generate()` (greedy sampling included), batch 1 and --batch, for reference
  --fallback adds decode b1/b{batch} on the fallback path (F.linear and PyTorch WKV ops: what a torch
  without oneDNN on a machine without a C++ compiler gets) to show what the oneDNN products and the CPU
  WKV step kernel (kaggletrain/infer/cpu_linear.py, cpu_kernel.py) are worth, in the same run.
Measurements alternate between the two implementations inside each repeat, so CPU load from other
processes hits both alike; compare the ratios. Reported three ways: median wall time (the headline),
fastest repeat, and median process CPU time (what a shared CPU disturbs least; with several threads it
also counts their spin-waits). Writes JSON (default benchmarks/results/infer_cpu.json).

    python benchmarks/bench_infer_cpu.py [--prefill-len 256] [--decode-steps 16] [--repeats 5] [--threads N]
                                         [--fallback]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # must precede `import rwkv` (spec section 5)

import torch  # noqa: E402

from kaggletrain.bench.machine import cpu_name  # noqa: E402
from kaggletrain.infer import cpu_kernel, cpu_linear, generate, run_last  # noqa: E402
from kaggletrain.infer.fast import DecodeStep  # noqa: E402
from kaggletrain.model import ModelConfig, RWKVModel  # noqa: E402


def random_model(seed: int) -> RWKVModel:
    """Official init, then noise on every tensor the init leaves at zero (output/value projections,
    LoRA down-projections), so every matrix does real work and the logits are not degenerate."""
    torch.manual_seed(seed)
    model = RWKVModel(ModelConfig(vocab_size=65536, hidden_size=768, num_layers=12))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    return model


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    ap.add_argument("--weights", type=Path, default=None,
                    help="Use this checkpoint instead of a fresh random model (saves the init time).")
    ap.add_argument("--fallback", action="store_true", help="Also time decoding on the fallback path.")
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "infer_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.weights is not None:
        from kaggletrain.interop import load_checkpoint

        model = load_checkpoint(args.weights)[0]
    else:
        model = random_model(args.seed)
    init_s = time.perf_counter() - t0
    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    base = os.path.join(tmp, "model")
    torch.save(model.state_dict(), base + ".pth")
    model.optimize_for_inference()

    import rwkv
    from rwkv.model import RWKV

    pkg = RWKV(model=base, strategy="cpu fp32")
    os.remove(base + ".pth")

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 65536, (1, args.prefill_len), generator=g)
    prompt_list = prompt[0].tolist()
    B, S = args.batch, args.decode_steps

    # Both sides start decoding from the state after the same short prompt.
    with torch.no_grad():
        _, st1 = run_last(model, prompt[:, :16])
        _, stB = run_last(model, prompt[:, :16].expand(B, 16))
    _, pst = pkg.forward(prompt_list[:16], None)

    def ours_prefill():
        run_last(model, prompt)

    def pkg_prefill():
        pkg.forward(prompt_list, None)

    step = DecodeStep(model)  # what generate() uses for one-token steps

    def ours_decode(state, batch):
        tok = torch.full((batch,), 11, dtype=torch.long)
        for _ in range(S):
            logits, state = step(tok, state)
            tok = logits.argmax(-1)

    def pkg_decode():
        state = [t.clone() for t in pst]
        tok = 11
        for _ in range(S):
            out, state = pkg.forward([tok], state)
            tok = int(out.argmax())

    def fallback(fn):
        """fn() on the fallback path: no oneDNN products, no compiled WKV step."""
        def run():
            saved = cpu_linear._ONEDNN
            cpu_linear._ONEDNN = False
            os.environ["KAGGLETRAIN_DISABLE_CPU_KERNEL"] = "1"
            try:
                fn()
            finally:
                cpu_linear._ONEDNN = saved
                del os.environ["KAGGLETRAIN_DISABLE_CPU_KERNEL"]
        return run

    def ours_generate(batch):
        generate(model, [prompt_list[:16]] * batch, max_new_tokens=S, temperature=0)

    cases = {
        "prefill_ours": (ours_prefill, args.prefill_len),
        "prefill_rwkv": (pkg_prefill, args.prefill_len),
        "decode_b1_ours": (lambda: ours_decode(st1, 1), S),
        "decode_b1_rwkv": (pkg_decode, S),
        f"decode_b{B}_ours": (lambda: ours_decode(stB, B), S * B),
        "generate_b1_ours": (lambda: ours_generate(1), S),
        f"generate_b{B}_ours": (lambda: ours_generate(B), S * B),
    }
    if args.fallback:
        cases["decode_b1_fallback"] = (fallback(lambda: ours_decode(st1, 1)), S)
        cases[f"decode_b{B}_fallback"] = (fallback(lambda: ours_decode(stB, B)), S * B)
    for name, (fn, _) in cases.items():  # warm-up: TorchScript profiling runs, allocator, caches
        for _ in range(2 if name.startswith("prefill") else 1):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(args.repeats):
        for name, (fn, n) in cases.items():
            wall, used = timed(fn)
            times[name].append(wall)
            cpu[name].append(used)
            print(f"[{rep + 1}/{args.repeats}] {name}: {n / wall:.2f} tokens/s", file=sys.stderr)
    tps = {k: cases[k][1] / statistics.median(v) for k, v in times.items()}
    # On a shared machine the fastest repeat is the least disturbed one; CPU time ignores waiting for a core.
    best = {k: cases[k][1] / min(v) for k, v in times.items()}
    per_cpu_s = {k: cases[k][1] / statistics.median(v) for k, v in cpu.items()}

    def ratios(t):
        out = {"prefill_ours_vs_rwkv": round(t["prefill_ours"] / t["prefill_rwkv"], 3),
               "decode_b1_ours_vs_rwkv": round(t["decode_b1_ours"] / t["decode_b1_rwkv"], 3),
               f"decode_b{B}_vs_b1_ours": round(t[f"decode_b{B}_ours"] / t["decode_b1_ours"], 3)}
        if args.fallback:
            out["decode_b1_ours_vs_fallback"] = round(t["decode_b1_ours"] / t["decode_b1_fallback"], 3)
            out[f"decode_b{B}_ours_vs_fallback"] = round(t[f"decode_b{B}_ours"] / t[f"decode_b{B}_fallback"], 3)
            out[f"decode_b{B}_vs_b1_fallback"] = round(t[f"decode_b{B}_fallback"] / t["decode_b1_fallback"], 3)
        return out

    result = {
        "benchmark": "bench_infer_cpu",
        "model": "RWKV-7 World 0.1B shape, random weights: L=12, C=768, V=65536, float32",
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "os_cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__, "rwkv": getattr(rwkv, "__version__", "0.8.32"),
                    "onednn_products": cpu_linear.onednn_ok(), "cpu_wkv_step_kernel": cpu_kernel.build_info()["loaded"]},
        "settings": {"prefill_len": args.prefill_len, "decode_steps": S, "batch": B, "repeats": args.repeats,
                     "weights": str(args.weights) if args.weights else f"random_model(seed={args.seed})",
                     "model_init_s": round(init_s, 1)},
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "ratios": ratios(tps),
        "tokens_per_s_best": {k: round(v, 2) for k, v in best.items()},
        "ratios_best": ratios(best),
        "tokens_per_cpu_s": {k: round(v, 2) for k, v in per_cpu_s.items()},
        "ratios_cpu": ratios(per_cpu_s),
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "cpu_s": {k: [round(t, 4) for t in v] for k, v in cpu.items()},
        "targets": {"prefill_ours_vs_rwkv": 1.5, "decode_b1_ours_vs_rwkv": 1.0, f"decode_b{B}_vs_b1_ours": 5.0},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("machine", "tokens_per_s", "ratios", "ratios_best", "ratios_cpu")},
                     indent=2))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
