"""The Program: the one IR every pass sees.

A Program is an *executable* `torch.fx.GraphModule` (aten level, from `torch.export`, unlifted so
parameters are attributes reached by `get_attr` nodes and a pass can slice or replace them), plus
`ModelInfo` (the structure recovered from the graph, see `tcc.ir.structure`) and the specs of its
inputs and outputs. Because the graph stays runnable in PyTorch after every pass, every pass can be
checked numerically at once.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any

import numpy as np
import torch

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", ...
    shape: tuple[int, ...]  # the example shape (-1: any size); dims in max_shape may vary
    range: tuple[int, int] | None = None  # valid integer values [lo, hi), e.g. token ids < vocab size
    # dynamic dims: each dim i takes sizes min_shape[i]..max_shape[i] (None: static, exactly `shape`)
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    @property
    def dynamic_dims(self) -> list[int]:
        """Dims whose size may vary (those traced with a torch.export Dim)."""
        if self.max_shape is None:
            return [i for i, d in enumerate(self.shape) if d < 0]
        return [i for i, (lo, hi) in enumerate(zip(self.min_shape, self.max_shape)) if lo != hi]

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.range is not None:
            d["range"] = list(self.range)
        if self.max_shape is not None:
            d["min_shape"], d["max_shape"] = list(self.min_shape), list(self.max_shape)
        return d

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        ints = lambda key: tuple(int(v) for v in d[key]) if d.get(key) else None
        return TensorSpec(d["name"], d["dtype"], tuple(int(v) for v in d["shape"]), ints("range"), ints("min_shape"), ints("max_shape"))

    def check(self, value: np.ndarray, what: str = "input") -> np.ndarray:
        """Return `value` as this spec's dtype, or raise a UserError naming the mismatch."""
        value = np.asarray(value)
        if self.max_shape is not None and len(value.shape) == len(self.shape):
            bad = [i for i, (lo, hi, v) in enumerate(zip(self.min_shape, self.max_shape, value.shape)) if not lo <= v <= hi]
            if bad:
                i = bad[0]
                raise UserError(
                    f"{what} '{self.name}' has size {value.shape[i]} in dim {i}, the artifact takes "
                    f"{self.min_shape[i]}..{self.max_shape[i]} (shape {list(value.shape)}, maximum {list(self.max_shape)})",
                    "crop or split the input, or recompile with a larger --max-seq-len")
            return self._cast(value, what)
        if len(value.shape) != len(self.shape) or any(d >= 0 and d != v for d, v in zip(self.shape, value.shape)):
            raise UserError(
                f"{what} '{self.name}' has shape {list(value.shape)}, the artifact expects {list(self.shape)}",
                "compile with the matching --seq-len/--batch, or pad/crop the input",
            )
        return self._cast(value, what)

    def _cast(self, value: np.ndarray, what: str) -> np.ndarray:
        if value.dtype != np.dtype(self.dtype):
            if np.can_cast(value.dtype, self.dtype, casting="same_kind"):
                value = value.astype(self.dtype)
            else:
                raise UserError(f"{what} '{self.name}' has dtype {value.dtype}, expected {self.dtype}")
        if self.range is not None and value.size:
            lo, hi = int(value.min()), int(value.max())
            if lo < self.range[0] or hi >= self.range[1]:
                bad = lo if lo < self.range[0] else hi
                raise UserError(f"{what} '{self.name}' holds {bad}, outside the valid range "
                                f"[{self.range[0]}, {self.range[1]}) (e.g. token ids must be below the vocabulary size {self.range[1]})")
        return np.ascontiguousarray(value)


@dataclasses.dataclass
class Program:
    gm: torch.fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    task: str  # "feature-extraction" | "causal-lm" | "custom"
    info: Any = None  # tcc.ir.structure.ModelInfo, recovered after tracing
    source: dict = dataclasses.field(default_factory=dict)  # {"path", "sha256", "kind", "model_type"}
    tokenizer_dir: str | None = None  # where a tokenizer for text inputs lives (HF folders)
    # facts about stored tensors that later passes and backends use, by get_attr target, e.g.
    # {"layers.0.mlp.up_proj.weight": {"sparsity": {"pattern": "2:4", ...}}} (see tcc.compress.sparsity)
    annotations: dict = dataclasses.field(default_factory=dict)

    # -- running -----------------------------------------------------------------------------
    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph in PyTorch on numpy inputs by name; returns numpy outputs by name."""
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise UserError(f"missing inputs {missing}; the program takes {[s.name for s in self.inputs]}")
        args = [torch.from_numpy(s.check(feeds[s.name])) for s in self.inputs]
        with torch.no_grad():
            out = self.gm(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {s.name: o.detach().numpy() for s, o in zip(self.outputs, out)}

    def example_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Deterministic inputs that fit the specs (token ids within the embedding table)."""
        rng = np.random.default_rng(seed)
        vocab = getattr(self.info, "vocab_size", None) or 1000
        feeds = {}
        for s in self.inputs:
            if s.name == "attention_mask":
                feeds[s.name] = np.ones(s.shape, dtype=s.dtype)
            elif np.issubdtype(np.dtype(s.dtype), np.integer):
                lo, hi = s.range or (0, vocab)
                feeds[s.name] = rng.integers(lo, hi, size=s.shape).astype(s.dtype)
            else:
                feeds[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
        return feeds

    # -- bookkeeping ---------------------------------------------------------------------------
    def clone(self, share_weights: bool = False) -> "Program":
        """A copy to rewrite. `share_weights`: its parameters and buffers are this Program's tensor
        objects (no second copy of the weights: copy_sharing_weights), for a copy that is only read,
        or rewritten by passes that replace tensors rather than write into them (not writes_weights)."""
        gm = copy_sharing_weights(self.gm) if share_weights else copy.deepcopy(self.gm)
        return dataclasses.replace(self, gm=gm, info=copy.deepcopy(self.info),
                                   annotations=copy.deepcopy(self.annotations))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer the graph reads, by attribute path."""
        out = dict(self.gm.named_parameters())
        out.update(dict(self.gm.named_buffers()))
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and n.target not in out:
                t = attribute(self.gm, n.target)
                if isinstance(t, torch.Tensor):
                    out[n.target] = t
        return out

    def param_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.named_tensors().values():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def fingerprint(self) -> str:
        """Content hash of graph text and tensor bytes: equal programs give equal fingerprints."""
        h = hashlib.sha256(str(self.gm.graph).encode())
        for name, t in sorted(self.named_tensors().items()):
            h.update(name.encode())
            t = t.detach().contiguous().cpu()
            h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())  # numpy has no bf16
        return h.hexdigest()


def copy_sharing_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of `gm` (graph, submodules, attributes) whose parameters and buffers are the same
    tensor objects as `gm`'s: no second copy of the weights. For a copy whose tensors are replaced
    (register_parameter, setattr), never written into in place (that would change `gm` too)."""
    memo: dict = {}
    for t in [*gm.parameters(), *gm.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]:
        memo[id(t)] = t
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = attribute(gm, n.target)
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t
    return copy.deepcopy(gm, memo)


def attribute(obj, path: str):
    """obj.a.b.c for path "a.b.c" (a get_attr node's target in a GraphModule); None if missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj
