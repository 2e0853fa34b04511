"""Quantization math, calibration statistics and the quantization plan, shared by quantize, smooth and sparsify.

Weight formats (the numerics are tcc/ir/ops.py's; these functions only choose codes and scales):
  int8  per output channel, symmetric (tcc::dense_w8, tcc::dense_a8w8, tcc::embedding_w8 rows):
        scale[n] = max_k |W[n,k]| / 127 (1 for an all-zero row), q = clamp(round(W / scale), -127, 127)
  int4  per row n and group of `group` consecutive input features (tcc::dense_w4), scales stored as
        float16 (rounded to float16 before the codes are chosen, so the codes fit the stored scale;
        clamped to [2^-24, 65504], float16's range):
        symmetric   zero = 8, scale = max|w| / 8, code = clamp(round(w / scale) + 8, 0, 15): levels
                    -8..7 times scale; a group's largest positive weight clips to 7/8 of it, which on
                    SmolLM2's weights gives 20% less squared error than scale = max|w| / 7
        asymmetric  lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / 15 (1 when 0),
                    zero = round(-lo / scale), code = clamp(round(w / scale) + zero, 0, 15)
        float zero  (asymmetric, zero=float) lo = min(w), hi = max(w), scale = (hi - lo) / 15,
                    zero = -lo / scale unrounded, stored float32, code = clamp(round(w / scale + zero),
                    0, 15): the grid lo + scale * code, as llama.cpp's Q4_1 (group 32) - on weights
                    that already lie on such a grid it gives them back exactly; 0.0 is not a level
  round is half-to-even (torch.round) everywhere.

QWeight(kind, codes, scale, zero, group): one quantized [N, K] weight; .dequantize() is what the op
    computes with, .packed() the uint8 [N, K/2] nibbles tcc::dense_w4 reads (low nibble = even k).
Grid(kind, sym, float_zero): the code grid of a format: fit(w [N, G]) -> (scale [N], zero [N]), codes(), values().
int4_group(k, group) -> int | None                  the group a layer with k input features uses: `group`
    when it divides k (0: k), else the largest even divisor of k below it (576 -> 96 for 128);
    None when k is odd (no even divisor: two codes share a byte).
rtn(w, grid, group) -> QWeight                      round to nearest, group by group
fake_quantize(w, grid, scale, zero) -> w on the grid, with a straight-through gradient (heal's training
    through the quantizer)
gptq(w, H, grid, group, damp=0.01, act_order=False, zeros=None) -> QWeight
    GPTQ (Frantar et al. 2023): columns one by one, each quantized and its error (w - q) / U[i,i] spread
    over the columns not yet quantized through the upper Cholesky factor U of H^-1 (H = sum x x^T over
    the calibration tokens, plus damp * mean(diag H) on the diagonal; columns no token touches get
    H[i,i] = 1 and weight 0); updates inside a block of 128 columns are applied per column, to later
    blocks lazily once per block. Natural order: a group's scale and zero are fitted on its columns as
    they are when the group's first column comes up (the paper). act_order: columns by decreasing
    diag(H), every group's scale and zero fitted up front on the original weights ("static groups", so
    groups stay contiguous runs of input features as tcc::dense_w4 needs). zeros (bool [N, K], a
    sparsity mask): those entries take the code of exactly 0 and their whole value is error spread to
    the columns not yet quantized (so the updates never fill a pruned weight back in); scales are
    fitted on the weights with those entries zeroed.
output_error(w, q, H) -> ||(W - Q) X|| / ||W X|| from H.
awq_scale(x_mean, a, expand) -> s
    AWQ's (Lin et al. 2024) candidate scales: s = mean|x|^a normalised by sqrt(max s * min s); the
    pass tries a = 0, 1/20, ..., 19/20 (weights W*s, quantized, divided by s again) and keeps the a with
    the least output error. `expand` [K] maps each input feature to a shared scale (features tied by a
    fold, e.g. query heads of one KV head); a shared scale's mean is its features' mean.
awq_clip(w, h_blocks, grid, group) -> (clipped w, mean ratio)
    AWQ's weight clipping search, per row and group, against the group's block of the input Hessian.
smoothquant_scales(act_max, weights, alpha, expand) -> s
    SmoothQuant (Xiao et al. 2023): s_j = max|X_j|^alpha / max_i|W_ij|^(1-alpha) over all `weights`,
    both clamped to >= 1e-5; tied features take the max of their members.
static_scale(stats, sym) -> (x_scale [1], x_zero [1] | None)
    tcc::dense_a8w8's static per-tensor activation parameters from a calibrated |x| percentile.

run_range(runner, env, start, stop, overrides, taps) -> env
    Nodes start..stop of a GraphRunner's graph computed from the live values before `start` (a
    snapshot), some nodes replaced by overrides[node](get), some values tapped: what a sub-block gives
    with changed layers, or a model run a block at a time.

InputStats / collect(program, feeds, stats): one pass of GraphRunner per feed, tapping chosen nodes'
    values (the input of a linear) into running statistics: token count, per-channel mean and max of
    |x| and sum of x^2 (.l2 = the per-channel L2 norm over all tokens, Wanda's ||X_j||), optionally
    H = sum x^T x (float64) or only its diagonal blocks, and the top-k |x| (or top-k x and -x, for
    asymmetric) of the whole tensor for a percentile.
blockwise(program, layers, feeds, stats_for, process, what)
    Layers processed block by block (GPTQ, SparseGPT): each block's layers see the inputs the program
    computes with the blocks before them already processed; see its docstring.

module_path(node), glob_matches(glob, path): the module a node was traced in (tcc.ir.graph's), and skip globs.

match(program, base_format, group=, tied_format=, min_size=, skip=, embeddings=) -> Plan
    the quantization plan `quantize` rewrites and `smooth` searches for: Plan.layers {weight target:
    Layer(weight, nodes, shape, format, tied, group, ...)} in graph order, Plan.tables (int8 embedding
    tables), Plan.skipped (module, node, reason); see its docstring.
group_fallback(plan, group) -> lines  one per (K, group used) where int4 layers could not use `group`.
linear_reads(node)  the names a linear reads besides its weight (x, a bias node): a GraphRunner patch's needs.
awq_clip_groups(gm, layers, groups, hessian_blocks, grid, group) -> ratios
    awq_clip applied in place to every quantized linear of each input group (tcc.compress.smoothing's groups).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math

import numpy as np
import torch
import torch.fx as fx

from . import sparsity
from ..ir.runner import GraphRunner
from ..errors import UserError
from ..ir.graph import linear_bias, module_path  # noqa: F401  (module_path: callers import it from here too)
from ..ir.program import attribute
from ..ir.ops import dequantize_w4, pack_int4, row_blocks
from ..progress import track

aten, tcc_ops = torch.ops.aten, torch.ops.tcc
# the linears quantize and smoothing rewrite; tcc::dense_bf16: a bf16 checkpoint's own tensors, read widened to float32
DENSE = (aten.linear.default, tcc_ops.dense.default, tcc_ops.dense_bf16.default)
TABLES = {aten.embedding.default: (0, 1), tcc_ops.embedding_bf16.default: (1, 0)}  # embedding op -> (table, ids) positions


# -- formats -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Grid:
    """The code grid of a weight format: kind "int8" (symmetric only) or "int4"."""

    kind: str
    sym: bool = True
    float_zero: bool = False  # asymmetric int4 with a fractional zero point (see the module doc)

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero (as float codes) for each row of w [N, G]."""
        if self.kind == "int8":
            amax = w.abs().amax(dim=1)
            return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)), torch.zeros_like(amax)
        if self.sym:
            amax = w.abs().amax(dim=1)
            return _f16(torch.where(amax > 0, amax / 8.0, torch.ones_like(amax))), torch.full_like(amax, 8.0)
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        if not self.float_zero:
            lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = (hi - lo) / 15.0
        scale = _f16(torch.where(scale > 0, scale, torch.ones_like(scale)))
        return scale, (-lo / scale) if self.float_zero else torch.round(-lo / scale)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Float codes of w [N, ...] with per-row scale/zero broadcast on the trailing dims."""
        shape = (-1,) + (1,) * (w.dim() - 1)
        if self.float_zero:
            q = torch.round(w / scale.reshape(shape) + zero.reshape(shape))
        else:
            q = torch.round(w / scale.reshape(shape)) + zero.reshape(shape)
        return q.clamp(-127, 127) if self.kind == "int8" else q.clamp(0, 15)

    def values(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return (codes - zero.reshape(shape)) * scale.reshape(shape)


def fake_quantize(w: torch.Tensor, grid: Grid, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize w [N, K] on a grid, differentiably: scale (and zero) [N, K / group] per row and
    group (int8: [N] or [N, 1], zero None), the codes Grid.codes gives, rounded with a straight-through
    gradient (round's gradient taken as 1; the clamp's as 0 outside the grid). The value equals
    Grid.values(Grid.codes(...)); the gradient reaches w and, when it requires one, scale."""
    n, k = w.shape
    s = scale.reshape(n, -1, 1)
    g = w.reshape(n, s.shape[1], -1)
    z = torch.zeros_like(s) if zero is None and grid.kind == "int8" else \
        (torch.full_like(s, 8.0) if zero is None else zero.reshape(n, -1, 1).to(torch.float32))
    u = g / s + z if grid.float_zero else g / s
    u = u + (torch.round(u) - u).detach()
    c = u if grid.float_zero else u + z
    c = c.clamp(-127, 127) if grid.kind == "int8" else c.clamp(0, 15)
    return ((c - z) * s).reshape(n, k)


