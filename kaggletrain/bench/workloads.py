"""What the suites run: model sizes, random inputs, and a training step that mirrors train/loop.py."""

from __future__ import annotations

import torch

# Official RWKV-7 shapes for 0.1B/0.4B/1.5B (World vocabulary); the small ones are byte-level CPU sizes.
SIZES = {
    "tiny": dict(num_layers=2, hidden_size=128, vocab_size=256),
    "small": dict(num_layers=4, hidden_size=256, vocab_size=256),
    "medium": dict(num_layers=6, hidden_size=512, vocab_size=256),
    "0.1b": dict(num_layers=12, hidden_size=768, vocab_size=65536),
    "0.4b": dict(num_layers=24, hidden_size=1024, vocab_size=65536),
    "1.5b": dict(num_layers=24, hidden_size=2048, vocab_size=65536),
}
HEAD_SIZE = 64
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_model(size: str, device: torch.device, **config):
    """A randomly initialised RWKVModel of a named size, created directly on `device`."""
    from kaggletrain.model import ModelConfig, RWKVModel

    cfg = ModelConfig(head_size=HEAD_SIZE, **SIZES[size], **config)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 1.5B model would take minutes on the CPU
        return RWKVModel(cfg)


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplies: all but the embedding table (a lookup)."""
    return model.num_parameters() - model.emb.weight.numel()


def tokens(vocab: int, B: int, T: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g).to(device)


def wkv_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(r, w, k, v, a, b) [B, T, H, N] with the model's ranges: decay logits over U(-8, 4), kk unit-norm per
    head, a = -kk, b = kk * in-context rate; plus an upstream gradient for y. Leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r, k = (0.5 * torch.randn(shape, generator=g) for _ in range(2))
    v = torch.randn(shape, generator=g)
    w = torch.rand(shape, generator=g) * 12 - 8
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1)
    rate = torch.rand(shape, generator=g)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (r, w, k, v, -kk, kk * rate)]
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return leaves, dy


class TrainStep:
    """One optimizer step as `Trainer.train_step` does it: autocast (fp16/bf16), loss with L2Wrap, GradScaler
    on GPU fp16, gradient clipping at 1.0, fused AdamW on GPU, zero_grad(set_to_none)."""

    def __init__(self, model, device: torch.device, *, batch: int, seq_len: int, precision: str = "fp32",
                 chunking: bool = False, bptt: str = "full", seed: int = 0):
        from kaggletrain.train.optim import build_optimizer

        self.model, self.device = model, device
        if PRECISIONS[precision] is not None:
            model.enable_mixed_precision(PRECISIONS[precision])
        model.train()
        self.opt = build_optimizer(model, 6e-4, 0.1, (0.9, 0.99), 1e-8, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ids = tokens(model.config.vocab_size, batch, seq_len + 1, device, seed)
        self.x, self.y = ids[:, :-1], ids[:, 1:]
        self.chunking, self.bptt = chunking, bptt
        self.tokens = batch * seq_len
        self.last_loss = None

    def __call__(self) -> None:
        out = self.model(self.x, labels=self.y, shift_labels=False, use_chunking=self.chunking,
                         return_logits=False, bptt=self.bptt, l2wrap=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = out.loss.detach()
