#!/usr/bin/env python3
"""An independent PyTorch reference of vitscope's default recipe, to check how much a
run should learn per epoch (not part of `cargo test`; needs `pip install torch numpy`).

Same model (pre-norm ViT, CLS token, final LayerNorm, linear head), same recipe (AdamW
with decoupled weight decay on weight matrices only, linear warm-up then cosine decay
per step, label smoothing, crop of the zero-padded image + flip, normalisation by the
training set's channel statistics, last partial batch dropped), PyTorch's own code for
every piece. `--init` picks PyTorch's nn.Linear default or timm's truncated normal.

    python3 tests/reference/vit_reference.py --data DIR --epochs 10 --init pytorch
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def load(dir_, names):
    raw = b"".join(open(os.path.join(dir_, n), "rb").read() for n in names)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


class Block(nn.Module):
    def __init__(s, d, h, m):
        super().__init__()
        s.h = h
        s.norm1, s.qkv, s.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        s.norm2, s.fc1, s.fc2 = nn.LayerNorm(d), nn.Linear(d, m), nn.Linear(m, d)

    def forward(s, x):
        b, t, d = x.shape
        q, k, v = s.qkv(s.norm1(x)).reshape(b, t, 3, s.h, d // s.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // s.h), dim=-1)
        x = x + s.proj((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + s.fc2(F.gelu(s.fc1(s.norm2(x))))


class ViT(nn.Module):
    def __init__(s, patch=4, d=96, depth=6, h=3, m=192, init="pytorch", pool="cls"):
        super().__init__()
        s.patch, s.pool = patch, pool
        s.embed = nn.Linear(3 * patch * patch, d)
        s.cls = nn.Parameter(torch.zeros(1, 1, d))
        s.pos = nn.Parameter(torch.zeros(1, (32 // patch) ** 2 + 1, d))
        s.blocks = nn.ModuleList(Block(d, h, m) for _ in range(depth))
        s.norm, s.head = nn.LayerNorm(d), nn.Linear(d, 10)
        nn.init.trunc_normal_(s.cls, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(s.pos, std=0.02, a=-0.04, b=0.04)
        if init == "trunc_normal":
            for mod in s.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.trunc_normal_(mod.weight, std=0.02, a=-0.04, b=0.04)
                    nn.init.zeros_(mod.bias)

    def forward(s, img):
        b, p = img.shape[0], s.patch
        x = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
        if s.pool == "mean":
            x = s.embed(x) + s.pos[:, 1:]
        else:
            x = torch.cat([s.cls.expand(b, -1, -1), s.embed(x)], 1) + s.pos
        for blk in s.blocks:
            x = blk(x)
        x = s.norm(x)
        return s.head(x.mean(1) if s.pool == "mean" else x[:, 0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=10, help="the schedule's length")
    ap.add_argument("--stop-after", type=int, default=0, help="stop after this many epochs (0 = all)")
    ap.add_argument("--init", default="pytorch", choices=["pytorch", "trunc_normal"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    xtr, ytr = load(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = load(a.data, ["test_batch.bin"])
    f = xtr.astype(np.float64) / 255
    mean = torch.tensor(f.mean((0, 2, 3)), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(f.std((0, 2, 3)), dtype=torch.float32).view(1, 3, 1, 1)
    norm = lambda u8: (torch.from_numpy(u8).float() / 255 - mean) / std
    test_x, test_y = norm(xte), torch.from_numpy(yte)

    model = ViT(init=a.init)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "norm" not in n and n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    bs, warm, lr, min_lr = 128, 200, 1e-3, 1e-5
    spe = len(ytr) // bs
    total = spe * a.epochs

    def lr_at(step):  # vitscope's schedule: `step` steps done
        s = step + 1
        if s <= warm:
            return lr * s / warm
        prog = min((s - warm) / max(total - warm, 1), 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * prog))

    padded = np.pad(xtr, ((0, 0), (0, 0), (4, 4), (4, 4)))
    step, t0 = 0, time.time()
    for epoch in range(1, (a.stop_after or a.epochs) + 1):
        model.train()
        order = rng.permutation(len(ytr))
        for i in range(spe):
            idx = order[i * bs:(i + 1) * bs]
            dy, dx = rng.integers(0, 9, bs), rng.integers(0, 9, bs)
            flip = rng.random(bs) < 0.5
            batch = np.stack([padded[j, :, y:y + 32, x:x + 32] for j, y, x in zip(idx, dy, dx)])
            batch[flip] = batch[flip][..., ::-1]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(norm(batch)), torch.from_numpy(ytr[idx]), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            correct = sum((model(test_x[i:i + 500]).argmax(1) == test_y[i:i + 500]).sum().item()
                          for i in range(0, len(test_y), 500))
        print(f"epoch {epoch} step {step} test accuracy {100 * correct / len(test_y):.2f}% "
              f"train loss {loss.item():.4f} at {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
