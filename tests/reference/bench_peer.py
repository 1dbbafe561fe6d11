#!/usr/bin/env python3
"""The speed peer of `vitscope bench`: PyTorch training the same model (vitscope's
default: patch 4, dim 96, depth 6, 3 heads, MLP 192, mean pooling) on random images,
in f32 and with bf16 autocast around the forward (oneDNN then multiplies in bf16 on
AMX or AVX-512 BF16), same batch and threads. Prints training images/s per mode,
alternating the modes so that a slow moment of a shared machine hits both.

    python3 tests/reference/bench_peer.py --threads 2 --batch 64 --steps 40 --rounds 3

`--modes bf16` times bf16 autocast alone: for rounds that alternate it with another
program (vitscope's `bench`) at the shortest interval.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from vit_reference import ViT


def images_per_sec(model, opt, batch, steps, warmup, bf16):
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", choices=["both", "f32", "bf16"], default="both",
                    help="time f32, bf16 autocast, or both alternately")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ViT(pool="mean")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    modes = {"both": (False, True), "f32": (False,), "bf16": (True,)}[a.modes]
    for r in range(a.rounds):
        for bf16 in modes:
            ips = images_per_sec(model, opt, a.batch, a.steps, a.warmup, bf16)
            print(f"round {r + 1} {'bf16 autocast' if bf16 else 'f32'}: {ips:.1f} train images/s", flush=True)


if __name__ == "__main__":
    main()
