"""What state compression costs: memory per layer, logit error and validation loss on real text.

A small char-level RWKV-7 is trained briefly on a real text (tiny Shakespeare by default), then the
held-out part is read at several sequence lengths in chunks, carrying the RWKV state from chunk to chunk
either exactly (float32) or compressed at every chunk boundary with each scheme (bf16, fp16, int8 with a
float32 scale per row). Reported per scheme and length: max / mean |logit error| against the exact carry,
the validation loss and its change, top-1 agreement, and how the error grows with the number of chunk
boundaries crossed. Memory per layer is computed with the real `CompressedTensor` code for this model and
for common model sizes.

    python benchmarks/bench_state_compression.py                  # writes benchmarks/results/state_compression.json
    python benchmarks/bench_state_compression.py --quick          # a short smoke run

The text path is a benchmark input only (`--data`); nothing in the package reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kaggletrain import ModelConfig, RWKVModel  # noqa: E402
from kaggletrain.model.state import CompressedTensor  # noqa: E402

SCHEMES = ("bf16", "fp16", "int8")
DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"


def load_text(path: str):
    text = Path(path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:], len(chars)


def layer_bytes(C: int, H: int, N: int) -> dict[str, int]:
    """Bytes of one RWKV layer's state (batch 1): att_shift [C], wkv [H, N, N], ffn_shift [C]."""
    tensors = [torch.zeros(1, C), torch.randn(1, H, N, N), torch.zeros(1, C)]
    out = {"fp32": sum(t.numel() * 4 for t in tensors)}
    for s in SCHEMES:
        out[s] = sum(CompressedTensor.compress(t, s).nbytes() for t in tensors)
    return out


def train(model: RWKVModel, train_ids: torch.Tensor, steps: int, T: int, B: int, lr: float, seed: int, log):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        cur = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = cur
        starts = torch.randint(0, len(train_ids) - T - 1, (B,), generator=g)
        x = torch.stack([train_ids[s:s + T] for s in starts])
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  train step {step:4d}  loss {out.loss.item():.3f}  ({time.time() - t0:.0f} s)")
    model.eval()


