"""What keeps a compile's bookkeeping cheap (issue 15, item 3) without changing a number:
dense_a8w8's integer dot products through int8 x int8 -> int32 (tcc.ops._int_dot) equal the
float64 sums they replace, bit for bit."""
from __future__ import annotations

import pytest
import torch

from tcc import ops


@pytest.mark.parametrize("m,k,n,asym,static", [(1, 576, 96, False, False), (5, 577, 9, True, False),
                                               (33, 256, 64, True, True), (8, 130, 40, False, True)])
def test_dense_a8w8_integer_sums_equal_the_float64_ones(m, k, n, asym, static):
    torch.manual_seed(k)
    x = torch.randn(m, k) * 3
    x[0, :7] = 40.0  # an outlier row: codes reach the ends of the range
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    qw[0] = 127
    w_scale = torch.rand(n) * 0.01
    x_scale = torch.tensor([0.05]) if static else None
    x_zero = torch.tensor([17.0]) if static and asym else None
    q, s, z = ops.quantize_rows(x, x_scale, x_zero, asym)
    want = (q - z).to(torch.float64) @ qw.to(torch.float64).T  # the op's definition
    assert torch.equal(ops._int_dot(q, z, qw, asym), want)
    y = torch.ops.tcc.dense_a8w8(x, qw, w_scale, None, x_scale, x_zero, asym)
    assert torch.equal(y, (want * s.to(torch.float64) * w_scale.to(torch.float64)[None, :]).to(torch.float32))


def test_fractional_zero_points_take_the_float64_path():
    q = torch.tensor([[3.5, 10.5]])
    z = torch.tensor([[0.5]])
    qw = torch.tensor([[2, -3]], dtype=torch.int8)
    assert ops._int_dot(q, z, qw, True).item() == 3.0 * 2 + 10.0 * -3
