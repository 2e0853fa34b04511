"""Sparsity patterns, pruning masks, SparseGPT, and the sparsity annotation of stored tensors.

Patterns of a weight W [N out, K in] (as aten.linear reads it):
  unstructured  any entries (the sparsify pass prunes the same count in every output row)
  n:m           in every row, each run of m consecutive input features (k = 0..m-1, m..2m-1, ...)
                holds at most n nonzeros (2:4 is the layout sparse tensor cores take); m must divide K
  block r x c   r output rows x c input features, aligned at 0, zeroed or kept whole; r | N, c | K

Annotation: program.annotations[target]["sparsity"], target the get_attr path of the stored tensor:
  {"pattern": "unstructured" | "n:m" | "block", "n": int | None, "m": int | None, "block": [r, c] | None,
   "sparsity": the fraction of W's elements the pattern zeroed (the pass's mask; n:m: (m-n)/m),
   "method": "magnitude" | "wanda" | "sparsegpt"}
  The tensor holds at least those zeros; other entries may be zero too (weights that were zero, or
  that quantize to 0). When quantize replaces the weight by codes it moves the annotation to the code
  tensor and adds how to read it:
   "format": "int8" (codes int8 [N, K]; value = code * scale[n]) | "int4" (packed uint8 [N, K/2],
             low nibble = even k; value = (code - zero) * scale[n, k // group], zero 8 when None),
   "scale": target of the scales, "zero": target of the int4 zero codes or None, "group": int4 group.
  A pruned entry is stored as the code that means exactly 0.0 in every format.

Pattern(kind, n, m, block): .text ("2:4", "block 4x4"), .fixed_sparsity ((m - n) / m for n:m, else
    None), .annotation(sparsity, method) -> the annotation dict, Pattern.of(annotation)
parse_pattern(text, block="1x16") -> Pattern, parse_block("4x4") -> (4, 4)   ValueError when malformed
shape_problem(pattern, shape) -> str | None                 why a [N, K] weight cannot take the pattern
count(sparsity, width) -> int                               entries pruned of `width` (round half up)
keep_mask(scores, pattern, sparsity) -> bool [N, K]
    False at the entries to prune: unstructured, the round(sparsity * K) lowest scores of each row;
    n:m, the m - n lowest of each group; block, per row of blocks the round(sparsity * K / c) blocks
    with the lowest summed score. Ties go to the lower index (stable sort).
allocate(scores by layer, pattern, sparsity) -> {layer: sparsity}
    scope=global: one threshold over every layer's scores, each divided by its layer's mean score (so
    layers compete by relative importance, not by their weights' scale); a layer's share is the
    fraction of its units (elements, or blocks) below the threshold.
sparsegpt(w, h, pattern, sparsity, damp=0.01, block=128) -> (pruned w, pruned mask)
    SparseGPT (Frantar & Alistarh 2023): columns one by one, each pruned entry's error w / U[i,i]
    spread over the columns not yet visited through the upper Cholesky factor U of H^-1 (H = sum x x^T
    plus damp * mean(diag H); columns no token touches get H[i,i] = 1 and weight 0), inside column
    blocks of `block`, to later blocks lazily. The mask comes from w^2 / U[i,i]^2: unstructured, per
    row in each column block as the block comes up (cumulative counts, so each row prunes exactly
    round(sparsity * K); the paper compares over the whole column block, rows balanced is what
    magnitude and wanda give too and what row-parallel kernels like); n:m, per group of m columns as it comes up (blocks a multiple of m); block,
    once up front from the summed scores of the original weight.
holds(w, ann) -> bool
    The stored zeros satisfy the annotation: n:m every group has >= m - n zeros; block, at least
    round(sparsity * blocks) blocks are all zero; unstructured, at least round(sparsity * N * K) zeros.
annotation(program, target), annotate(program, target, ann), move_annotation(program, old, new),
sparse_targets(program) -> {target: annotation}
dense_weight(program, target) -> float [N, K]: the annotated tensor as the op computes with it.
violations(program) -> [str]: annotated tensors (still in the program) whose zeros break the pattern.
describe(ann) -> "2:4, 50.0% zeros (wanda)" and the like.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import torch

from ..ir.ops import dequantize_w4

KINDS = ("unstructured", "n:m", "block")


# -- patterns ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pattern:
    kind: str  # one of KINDS
    n: int | None = None
    m: int | None = None
    block: tuple[int, int] | None = None  # (rows, columns)

    @property
    def text(self) -> str:
        if self.kind == "n:m":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself sets (n:m), else None."""
        return (self.m - self.n) / self.m if self.kind == "n:m" else None

    def annotation(self, sparsity: float, method: str) -> dict:
        return {"pattern": self.kind, "n": self.n, "m": self.m,
                "block": list(self.block) if self.block else None, "sparsity": float(sparsity), "method": method}

    @staticmethod
    def of(ann: dict) -> "Pattern":
        return Pattern(ann["pattern"], ann.get("n"), ann.get("m"), tuple(ann["block"]) if ann.get("block") else None)