@torch.no_grad()
def evaluate(model: RWKVModel, val_ids: torch.Tensor, T: int, n_seq: int, chunk: int) -> dict:
    cfg = model.config
    stride = max(1, (len(val_ids) - T - 1) // max(1, n_seq - 1)) if n_seq > 1 else 0
    x = torch.stack([val_ids[i * stride:i * stride + T] for i in range(n_seq)])
    targets = torch.cat([x[:, 1:], torch.full((n_seq, 1), -100)], dim=1)
    cfg.rwkv_chunk_size, cfg.rwkv_chunk_overlap = chunk, 0
    cfg.rwkv_state_compression = False
    exact = model(x, use_chunking=True).logits.float()
    exact_loss = F.cross_entropy(exact.reshape(-1, exact.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
    # Sanity: the exact carry is the unchunked forward (float32 rounding only).
    unchunked_diff = (model(x).logits.float() - exact).abs().max().item() if T <= 4096 else None
    row = {"T": T, "chunk": chunk, "sequences": n_seq, "chunk_boundaries": (T - 1) // chunk,
           "exact_val_loss": round(exact_loss, 5),
           "exact_vs_unchunked_max_logit_diff": unchunked_diff, "schemes": {}}
    nch = T // chunk
    for s in SCHEMES:
        model.enable_state_compression(s)
        lg = model(x, use_chunking=True).logits.float()
        cfg.rwkv_state_compression = False
        err = (lg - exact).abs()
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), ignore_index=-100).item()
        per_chunk = err[:, :nch * chunk].reshape(n_seq, nch, chunk, -1).mean(dim=(0, 2, 3))
        row["schemes"][s] = {
            "max_abs_logit_err": float(err.max()),
            "mean_abs_logit_err": float(err.mean()),
            "val_loss": round(loss, 5),
            "val_loss_delta": loss - exact_loss,
            "top1_agreement": float((lg.argmax(-1) == exact.argmax(-1)).float().mean()),
            "mean_abs_logit_err_chunk_2": float(per_chunk[1]) if nch > 1 else None,
            "mean_abs_logit_err_last_chunk": float(per_chunk[-1]),
        }
    return row


@torch.no_grad()
def state_stats(model: RWKVModel, val_ids: torch.Tensor, T: int) -> dict:
    cfg = model.config
    cfg.rwkv_state_compression = False
    st = model(val_ids[:T][None]).state
    return {f"layer_{i}": {"wkv_max_abs": float(ls.wkv.abs().max()), "wkv_rms": float(ls.wkv.pow(2).mean().sqrt()),
                           "att_shift_max_abs": float(ls.att_shift.abs().max())}
            for i, ls in enumerate(st.layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-T", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--chunks", default="128,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="save/load the trained model here (skip retraining)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.lengths, args.chunks = 30, "256,1024", "64"
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, flush=True)  # noqa: E731

    train_ids, val_ids, vocab = load_text(args.data)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=args.hidden, num_layers=args.layers, head_size=args.head_size)
    model = RWKVModel(cfg)
    t0 = time.time()
    if args.cache and Path(args.cache).is_file():
        model.load_state_dict(torch.load(args.cache))
        log(f"loaded trained model from {args.cache}")
        model.eval()
    else:
        log(f"training {model.num_parameters():,} parameters, {args.steps} steps of {args.batch}x{args.train_T} chars")
        train(model, train_ids, args.steps, args.train_T, args.batch, args.lr, seed=0, log=log)
        if args.cache:
            torch.save(model.state_dict(), args.cache)
    train_s = time.time() - t0

    lengths = [int(t) for t in args.lengths.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    for chunk in chunks:
        for T in lengths:
            n_seq = max(2, min(16, 16384 // T))
            t1 = time.time()
            row = evaluate(model, val_ids, T, n_seq, chunk)
            rows.append(row)
            log(f"T={T:5d} chunk={chunk:4d} ({row['chunk_boundaries']} boundaries, {n_seq} seqs) exact loss "
                f"{row['exact_val_loss']:.4f}  ({time.time() - t1:.0f} s)")
            for s, r in row["schemes"].items():
                log(f"    {s:5s} max|dlogit| {r['max_abs_logit_err']:.2e}  mean {r['mean_abs_logit_err']:.2e}  "
                    f"dloss {r['val_loss_delta']:+.2e}  top1 agree {r['top1_agreement']:.5f}")

    H = args.hidden // args.head_size
    memory = {f"this model (C={args.hidden}, H={H}, N={args.head_size})": layer_bytes(args.hidden, H, args.head_size)}
    for C in (768, 2048, 4096):
        memory[f"C={C}, N=64 (H={C // 64})"] = layer_bytes(C, C // 64, 64)
    for k, v in memory.items():
        v.update({f"{s}_ratio": round(v[s] / v["fp32"], 4) for s in SCHEMES})
    result = {
        "benchmark": "state_compression",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "data": {"path": args.data, "tokenizer": "char", "vocab": vocab, "train_chars": len(train_ids),
                 "val_chars": len(val_ids)},
        "model": {"hidden": args.hidden, "layers": args.layers, "head_size": args.head_size,
                  "params": model.num_parameters(), "train_steps": args.steps, "train_T": args.train_T,
                  "batch": args.batch, "lr": args.lr, "train_seconds": round(train_s, 1)},
        "memory_per_layer_bytes_batch1": memory,
        "state_magnitudes_after_2048_chars": state_stats(model, val_ids, 2048),
        "eval": rows,
    }
    out = Path(args.out) if args.out else HERE / "results" / (
        "state_compression_quick.json" if args.quick else "state_compression.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps(memory, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