F16_MIN, F16_MAX = 2.0 ** -24, 65504.0  # float16's smallest subnormal and largest finite value


def _f16(scale: torch.Tensor) -> torch.Tensor:
    """int4 scales as float16 will store them (float32 values that float16 holds exactly)."""
    return scale.clamp(F16_MIN, F16_MAX).to(torch.float16).to(torch.float32)


def int4_group(k: int, group: int) -> int | None:
    """The int4 group of a layer with k input features; see the module docstring."""
    if k % 2:
        return None
    group = group or k
    return next(d for d in range(min(group, k) - min(group, k) % 2, 1, -2) if k % d == 0)


@dataclasses.dataclass
class QWeight:
    """A quantized [N, K] weight. int8: codes int8 [N, K], scale f32 [N], group K. int4: codes uint8
    0..15 [N, K] (unpacked), scale f16 [N, K/group], zero uint8 [N, K/group] (float32 with float zero
    points; None when symmetric: 8)."""

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int

    def dequantize(self) -> torch.Tensor:
        if self.kind == "int8":
            return self.codes.to(torch.float32) * self.scale[:, None]
        return dequantize_w4(self.packed(), self.scale, self.zero, self.group)

    def packed(self) -> torch.Tensor:
        return pack_int4(self.codes)

    @property
    def nbytes(self) -> int:
        n, k = self.codes.shape
        if self.kind == "int8":
            return n * k + 4 * n
        scales = self.scale.numel() * self.scale.element_size()
        return n * k // 2 + scales + (self.zero.numel() * self.zero.element_size() if self.zero is not None else 0)


def bits_per_weight(kind: str, k: int, group: int, sym: bool, float_zero: bool = False) -> float:
    """Storage bits per weight of a format for a layer with k input features (scales included)."""
    if kind == "fp32":
        return 32.0
    if kind == "int8":
        return 8.0 + 32.0 / k
    return 4.0 + 16.0 / group + (0.0 if sym else (32.0 if float_zero else 8.0) / group)


def _qweight(grid: Grid, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> QWeight:
    if grid.kind == "int8":
        return QWeight("int8", codes.to(torch.int8), scale.reshape(-1).to(torch.float32), None, group)
    z = None if grid.sym else zero.to(torch.float32 if grid.float_zero else torch.uint8)
    return QWeight("int4", codes.to(torch.uint8), scale.to(torch.float16), z, group)


ROW_CHUNK_BYTES = 1 << 25  # rtn / quantize_per_channel: float32 temporaries of at most this many bytes


def row_chunks(n: int, k: int) -> list[slice]:
    """Slices of rows whose float32 values take at most ROW_CHUNK_BYTES (at least one row). Per-row
    quantization computes each row on its own, so a chunk's codes are the whole weight's bit for bit,
    and its temporaries are a few chunk-sized tensors instead of a few weight-sized ones (rtn's abs,
    division and rounding of a 49,152 x 3,072 LM head: 0.6 GB each; issue 15)."""
    return row_blocks(n, k, ROW_CHUNK_BYTES, 4)


def rtn(w: torch.Tensor, grid: Grid, group: int) -> QWeight:
    """Round to nearest, a scale (and zero) per row and group; int8 is per row (group = K). Row chunks
    at a time (row_chunks)."""
    n, k = w.shape
    group = k if grid.kind == "int8" else group
    parts = [_rtn_rows(w[rows].detach().to(torch.float32), grid, group) for rows in row_chunks(n, k)]
    if len(parts) == 1:
        return parts[0]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QWeight(parts[0].kind, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero, group)


def _rtn_rows(w: torch.Tensor, grid: Grid, group: int) -> QWeight:
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    scale, zero = grid.fit(g.reshape(-1, group))
    scale, zero = scale.reshape(n, k // group), zero.reshape(n, k // group)
    codes = grid.codes(g.reshape(-1, group), scale.reshape(-1), zero.reshape(-1)).reshape(n, k)
    return _qweight(grid, codes, scale, zero, group)


def quantize_per_channel(w: torch.Tensor, s: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row) of w, or of w * s (s [K], a smoothing scale per input
    column): (qweight int8 [N, K], scale float32 [N]), rtn(w * s, Grid("int8"), K)'s bit for bit,
    computed in place on a float32 copy of a chunk of rows at a time (row_chunks)."""
    codes, scales = [], []
    for rows in row_chunks(*w.shape):
        ws = w[rows].to(torch.float32) * s[None, :] if s is not None else w[rows].to(torch.float32, copy=True)
        amax = torch.maximum(ws.amax(dim=1), ws.amin(dim=1).neg_())
        scales.append(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
        codes.append(ws.div_(scales[-1][:, None]).round_().clamp_(-127, 127).to(torch.int8))
        del ws
    if len(codes) == 1:
        return codes[0], scales[0]
    return torch.cat(codes), torch.cat(scales)


# -- GPTQ --------------------------------------------------------------------------------------------

def gptq(w: torch.Tensor, h: torch.Tensor, grid: Grid, group: int, damp: float = 0.01, act_order: bool = False,
         block: int = 128, zeros: torch.Tensor | None = None) -> QWeight:
    """GPTQ of w [N, K] against the Hessian h = sum x x^T [K, K]; see the module docstring."""
    W = w.detach().to(torch.float32).clone()
    n, k = W.shape
    Z = torch.zeros(n, k, dtype=torch.bool) if zeros is None else zeros.to(torch.bool).clone()
    W[Z] = 0.0
    group = k if grid.kind == "int8" else group
    if group < k and block % group:
        block = group  # every group then starts a block, where its columns are up to date
    H = h.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale = torch.zeros(n, k // group)
    zero = torch.zeros(n, k // group)
    order = torch.arange(k)
    if act_order:  # static groups: fitted on the weights before any update, then columns by diag(H)
        for g in range(k // group):
            scale[:, g], zero[:, g] = grid.fit(W[:, g * group:(g + 1) * group])
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H, Z = W[:, order], H[order][:, order], Z[:, order]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)

    codes = torch.zeros(k, n)  # column by column: each column's codes are one contiguous row here
    groups = (order // group).tolist()
    masked = bool(Z.any())
    g_now = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(i2 - i1, n), U[i1:i2, i1:i2]
        d = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            g = groups[col]
            if not act_order and col % group == 0:
                cols = W1[:, i:i + group] if col + group <= i2 else torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                scale[:, g], zero[:, g] = grid.fit(cols.masked_fill(Z[:, col:col + group], 0.0) if masked else cols)
                g_now = None
            if g != g_now:  # this group's scale and zero as contiguous vectors, taken once per group
                s_g, z_g, g_now = scale[:, g].contiguous(), zero[:, g].contiguous(), g
            w = W1[:, i]
            c = grid.codes(w, s_g, z_g)
            if masked:
                c = torch.where(Z[:, col], z_g, c)
            codes[col] = c
            err = (w - grid.values(c, s_g, z_g)).div_(d[i])
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            E1[i] = err
        W[:, i2:].addmm_(E1.T, U[i1:i2, i2:], alpha=-1.0)
    codes = codes.T[:, torch.argsort(order)]
    return _qweight(grid, codes, scale, zero, group)


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """||(W - Q) X||_F / ||W X||_F over the calibration tokens, from H = sum x x^T: float32 GEMMs (a ratio
    reported to 6 digits; float64 ones took 30 ms a SmolLM2 layer), sums in float64."""
    h = h.to(torch.float32)
    w = w.to(torch.float32)
    d = w - q.to(torch.float32)
    num = float(torch.sum((d @ h).mul_(d), dtype=torch.float64))
    den = float(torch.sum((w @ h).mul_(w), dtype=torch.float64))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


# -- activation-aware scaling ------------------------------------------------------------------------

def _pool(values: torch.Tensor, expand: torch.Tensor | None, how: str) -> torch.Tensor:
    """Per shared scale: the max or mean of the features `expand` maps to it."""
    if expand is None:
        return values
    m = int(expand.max()) + 1
    if how == "max":
        return torch.zeros(m, dtype=values.dtype).scatter_reduce(0, expand, values, "amax", include_self=False)
    return torch.zeros(m, dtype=values.dtype).scatter_reduce(0, expand, values, "mean", include_self=False)


def _full(s: torch.Tensor, expand: torch.Tensor | None) -> torch.Tensor:
    return s if expand is None else s[expand]


def awq_scale(x_mean: torch.Tensor, a: float, expand: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's candidate scales mean|x|^a per shared scale, normalised by sqrt(max * min)."""
    s = _pool(x_mean.to(torch.float32), expand, "mean").clamp_min(1e-8).pow(a)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_clip(w: torch.Tensor, h_blocks: torch.Tensor, grid: Grid, group: int, n_grid: int = 20,
             max_shrink: float = 0.5) -> tuple[torch.Tensor, float]:
    """AWQ's clipping search: per row and group, the bound m = max|w| * (1 - i/n_grid), i < n_grid *
    max_shrink, whose clamp(w, -m, m), quantized, gives the least output error d^T H_g d (H_g: the
    group's diagonal block of the input Hessian, h_blocks [K/group, group, group]). Returns the clipped
    weight and the mean m / max|w|."""
    n, k = w.shape
    wg = w.detach().to(torch.float32).reshape(n, k // group, group)
    h = h_blocks.to(torch.float32)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    best_err, best = torch.full(wg.shape[:2], math.inf), amax.clone()
    for i in range(int(max_shrink * n_grid)):
        bound = amax * (1 - i / n_grid)
        d = wg - rtn(torch.clamp(wg, -bound, bound).reshape(n, k), grid, group).dequantize().reshape(wg.shape)
        err = torch.einsum("ngi,gij,ngj->ng", d, h, d)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better[..., None], bound, best)
    ratio = float((best / amax.clamp_min(1e-30)).mean())
    return torch.clamp(wg, -best, best).reshape(n, k), ratio


@torch.no_grad()
def smoothquant_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                       expand: torch.Tensor | None = None) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
    a = _pool(act_max.to(torch.float32), expand, "max").clamp_min(1e-5)
    b = _pool(w_max.to(torch.float32), expand, "max").clamp_min(1e-5)
    return (a.pow(alpha) / b.pow(1 - alpha)).clamp_min(1e-5)


# -- calibration statistics ----------------------------------------------------------------------------

class InputStats:
    """Running statistics of one node's value x [..., K]; see the module docstring."""

    def __init__(self, k: int, *, hessian: bool = False, blocks: int = 0, percentile: float | None = None,
                 signed: bool = False, feeds: int = 1):
        self.k, self.tokens = k, 0
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.abs_max = torch.zeros(k)
        self.sq_sum = torch.zeros(k, dtype=torch.float64)
        self.H = torch.zeros(k, k, dtype=torch.float64) if hessian else None
        self.blocks = blocks  # H's diagonal blocks of this size only: [K/blocks, blocks, blocks]
        self.H_blocks = torch.zeros(k // blocks, blocks, blocks, dtype=torch.float64) if blocks else None
        self.percentile, self.feeds, self.signed, self.topk = percentile, feeds, signed, 0
        self.top = torch.empty(0)  # largest |x| (or x), top-k of all values seen
        self.bottom = torch.empty(0)  # largest -x, when signed

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.k).to(torch.float32)
        a = x.abs()
        self.tokens += x.shape[0]
        self.abs_sum += a.sum(dim=0, dtype=torch.float64)
        self.abs_max = torch.maximum(self.abs_max, a.amax(dim=0))
        self.sq_sum += (x * x).sum(dim=0, dtype=torch.float64)
        if self.H is not None:
            self.H += (x.T @ x).to(torch.float64)  # one feed's sum in float32, the total in float64
        if self.H_blocks is not None:
            xg = x.reshape(x.shape[0], -1, self.blocks)
            self.H_blocks += torch.einsum("tgi,tgj->gij", xg, xg).to(torch.float64)
        if self.percentile is not None:
            self.topk = self.topk or percentile_k(x.numel() * self.feeds, self.percentile)
            if self.signed:
                self.top, self.bottom = _top(self.top, x, self.topk), _top(self.bottom, -x, self.topk)
            else:
                self.top = _top(self.top, a, self.topk)

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).to(torch.float32)

    @property
    def l2(self) -> torch.Tensor:
        """Per-channel L2 norm over every token seen."""
        return self.sq_sum.sqrt().to(torch.float32)


def _top(current: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest of `current` and `values` together, descending."""
    values = values.flatten()
    both = torch.cat([current, values.topk(min(k, values.numel())).values])
    return both.topk(min(k, both.numel())).values


def percentile_k(total: int, percentile: float) -> int:
    """How many of `total` values lie at or above the `percentile` (100 = the max only)."""
    return max(1, int(math.floor((1.0 - percentile / 100.0) * total)) + 1)


def static_scale(stats: InputStats, sym: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x_scale f32 [1], x_zero f32 [1] or None) for dense_a8w8 from the k-th largest value kept."""
    if sym:
        s = float(stats.top[-1]) / 127.0
        return torch.tensor([s if s > 0 else 1.0]), None
    hi, lo = max(float(stats.top[-1]), 0.0), min(-float(stats.bottom[-1]), 0.0)
    s = (hi - lo) / 255.0
    s = s if s > 0 else 1.0
    return torch.tensor([s], dtype=torch.float32), torch.tensor([float(np.round(-lo / s))], dtype=torch.float32)


def run_range(runner: GraphRunner, env: dict, start: int, stop: int, overrides: dict | None = None,
              taps: dict | None = None) -> dict:
    """{node: value} after computing nodes start..stop (inclusive) of the runner's graph from `env`
    (the live values before `start`, e.g. a GraphRunner snapshot, which is not changed); overrides
    {node: fn(get)} replace a node's computation, taps {node: fn(value)} see a node's value (also of
    a node already in env)."""
    overrides, taps = overrides or {}, taps or {}
    env = {n: (v.clone() if n in runner.mutated and isinstance(v, torch.Tensor) else v) for n, v in env.items()}
    for n, fn in taps.items():
        if n in env:
            fn(env[n])
    with torch.no_grad():
        for n in runner.nodes[start:stop + 1]:
            if n in overrides:
                v = overrides[n](env.__getitem__)
            elif n.op == "get_attr":
                v = runner.attrs[n]
            elif n.op in ("call_function", "call_method", "call_module"):
                a, kw = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                v = (n.target(*a, **kw) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **kw)
                     if n.op == "call_method" else runner.gm.get_submodule(n.target)(*a, **kw))
            else:
                raise ValueError(f"cannot run {n.op} node {n.name} inside a range")
            env[n] = v
            if n in taps:
                taps[n](v)
    return env


def blockwise(program, layers: list, feeds: list[dict], stats_for, process, what: str) -> None:
    """Process `layers` (objects with .nodes: the linear fx nodes reading one weight) block by block,
    each block's layers from the inputs the program computes with the blocks before them already
    processed (GPTQ, SparseGPT). ModelInfo's blocks cut the graph into spans (the first starts at the
    earliest input of any layer; layers after the last block, an lm head, go with it). For each span:
    every feed's live values run through it, tapping stats_for(span's layers) -> {input node name:
    InputStats}; process(span's layers, stats) changes them and returns overrides {fx node: fn(get)}
    saying how they compute from then on ({} when it changed their weights in place); the feeds'
    values move on to the next span with those overrides. The model runs about twice per feed."""
    gm = program.gm
    runner = GraphRunner(gm)
    first = lambda nodes: min(runner.position[n.name] for n in nodes)
    nodes = {n.name: n for n in gm.graph.nodes}
    blocks = [[nodes[l.node] for l in _block_linears(b) if l.node in nodes]
              for b in (program.info.blocks if program.info else [])]
    starts = [first(lins) for lins in blocks if lins]
    x_first = min(runner.position[n.args[0].name] for l in layers for n in l.nodes)
    starts = sorted({min([x_first] + starts)} | {s for s in starts if s > x_first})
    end = len(runner.nodes) - 2  # the node before the output
    envs = [runner.run(feed_args(program, f), snapshot_at={starts[0]}).snapshots[starts[0]]
            for f in track(feeds, what)]
    for a, b in zip(starts, starts[1:] + [end + 1]):
        here = [l for l in layers if a <= first(l.nodes) < b]
        stats = stats_for(here)
        taps = {nodes[name]: st.update for name, st in stats.items()}
        for env in envs:
            run_range(runner, env, a, b - 1, taps=taps)
        overrides = process(here, stats)
        if b <= end:
            envs = [{n: v for n, v in run_range(runner, env, a, b - 1, overrides).items() if runner.last_use[n] >= b}
                    for env in envs]