def parse_pattern(text: str, block: str = "1x16") -> Pattern:
    """"unstructured", "n:m" (1 <= n < m) or "block" with block "RxC"; ValueError otherwise."""
    text = text.strip().lower()
    if text == "unstructured":
        return Pattern("unstructured")
    if text == "block":
        return Pattern("block", block=parse_block(block))
    nm = re.fullmatch(r"(\d+):(\d+)", text)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 1 <= n < m:
            raise ValueError(f"n:m needs 1 <= n < m, got {text}")
        return Pattern("n:m", n, m)
    raise ValueError(f"must be unstructured, n:m (e.g. 2:4, 4:8) or block, got {text}")


def parse_block(text: str) -> tuple[int, int]:
    b = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if not b or int(b.group(1)) < 1 or int(b.group(2)) < 1:
        raise ValueError(f"must be ROWSxCOLUMNS with both >= 1, e.g. 1x16 or 4x4, got {text}")
    return int(b.group(1)), int(b.group(2))


def shape_problem(pattern: Pattern, shape) -> str | None:
    n, k = shape
    if pattern.kind == "n:m" and k % pattern.m:
        return f"m={pattern.m} does not divide its {k} input features"
    if pattern.kind == "block" and (n % pattern.block[0] or k % pattern.block[1]):
        r, c = pattern.block
        return f"block {r}x{c} does not tile its [{n}, {k}] weight ({r} must divide {n}, {c} must divide {k})"
    return None


# -- masks ---------------------------------------------------------------------------------------------

def count(sparsity: float, width: int) -> int:
    """How many of `width` entries a sparsity prunes (rounded half up)."""
    return int(math.floor(sparsity * width + 0.5))


