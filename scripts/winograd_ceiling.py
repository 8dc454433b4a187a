"""How much could Winograd 3x3 convolutions save on the CPU? (BENCHMARKS.md, "Why fp32 stops near 1.2x")

Times, for each 3x3 convolution shape of R50 ICNet at 512x1024 input (pyramid-pooling bottleneck, layer4, layer3,
layer2, layer1, stem), oneDNN's direct convolution (NCHW and channels_last) against Winograd F(2x2,3x3) and
F(4x4,3x3) written with PyTorch ops (transformed weights precomputed), and the batched matrix product alone, which
is the floor of any Winograd implementation built on the same GEMM. Prints medians in ms and the Winograd
outputs' relative error against the direct convolution.

    python scripts/winograd_ceiling.py            # 2 threads, about a minute on a quiet 2-core machine
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016): Y = A^T [(G g G^T) * (B^T d B)] A
_MATRICES = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}

# (in channels, out channels, output H, W) of R50 ICNet's 3x3 convolutions at 512x1024, and how many there are
SHAPES = [(2048, 512, 16, 32, 1, "PPM bottleneck"), (512, 512, 16, 32, 3, "layer4 (dilation 4)"),
          (256, 256, 16, 32, 6, "layer3 (dilation 2)"), (128, 128, 32, 64, 3, "layer2"),
          (64, 64, 64, 128, 3, "layer1"), (32, 64, 128, 256, 1, "stem")]


class Winograd3x3:
    """A stride-1, padding-1, undilated 3x3 convolution as Winograd F(m x m, 3 x 3). Dilated layers run the same
    arithmetic on their d x d interleaved sub-grids, so the undilated timing is what matters here."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, m: int) -> None:
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in _MATRICES[m])
        self.m, self.a = m, m + 2
        u = torch.einsum("ij,kcjl,ml->imkc", g, weight.double(), g)
        self.u = u.reshape(self.a * self.a, weight.shape[0], weight.shape[1]).float().contiguous()
        self.bt, self.at, self.bias = bt.float(), at.float(), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        m, a = self.m, self.a
        th, tw = -(-h // m), -(-w // m)
        d = F.pad(x, (1, tw * m + 1 - w, 1, th * m + 1 - h)).unfold(2, a, m).unfold(3, a, m)
        v = (self.bt @ d @ self.bt.T).permute(4, 5, 1, 0, 2, 3).reshape(a * a, c, n * th * tw)
        y = torch.bmm(self.u, v)
        k = y.shape[1]
        y = y.reshape(a, a, k, n, th, tw).permute(3, 2, 4, 5, 0, 1)
        y = (self.at @ y @ self.at.T).permute(0, 1, 2, 4, 3, 5).reshape(n, k, th * m, tw * m)[:, :, :h, :w]
        return y + self.bias.view(1, -1, 1, 1)


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| layer | count | C->K @ HxW | direct | channels_last | F(2x2) | F(4x4) | F(4x4) GEMM alone "
          "| F(4x4) rel. error |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    total = {"cl": 0.0, "best": 0.0, "floor": 0.0}
    with torch.inference_mode():
        for c, k, h, w, count, name in SHAPES:
            conv = torch.nn.Conv2d(c, k, 3, padding=1).eval()
            x = torch.relu(torch.randn(1, c, h, w))
            ref = conv(x)
            # a copy: Module.to converts in place and returns the module itself, so 'direct' would time channels_last
            xcl = x.to(memory_format=torch.channels_last)
            convcl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
            direct = median_ms(lambda: conv(x), args.iters)
            cl = median_ms(lambda: convcl(xcl), args.iters)
            wg = {m: Winograd3x3(conv.weight, conv.bias, m) for m in (2, 4)}
            wg_ms = {m: median_ms(lambda m=m: wg[m](x), args.iters) for m in (2, 4)}
            tiles = -(-h // 4) * -(-w // 4)
            v = torch.randn(36, c, tiles)
            floor = median_ms(lambda: torch.bmm(wg[4].u, v), args.iters)
            err = ((wg[4](x) - ref).abs().max() / ref.abs().max()).item()
            total["cl"] += count * cl
            total["best"] += count * min(cl, *wg_ms.values())
            total["floor"] += count * min(cl, floor)
            print(f"| {name} | {count} | {c}->{k} @ {h}x{w} | {direct:.2f} | {cl:.2f} | {wg_ms[2]:.2f} | "
                  f"{wg_ms[4]:.2f} | {floor:.2f} | {err:.1e} |", flush=True)
    print(f"\nall 3x3 convolutions, channels_last: {total['cl']:.1f} ms; best of direct/Winograd per layer: "
          f"{total['best']:.1f} ms (saves {total['cl'] - total['best']:.1f}); GEMM floor: {total['floor']:.1f} ms "
          f"(saves at most {total['cl'] - total['floor']:.1f})")


if __name__ == "__main__":
    main()