def _block_linears(b) -> list:
    a, m = b.attention, b.mlp
    return ([l for l in (a.qkv, a.q, a.k, a.v, a.o) if l] if a else []) + \
           ([l for l in (m.gate_up, m.gate, m.up, m.down) if l] if m else [])


def feed_args(program, feed: dict) -> list[torch.Tensor]:
    return [torch.from_numpy(spec.check(feed[spec.name])) for spec in program.inputs]


def collect(program, feeds: list[dict], stats: dict[str, InputStats], what: str = "calibrating",
            keep: int | None = None) -> list:
    """Run every feed once, tapping node `name`'s value into stats[name]; returns each feed's outputs
    (the first `keep` feeds' only, when given)."""
    runner = GraphRunner(program.gm)

    def tap(st):
        def fn(v, get):
            st.update(v)
            return v
        return fn

    patches = {name: (tap(st), ()) for name, st in stats.items()}
    outputs = []
    for i, feed in enumerate(track(feeds, f"{what} ({len(feeds)} feeds, {len(stats)} inputs)")):
        out = runner.run(feed_args(program, feed), patches=patches).outputs
        if keep is None or i < keep:
            outputs.append(out)
    return outputs


def collect_stats(program, feeds: list[dict], stats: dict[str, InputStats], what: str = "calibrating") -> None:
    """`collect` for callers that need only the statistics: reused from tcc's cache (keyed by the
    program's content, the feeds and what is collected) when the same calibration ran before."""
    from . import stats_cache as cache
    if not cache.load_stats(program, feeds, stats):
        collect(program, feeds, stats, what)
        cache.save_stats(program, feeds, stats)