def _prune_lowest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Per row of scores [R, W]: False at the n_prune lowest (ties: lower index first), True elsewhere."""
    keep = torch.ones(scores.shape, dtype=torch.bool)
    if n_prune > 0:
        keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :n_prune], False)
    return keep


def keep_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float) -> torch.Tensor:
    """bool [N, K], False where to prune; see the module docstring."""
    n, k = scores.shape
    scores = scores.detach().to(torch.float32)
    if pattern.kind == "n:m":
        m = pattern.m
        return _prune_lowest(scores.reshape(-1, m), m - pattern.n).reshape(n, k)
    if pattern.kind == "block":
        r, c = pattern.block
        summed = scores.reshape(n // r, r, k // c, c).sum(dim=(1, 3))
        keep = _prune_lowest(summed, count(sparsity, k // c))
        return keep[:, None, :, None].expand(n // r, r, k // c, c).reshape(n, k)
    return _prune_lowest(scores, count(sparsity, k))


def allocate(scores: dict[str, torch.Tensor], pattern: Pattern, sparsity: float) -> dict[str, float]:
    """Per-layer sparsities from one threshold over all layers (scope=global): each layer's units
    (elements; for block, blocks with their summed scores) divided by the layer's mean unit score, the
    round(sparsity * all units) lowest pruned; a layer's share is the fraction of its units among them."""
    units = {}
    for key, s in scores.items():
        s = s.detach().to(torch.float64)
        if pattern.kind == "block":
            (n, k), (r, c) = s.shape, pattern.block
            s = s.reshape(n // r, r, k // c, c).sum(dim=(1, 3))
        s = s.reshape(-1)
        units[key] = s / s.mean() if s.mean() > 0 else s
    keys = list(units)
    owner = torch.cat([torch.full((units[key].numel(),), i) for i, key in enumerate(keys)])
    lowest = torch.argsort(torch.cat([units[key] for key in keys]), stable=True)[:count(sparsity, owner.numel())]
    pruned = torch.bincount(owner[lowest], minlength=len(keys))
    return {key: int(pruned[i]) / units[key].numel() for i, key in enumerate(keys)}


# -- SparseGPT -----------------------------------------------------------------------------------------

@torch.no_grad()
def sparsegpt(w: torch.Tensor, h: torch.Tensor, pattern: Pattern, sparsity: float, damp: float = 0.01,
              block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of w [N, K] against h = sum x x^T [K, K]; returns (pruned w, bool mask of pruned entries)."""
    W = w.detach().to(torch.float32).clone()
    n, k = W.shape
    H = h.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    d = torch.diag(U)
    pruned = torch.zeros(n, k, dtype=torch.bool)
    if pattern.kind == "block":
        pruned = ~keep_mask(W ** 2 / d[None, :] ** 2, pattern, sparsity)
    m = pattern.m if pattern.kind == "n:m" else None
    if m:
        block = max(m, block - block % m)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, E1, U1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1), U[i1:i2, i1:i2]
        d1 = d[i1:i2]
        if pattern.kind == "unstructured":
            pruned[:, i1:i2] = ~_prune_lowest(W1 ** 2 / d1[None, :] ** 2, count(sparsity, i2) - count(sparsity, i1))
        P1 = pruned[:, i1:i2]  # a view: n:m groups are filled in as they come up
        for i in range(i2 - i1):
            if m and i % m == 0:
                P1[:, i:i + m] = ~_prune_lowest(W1[:, i:i + m] ** 2 / d1[None, i:i + m] ** 2, m - pattern.n)
            err = torch.where(P1[:, i], W1[:, i], 0.0) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = W1.masked_fill(P1, 0.0)
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W, pruned


# -- checks --------------------------------------------------------------------------------------------

def holds(w: torch.Tensor, ann: dict) -> bool:
    """Do the zeros of w [N, K] satisfy the annotation? See the module docstring."""
    if w.dim() != 2:
        return False
    zero = w.detach() == 0
    n, k = zero.shape
    p = Pattern.of(ann)
    if shape_problem(p, (n, k)):
        return False
    if p.kind == "n:m":
        return bool((zero.reshape(n, k // p.m, p.m).sum(dim=-1) >= p.m - p.n).all())
    if p.kind == "block":
        r, c = p.block
        blocks = zero.reshape(n // r, r, k // c, c).all(dim=3).all(dim=1)
        return int(blocks.sum()) >= count(ann["sparsity"], blocks.numel())
    return int(zero.sum()) >= count(ann["sparsity"], n * k)


def describe(ann: dict) -> str:
    p = Pattern.of(ann)
    out = f"{p.text}, {100 * ann['sparsity']:.1f}% zeros ({ann.get('method', '?')})"
    return out + (f", stored {ann['format']}" if ann.get("format") else "")


# -- annotations ---------------------------------------------------------------------------------------

def annotation(program, target: str) -> dict | None:
    return program.annotations.get(target, {}).get("sparsity")


def annotate(program, target: str, ann: dict) -> None:
    program.annotations.setdefault(target, {})["sparsity"] = ann


def move_annotation(program, old: str, new: str) -> dict | None:
    """Move the sparsity annotation of `old` to `new` (e.g. to the codes that replace a weight);
    returns it (None when `old` had none)."""
    entry = program.annotations.get(old)
    if not entry or "sparsity" not in entry:
        return None
    ann = entry.pop("sparsity")
    if not entry:
        del program.annotations[old]
    annotate(program, new, ann)
    return ann


def sparse_targets(program) -> dict[str, dict]:
    """{target: sparsity annotation} of every annotated tensor."""
    return {t: copy.deepcopy(a["sparsity"]) for t, a in program.annotations.items() if "sparsity" in a}


def _tensor(program, target: str):
    obj = program.gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


def dense_weight(program, target: str) -> torch.Tensor:
    """The annotated tensor `target` as a float [N, K] weight (codes dequantized as the op does)."""
    ann = annotation(program, target) or {}
    t = _tensor(program, target)
    if ann.get("format") == "int8":
        return t.to(torch.float32) * _tensor(program, ann["scale"]).to(torch.float32)[:, None]
    if ann.get("format") == "int4":
        zero = _tensor(program, ann["zero"]) if ann.get("zero") else None
        return dequantize_w4(t, _tensor(program, ann["scale"]), zero, ann["group"])
    return t.detach().to(torch.float32)


def violations(program) -> list[str]:
    """Annotated tensors the program still holds whose zeros break their pattern (one line each)."""
    out = []
    for target, ann in sparse_targets(program).items():
        if _tensor(program, target) is None:
            continue  # a later pass removed the tensor
        w = dense_weight(program, target)
        if not torch.isfinite(w).all():
            out.append(f"{target}: non-finite values")
        elif not holds(w, ann):
            out.append(f"{target}: its zeros break the annotated {describe(ann)}")
    return out
