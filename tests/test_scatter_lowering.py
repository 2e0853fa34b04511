"""Accumulating index_put (x[idx] += v with repeated indices: ToMe's segment sums in prune-tokens'
merge, scatter-add in user models) compiled for x86.

TVM's own lowering (topi.index_put) adds the values in a parallel loop over the updates, so two
threads can add to the same element at once and one addition is lost: prune-tokens' merged ViT
differed from PyTorch by 0.79 relative in one clean-clone CI run and matched it in the next. tcc
legalizes relax.index_put with accumulate as a scatter over the flattened tensor whose update loop
is serial (backends/tvm/schedule.py). Bound: the artifact matches PyTorch within 1e-5 relative (max
abs error / max |reference|) on every one of 20 calls, each call adding thousands of values into
a few dozen elements (a lost update would move an element by a whole value, O(1) relative).
"""
from __future__ import annotations

import numpy as np
import torch

import tcc


class SegmentSums(torch.nn.Module):
    """Sums of v's rows over slots (1-D index into a flattened [m, C] table), and a 2-D index_put
    with two index tensors, one of them negative (counted from the end), into a [m, C] table."""
    m = 24

    def forward(self, v, slot, rows, cols):
        B, n, C = v.shape
        slot, rows, cols = slot % self.m, rows % (2 * self.m) - self.m, cols % C  # any ids the compiler tries
        base = (slot[:, :, None] * C + torch.arange(C)).reshape(-1)
        flat = torch.zeros(self.m * C, dtype=v.dtype).index_put((base,), v.reshape(-1), accumulate=True)
        table = torch.zeros(self.m, C, dtype=v.dtype).index_put((rows, cols), v[0, : rows.shape[0], 0], accumulate=True)
        return flat.reshape(self.m, C), table


def test_accumulating_index_put_matches_pytorch_on_every_call(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, C, m = 4096, 8, SegmentSums.m
    feed = {"v": torch.randn(1, n, C, generator=g), "slot": torch.randint(0, m, (1, n), generator=g),
            "rows": torch.randint(-m, m, (n,), generator=g), "cols": torch.randint(0, C, (n,), generator=g)}
    module = SegmentSums().eval()
    with torch.no_grad():
        want = [t.numpy() for t in module(*feed.values())]
    program = tcc.trace(module, example_inputs=feed)
    feeds = {k: t.numpy() for k, t in feed.items()}
    with tcc.compile(program, "x86", out=tmp_path / "scatter", verify=False, latency=False, cache=False) as art:
        for call in range(20):
            for got, ref in zip(art(feeds).values(), want):
                err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
                assert err < 1e-5, (call, err)
