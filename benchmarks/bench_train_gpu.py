"""End-to-end training throughput of a 0.1B RWKV-7 on one GPU (issue 4's end-to-end target).

12 layers x 768, vocab 50304, B=8, T=4096, bf16 autocast (fp16 + GradScaler where bf16 is not native),
fused AdamW with the official parameter groups; forward + backward + optimizer step, median of the
timed steps after warm-up, CUDA-synchronised. Prints a line and writes JSON (--json PATH).

    python benchmarks/bench_train_gpu.py --json out.json [--batch 8 --seq 4096 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each block and the head's slices (as train.compile does)")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="after timing, profile one step and print the K most expensive CUDA kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from kaggletrain import ModelConfig, RWKVModel
    from kaggletrain.ops.wkv import resolve_impl
    from kaggletrain.train.optim import build_optimizer
    from kaggletrain.train.precision import resolve_precision

    dev = torch.device("cuda")
    prec = resolve_precision("auto", dev)
    torch.manual_seed(0)
    model = RWKVModel(ModelConfig(hidden_size=args.width, num_layers=args.layers, vocab_size=args.vocab)).to(dev)
    model.enable_mixed_precision(prec.amp_dtype)
    if args.grad_ckpt:
        model.enable_gradient_checkpointing()
    if args.compile:
        model.compile_for_training()  # as train.compile does: each block and the head's slices
    opt = build_optimizer(model, 6e-4, 0.1, (0.9, 0.99), 1e-8, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=prec.use_scaler)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev)
    inp, tgt = x[:, :-1], x[:, 1:]
    impl = resolve_impl("auto", torch.empty(1, 2, 1, 64, device=dev, dtype=prec.amp_dtype))
    def train_step():
        loss = model(inp, labels=tgt, shift_labels=False, return_logits=False).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    torch.cuda.reset_peak_memory_stats()
    t_first = time.perf_counter()
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = train_step()
        torch.cuda.synchronize()
        if i == 0:
            first_step_s = time.perf_counter() - t_first  # includes compilation when --compile
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    peak_all = torch.cuda.max_memory_allocated()
    # Activation memory of one step: its peak minus what is allocated before it (weights, gradients
    # set to None, optimizer state) -- the quantity gradient checkpointing reduces (issue 5).
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step()
    torch.cuda.synchronize()
    activation_peak = torch.cuda.max_memory_allocated() - before
    tokens = args.batch * args.seq
    n_params = model.num_parameters()
    # The dry run's memory rehearsal of this very step (fake tensors on the CPU; eager even with --compile):
    # how close the T4 projection's method is to the allocator, at this scale.
    from kaggletrain.train.memory_rehearsal import rehearse_step

    t0 = time.perf_counter()
    try:
        rehearsed = rehearse_step(model, micro_batch=args.batch, seq_len=args.seq, amp_dtype=prec.amp_dtype,
                                  kernel=impl == "cuda", l2wrap=False).peak_bytes
    except Exception as e:  # the measured numbers above must still be reported
        print(f"memory rehearsal failed: {type(e).__name__}: {e}")
        rehearsed = float("nan")
    rehearsal_s = time.perf_counter() - t0
    res = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": prec.name, "wkv_impl": impl,
        "params": n_params, "batch": args.batch, "seq": args.seq, "grad_ckpt": args.grad_ckpt,
        "compile": args.compile, "first_step_s": first_step_s,
        "step_ms_median": step * 1000, "step_ms_min": min(times) * 1000, "step_ms_max": max(times) * 1000,
        "tokens_per_s": tokens / step, "peak_mem_gib": peak_all / 2**30,
        "activation_mem_gib": activation_peak / 2**30,
        "rehearsed_peak_gib": rehearsed / 2**30, "rehearsal_s": rehearsal_s,
        "final_loss": float(loss),
    }
    tag = " compiled" if args.compile else ""
    print(f"TRAIN{tag} {res['card']} {res['precision']} wkv={impl} params={n_params / 1e6:.1f}M B={args.batch} "
          f"T={args.seq}: {res['tokens_per_s']:,.0f} tok/s, step {res['step_ms_median']:.1f} ms "
          f"[{res['step_ms_min']:.1f}, {res['step_ms_max']:.1f}], peak {res['peak_mem_gib']:.1f} GiB, "
          f"activations {res['activation_mem_gib']:.2f} GiB, rehearsed peak {res['rehearsed_peak_gib']:.1f} GiB"
          + (" (grad ckpt)" if args.grad_ckpt else ""))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train_step()
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in rows) or 1.0
        res["profile"] = []
        print(f"PROFILE one step, CUDA time {total / 1e3:.1f} ms; top {args.profile} by self time:")
        for e in sorted(rows, key=lambda e: e.self_device_time_total, reverse=True)[:args.profile]:
            share = e.self_device_time_total / total
            res["profile"].append({"name": e.key, "ms": e.self_device_time_total / 1e3, "calls": e.count})
            print(f"  {e.self_device_time_total / 1e3:8.2f} ms {share:6.1%} x{e.count:<5d} {e.key[:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
