"""tcc's custom operators, as `torch.library` custom ops.

Each op's reference implementation here *defines its numerics*: the Program stays runnable in
PyTorch, and every backend kernel is tested against these functions. Backends map them to real
kernels (the TVM backend: `backends/tvm/lower.py` -> `R.call_dps_packed` into `backends/kernels`).

Ops:
  tcc::dense(x, w, b?)                y = x @ w.T + b              x [..., K], w [N, K], b [N]
  tcc::dense_w8(x, qw, scale, b?)     y = x @ (qw * scale[:,None]).T + b
                                      qw int8 [N, K] (symmetric, per output channel), scale f32 [N]
  tcc::sdpa(q, k, v, mask?, scale, causal)
                                      softmax(q k^T * scale + mask [+ causal -inf]) v, per head;
                                      q [B, H, Sq, D], k/v [B, Hkv, Sk, D], H % Hkv == 0 (grouped
                                      KV heads: query head h reads KV head h // (H / Hkv)); mask is
                                      additive float, broadcastable to [B, H, Sq, Sk]
"""
from __future__ import annotations

import torch

LIB = "tcc"


@torch.library.custom_op("tcc::dense", mutates_args=())
def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


@dense.register_fake
def _(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("tcc::dense_w8", mutates_args=())
def dense_w8(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    w = qw.to(torch.float32) * scale.to(torch.float32)[:, None]
    return torch.nn.functional.linear(x, w.to(x.dtype), b)


@dense_w8.register_fake
def _(x, qw, scale, b=None):
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


@torch.library.custom_op("tcc::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


@sdpa.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