# -- names ---------------------------------------------------------------------------------------------

def glob_matches(glob: str, path: str) -> bool:
    """A glob matches a module path or any dotted suffix of it ('lm_head' matches 'model.lm_head')."""
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), glob) for i in range(len(parts)))


# -- the quantization plan: which linears and tables, in which format --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Layer:
    weight: str  # get_attr target of the float weight
    nodes: list[fx.Node]  # the linear nodes reading it (usually one)
    shape: tuple[int, int]  # [N, K]
    format: str  # "w8" | "w4" | "a8w8" | "fp32"
    tied: str | None = None  # the embedding table whose int8 (or int4) buffers it reads
    group: int = 0  # int4: the input features per scale this layer uses (int4_group)
    q: QWeight | None = None
    act: dict = dataclasses.field(default_factory=dict)  # node name -> (x_scale, x_zero) when static
    info: dict = dataclasses.field(default_factory=dict)
    sparsity: dict | None = None  # the weight's sparsity annotation (tcc.compress.sparsity), carried to its codes
    stored: dict = dataclasses.field(default_factory=dict)  # suffix ("int8", "scale", ...) -> new buffer target

    @property
    def modules(self) -> list[str]:
        return sorted({module_path(n) for n in self.nodes})


@dataclasses.dataclass
class Plan:
    layers: dict[str, Layer]  # by weight target, in graph order
    tables: dict[str, list[fx.Node]]  # embedding table target -> embedding nodes
    skipped: list[dict]


def match(program, base_format: str, *, group: int, tied_format: str, min_size: int, skip: list[str],
          embeddings: bool, check_groups: bool = True, who: str = "quantize") -> Plan:
    """The quantization plan: every linear (DENSE) whose weight is a float 2-D get_attr tensor with >=
    min_size elements, whose module path matches no `skip` glob and whose weight nothing else reads
    becomes a Layer in `base_format` ("w8" | "w4" | "a8w8"); with `embeddings`, embedding tables too
    (Plan.tables), and a linear reading such a table (a tied lm_head) a Layer in `tied_format` that
    shares its buffers (Layer.tied; "w4": the table's int4 codes, the quantize pass's embedding_format=int4). int4 layers get int4_group(K, group); an odd K is a
    UserError of pass `who` (check_groups)."""
    gm = program.gm
    candidates: dict[str, list[fx.Node]] = {}
    tables: dict[str, list[fx.Node]] = {}
    skipped: list[dict] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in DENSE + tuple(TABLES):
            continue
        is_table = n.target in TABLES
        if is_table and not embeddings:
            continue
        w = n.args[TABLES[n.target][0]] if is_table else (n.args[1] if len(n.args) > 1 else None)
        path = module_path(n)
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            skipped.append({"module": path, "node": n.name, "reason": "weight is computed, not a stored tensor"})
            continue
        t = attribute(gm, w.target)
        reason = None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            reason = "weight is not a 2-D float tensor"
        elif t.numel() < min_size:
            reason = f"{t.numel()} weights < min_size={min_size}"
        elif any(glob_matches(g, path) for g in skip):
            reason = "matches skip"
        if reason:
            skipped.append({"module": path, "node": n.name, "reason": reason})
        else:
            (tables if is_table else candidates).setdefault(w.target, []).append(n)

    readers: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, set()).update(n.users)
    layers = {}
    for target, nodes in candidates.items():
        others = [u for u in readers[target] if u not in nodes]
        shape = tuple(attribute(gm, target).shape)
        if others and target in tables and all(u in tables[target] for u in others):
            layers[target] = Layer(target, nodes, shape, tied_format, tied=target,
                                   group=int4_group(shape[1], group) or 0 if tied_format == "w4" else 0)
        elif others:
            reason = f"weight '{target}' is also read by {sorted(u.name for u in others)}"
            skipped += [{"module": module_path(n), "node": n.name, "reason": reason} for n in nodes]
        else:
            layer = layers[target] = Layer(target, nodes, shape, base_format,
                                           sparsity=sparsity.annotation(program, target))
            if base_format == "w4":
                layer.group = int4_group(shape[1], group) or 0
                if check_groups and not layer.group:
                    raise UserError(f"pass '{who}' option 'weights': layer {layer.modules[0] or target} cannot be "
                                    f"quantized to int4: its {shape[1]} input features are odd (two int4 codes "
                                    "share a byte, so a group must be even)",
                                    f"skip=[{layer.modules[0] or target}] the layer, or use weights=int8")
    return Plan(layers, tables, skipped)


def group_fallback(plan: Plan, group: int) -> list[str]:
    """One line per (K, group used) where int4 layers could not use the requested group."""
    counts: dict[tuple[int, int], int] = {}
    for l in plan.layers.values():
        if l.format == "w4" and l.group != (group or l.shape[1]):
            counts[(l.shape[1], l.group)] = counts.get((l.shape[1], l.group), 0) + 1
    return [f"group {group} does not divide K={k} for {n} layer{'s' * (n > 1)}: used {g}"
            for (k, g), n in sorted(counts.items())]


def linear_reads(n: fx.Node) -> tuple[str, ...]:
    """The node names a linear's computation reads besides its weight: x, and its bias when that is a node
    (what a GraphRunner patch replacing the linear needs)."""
    b = linear_bias(n)
    return (n.args[0].name,) + ((b.name,) if isinstance(b, fx.Node) else ())


def awq_clip_groups(gm, layers: dict, groups: list, hessian_blocks, grid: Grid, group: int) -> list[float | None]:
    """AWQ's clipping (awq_clip) of every quantized linear's weight in place, group by group of linears
    reading one input x: hessian_blocks(x) is the diagonal int4-group blocks of x's Hessian as the
    linears see it. Returns each group's mean clip ratio (None when it has no quantized linear)."""
    out = []
    for x, lins in groups:
        h = hessian_blocks(x)
        k = h.shape[0] * h.shape[1]
        ratios = []
        for n in lins:
            if n.args[1].target in layers:
                w = attribute(gm, n.args[1].target)
                clipped, ratio = awq_clip(w, h, grid, int4_group(k, group))
                with torch.no_grad():
                    w.copy_(clipped)
                ratios.append(ratio)
        out.append(round(sum(ratios) / len(ratios), 4) if ratios else None)
    return out

