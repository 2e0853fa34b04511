"""ModelInfo: a transformer's structure, recovered from its traced graph by pattern.

`recover(gm) -> ModelInfo` reads an aten-level `torch.fx.GraphModule` (after
`tcc.ir.canonical.canonicalize`, so every projection is one linear node) and finds, with no
per-architecture table:

  attention   cores are SDPA nodes (aten, tcc::sdpa) or the eager chain q @ k^T (or baddbmm with
              ALiBi) -> scale / mask -> softmax -> @ v. q, k and v are walked back through shape and
              rotary ops (view, transpose, slice, cat, mul, add, neg, split, repeat_kv...) to their
              projections; one projection serving several of them is a fused qkv. Which output
              features of a projection belong to which head is found by pushing feature indices
              through the shape ops, so GPT-2's split, GPT-NeoX's per-head interleaving and BLOOM's
              [head, part, dim] layout all come out exact; likewise which input features of the
              output projection each head feeds.
  residuals   forward from the output projection through dropout / casts / views / layer scales
              (x * gamma with a stored per-channel gamma: CaiT, DINOv2) (and a norm, for Gemma-2 style
              sandwich norms) to the add whose other operand is the block's input
              stream (an ancestor of the projection inputs); parallel-residual blocks (GPT-NeoX,
              Phi, GPT-J) share one add for attention and MLP.
  blocks      block i's input is that residual operand. Its MLP is found among the projections
              between its input and the next block's input that are no attention projection: down
              feeds a residual add; gate and up are the projections before it, told apart by the
              product act(gate) * up (one projection split in two halves is a fused gate_up).
              Further MLPs on the stream after that MLP's residual add (or before the first
              attention) are blocks of their own with attention None (after drop-attention); a
              block whose MLP was dropped has mlp None. An attention-only block followed by an
              MLP-only one reads as one block (the graph is the same).
  norms       aten.layer_norm / rms_norm, or decomposed: x [- mean] * rsqrt(mean(..) + eps)
              [* w or (1 + w)] [+ b]. Placement is "post" when the residual stream itself passes
              through the norms (BERT), "pre" when norms only feed the sub-blocks (LLaMA, GPT-2).
  the rest    embeddings (token / position / segment, from where their indices come), final norm,
              lm head (the projection whose value leaves the graph; tied when it reads the token
              embedding's table).

Linears are aten.linear, tcc::dense and tcc::dense_w8, and tcc::sdpa is an attention core, so
recovery works after quantization passes too. Module paths (node.meta["nn_module_stack"]) serve
only as names: a graph without them (ONNX) gives the same structure. ModelInfo holds node *names*
and get_attr targets, so it deep-copies and serialises (`to_json` / `from_json`); look nodes up
again with `nodes_by_name(gm)` or `ModelInfo.node(gm, name)`. A graph without attention gives a
ModelInfo with no blocks.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from .graph import BIAS_AT, linear_bias, module_path, op_name, sdpa_operands  # noqa: F401  (op_name: callers import it from here)
from .program import attribute as _attr

# -- op vocabulary ---------------------------------------------------------------------------------
LINEAR = {"aten.linear", "tcc.dense", "tcc.dense_w8", "tcc.dense_a8w8", "tcc.dense_w4", "tcc.dense_bf16"}
SDPA = {"aten.scaled_dot_product_attention", "tcc.sdpa"}
MATMUL = {"aten.matmul", "aten.bmm"}
SCORES = MATMUL | {"aten.baddbmm"}  # q @ k^T, or bias + q @ k^T (ALiBi)
SOFTMAX = {"aten.softmax", "aten._softmax", "aten._safe_softmax"}
ADD = {"aten.add", "aten.add_"}
# ops whose value is their first argument's, maybe cast or reshaped
IDENTITY = {"aten.to", "aten._to_copy", "aten.alias", "aten.dropout", "aten.clone", "aten.contiguous",
            "aten.detach", "aten.lift_fresh_copy", "aten.type_as"}
PASSTHROUGH = IDENTITY | {"aten.view", "aten.reshape", "aten._unsafe_view"}
# ops that only move elements: feature indices can be pushed through them
SHAPE = PASSTHROUGH | {"aten.transpose", "aten.permute", "aten.expand", "aten.unsqueeze", "aten.squeeze",
                       "aten.slice", "aten.select", "aten.narrow", "aten.split", "aten.split_with_sizes",
                       "aten.chunk", "aten.unbind", "aten.t", "aten.numpy_T", "aten.flatten", "aten.unflatten",
                       "aten.index", "aten.index_select", "getitem"}  # index: only by constant indices
# ops between a projection and an attention core: shape, rotary, scaling, repeat_kv
QKV_PATH = SHAPE | {"aten.mul", "aten.div", "aten.add", "aten.sub", "aten.neg", "aten.cat", "aten.stack",
                    "aten.repeat", "aten.repeat_interleave", "aten.index_select"}
# ops between q @ k^T and softmax: scale, mask, soft-capping
SCORES_PATH = PASSTHROUGH | {"aten.mul", "aten.div", "aten.add", "aten.sub", "aten.where", "aten.masked_fill",
                             "aten.tanh"}
ACTIVATIONS = {"aten.gelu": "gelu", "aten.silu": "silu", "aten.relu": "relu", "aten.sigmoid": "sigmoid",
               "aten.tanh": "tanh", "aten.gelu_": "gelu", "aten.relu_": "relu"}


def nodes_by_name(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


# -- the dataclasses -------------------------------------------------------------------------------
Ranges = list[list[int]]  # [[start, stop), ...] feature ranges


@dataclass
class Linear:
    node: str
    weight: str | None  # get_attr target (the int8 weight for tcc::dense_w8)
    bias: str | None
    in_features: int
    out_features: int
    module: str = ""  # module path, "" when the graph has none
    op: str = "aten.linear"  # or "tcc.dense", "tcc.dense_w8"
    scale: str | None = None  # tcc::dense_w8's per-output-channel scales


@dataclass
class Norm:
    node: str  # the norm's output
    input: str  # producer of the normalised value (walked back through casts and views)
    kind: str  # "layer_norm" | "rms_norm"
    weight: str | None = None
    bias: str | None = None
    module: str = ""


@dataclass
class Attention:
    core: str  # the SDPA node, or the probs @ v matmul of an eager chain
    kind: str  # "sdpa" | "eager"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: Linear | None = None  # None for the parts a fused projection serves
    k: Linear | None = None
    v: Linear | None = None
    o: Linear | None = None
    qkv: Linear | None = None  # fused projection
    qkv_slices: dict[str, Ranges] = field(default_factory=dict)  # part -> its output features of qkv
    # per head: feature ranges of the source projection's output (q/k/v, qkv when fused) or of the
    # output projection's input (o); None when the layout could not be traced
    q_heads: list[Ranges] | None = None
    k_heads: list[Ranges] | None = None
    v_heads: list[Ranges] | None = None
    o_heads: list[Ranges] | None = None
    scores: str | None = None  # eager: the q @ k^T node
    softmax: str | None = None  # eager
    input: str | None = None  # what the q projection reads
    residual_add: str | None = None
    norm: Norm | None = None  # pre: feeds the projections; post: normalises the residual sum
    out_norm: Norm | None = None  # sandwich: normalises the output before the residual add


@dataclass
class MLP:
    down: Linear
    up: Linear | None  # None when fused into gate_up
    gate: Linear | None = None
    gate_up: Linear | None = None  # one projection holding gate and up
    gate_up_slices: dict[str, Ranges] = field(default_factory=dict)  # "gate"/"up" -> output features
    act: str | None = None
    input: str | None = None
    residual_add: str | None = None
    norm: Norm | None = None
    out_norm: Norm | None = None


@dataclass
class Block:
    index: int
    name: str
    attention: Attention | None  # None after drop-attention
    mlp: MLP | None
    input: str  # residual stream entering the block
    output: str  # residual stream leaving it (the next block's input)


@dataclass
class Embedding:
    node: str
    weight: str | None
    num_embeddings: int
    dim: int
    kind: str  # "token" | "position" | "segment" | "other"
    module: str = ""


@dataclass
class ModelInfo:
    blocks: list[Block] = field(default_factory=list)
    embeddings: list[Embedding] = field(default_factory=list)
    final_norm: Norm | None = None
    lm_head: Linear | None = None
    lm_head_tied: bool = False  # the lm head reads the token embedding's table
    hidden_size: int | None = None
    vocab_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_placement: str = "none"  # "pre" | "post" | "none"
    parallel_residual: bool = False

    def node(self, gm: fx.GraphModule, name: str) -> fx.Node:
        return nodes_by_name(gm)[name]

    def linears(self) -> list[Linear]:
        """Every projection inside the blocks, in block order."""
        out = []
        for b in self.blocks:
            a, m = b.attention, b.mlp
            out += [x for x in (a.qkv, a.q, a.k, a.v, a.o) if x is not None] if a else []
            out += [x for x in (m.gate_up, m.gate, m.up, m.down) if x is not None] if m else []
        return out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "ModelInfo":
        def build(cls, x, **nested):
            if x is None:
                return None
            return cls(**{**x, **{k: f(x[k]) for k, f in nested.items()}})

        lin = lambda x: build(Linear, x)
        norm = lambda x: build(Norm, x)
        att = lambda x: build(Attention, x, q=lin, k=lin, v=lin, o=lin, qkv=lin, norm=norm, out_norm=norm)
        mlp = lambda x: build(MLP, x, down=lin, up=lin, gate=lin, gate_up=lin, norm=norm, out_norm=norm)
        blocks = [build(Block, b, attention=att, mlp=mlp) for b in d.get("blocks", [])]
        return ModelInfo(**{**d, "blocks": blocks, "embeddings": [Embedding(**e) for e in d.get("embeddings", [])],
                            "final_norm": norm(d.get("final_norm")), "lm_head": lin(d.get("lm_head"))})

    def describe(self) -> str:
        return _describe(self)


# -- the graph and small helpers -------------------------------------------------------------------
class GraphIndex:
    """A graph's nodes in order, by name, and their positions (for passes that read a graph)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.order = {n: i for i, n in enumerate(self.nodes)}


class _Graph(GraphIndex):
    """The graph being read: node order, live nodes, parameter-only subgraphs, norms."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.output = next(n for n in reversed(self.nodes) if n.op == "output")
        self.live = ancestors(self.output)
        self._const: dict[fx.Node, bool] = {}  # computed from parameters and literals only
        for n in self.nodes:  # graph order is topological
            self._const[n] = n.op == "get_attr" or (
                n.op == "call_function" and all(self._const[a] for a in n.all_input_nodes))
        self.linears = {n for n in self.nodes if op_name(n) in LINEAR and n in self.live}
        self.norm_at, self.norms_of = self._find_norms()

    def const(self, n) -> bool:
        return not isinstance(n, fx.Node) or self._const[n]

    def value(self, n: fx.Node):
        """The value of a constant node (parameters, buffers, literals)."""
        return _evaluate(n, self.gm)

    def param(self, n) -> str | None:
        """get_attr target of a parameter, or of the one parameter a constant is computed from (1 + w)."""
        if not isinstance(n, fx.Node):
            return None
        if n.op == "get_attr":
            return n.target
        attrs = [a for a in ancestors(n) if a.op == "get_attr"] if self.const(n) else []
        return attrs[0].target if len(attrs) == 1 else None

    def _find_norms(self):
        """norm_at: output node -> Norm for every norm (outermost node of decomposed ones);
        norms_of: input node -> its norms, in graph order."""
        found = {n: nm for n in self.nodes if n in self.live and (nm := _norm_at(n, self)) is not None}
        norm_at, norms_of = {}, {}
        for n, nm in found.items():
            if any(found.get(u) is not None and found[u].input == nm.input for u in n.users):
                continue  # an inner node of a decomposed norm
            norm_at[n] = nm
            norms_of.setdefault(nm.input, []).append(nm)
        return norm_at, norms_of

    def norm_before(self, x: fx.Node) -> Norm | None:
        """The norm producing x (through casts and views)."""
        return self.norm_at.get(x) or self.norm_at.get(stream_source(x))

    def norm_after(self, x: fx.Node) -> Norm | None:
        """The first norm reading stream node x."""
        norms = self.norms_of.get(stream_source(x).name)
        return norms[0] if norms else None


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def size_hint(s) -> int:
    """A size as an int; a symbolic size (a dynamic-length graph's torch.SymInt) by its example
    value, without the guard int() would add (which specialises the graph to that length)."""
    return s.node.hint if isinstance(s, torch.SymInt) else int(s)


def is_size(a) -> bool:
    """Whether `a` is a node computing a symbolic size (aten.sym_size.int and arithmetic on it)."""
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.SymInt)


def _shape(n) -> tuple | None:
    v = _val(n)
    return tuple(size_hint(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _reach(n: fx.Node, step) -> set[fx.Node]:
    seen, todo = {n}, [n]
    while todo:
        for a in step(todo.pop()):
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def ancestors(n: fx.Node) -> set[fx.Node]:
    """`n` and every node it reads, transitively."""
    return _reach(n, lambda m: m.all_input_nodes)


def descendants(n: fx.Node) -> set[fx.Node]:
    """`n` and every node that reads it, transitively."""
    return _reach(n, lambda m: m.users)


def _reads(u: fx.Node, n: fx.Node) -> bool:
    """u takes n as its first (data) argument."""
    return bool(u.args) and u.args[0] is n


def _is_scalar_scale(n: fx.Node) -> bool:
    """mul/div of a tensor by a Python number."""
    return (op_name(n) in ("aten.mul", "aten.div") and len(n.args) == 2
            and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], (int, float)))


def _is_layer_scale(n: fx.Node, g: "_Graph") -> bool:
    """x * gamma with a stored per-channel gamma (CaiT / DINOv2 layer scale)."""
    return (op_name(n) == "aten.mul" and len(n.args) == 2 and isinstance(n.args[1], fx.Node)
            and g.const(n.args[1]) and _shape(n.args[1]) is not None and len(_shape(n.args[1])) == 1
            and _shape(n.args[1]) == _shape(n.args[0])[-1:])


def stream_source(n: fx.Node) -> fx.Node:
    """Walk back through value-keeping ops (cast, dropout, view...) to the producing node."""
    while op_name(n) in PASSTHROUGH and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _module(n: fx.Node) -> str:
    """A node's module path as a name: from its module stack only (tcc.ir.graph.module_path without
    the weight-path fallback: ONNX value names would give every block the same name)."""
    return module_path(n, fallback=False)


def _runs(idx: list[int]) -> Ranges:
    """[3, 4, 5, 9, 10] -> [[3, 6], [9, 11]]"""
    out = []
    for i in idx:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def _linear(n: fx.Node) -> Linear:
    op = op_name(n)
    x, w = n.args[0], n.args[1]
    target = lambda a: a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None
    return Linear(node=n.name, weight=target(w), bias=target(linear_bias(n)), in_features=_shape(x)[-1],
                  out_features=_shape(n)[-1], module=_module(n), op=op,
                  scale=target(n.args[2]) if BIAS_AT[op] > 2 else None)  # the quantized ops: args[2] the weight scale


# -- norms -------------------------------------------------------------------------------------------
def _norm_at(n: fx.Node, g: _Graph) -> Norm | None:
    """The norm whose output is n (fused op, or any node of a decomposed one), else None."""
    if n.op != "call_function":
        return None
    op = op_name(n)
    if op in ("aten.layer_norm", "aten.rms_norm"):
        a = list(n.args) + [None] * 4
        bias = a[3] if op == "aten.layer_norm" else None
        return Norm(n.name, stream_source(a[0]).name, op[5:], g.param(a[2]), g.param(bias), _module(n))
    weight = bias = None
    m = n
    if op_name(m) in ADD and _affine(m, g):
        bias, m = _affine(m, g)
    if op_name(m) == "aten.mul" and _affine(m, g):
        weight, m = _affine(m, g)
    core = _normalise_core(stream_source(m))
    if core is None:
        return None
    x, kind = core
    return Norm(n.name, x.name, kind, g.param(weight), g.param(bias), _module(n))


def _affine(m: fx.Node, g: _Graph):
    """(parameter operand, data operand) of a binary op with a [..., hidden] parameter, else None."""
    if len(m.args) != 2:
        return None
    a, b = m.args
    for p, x in ((a, b), (b, a)):
        if isinstance(p, fx.Node) and isinstance(x, fx.Node) and g.const(p) and not g.const(x):
            if _shape(p) and _shape(x) and _shape(p)[-1] == _shape(x)[-1]:
                return p, x
    return None


def _normalise_core(m: fx.Node):
    """(x, kind) when m = y * rsqrt(r) or y / sqrt(r), r holding a mean/var; y = x or x - mean(x)."""
    op = op_name(m)
    if op not in ("aten.mul", "aten.div") or len(m.args) != 2 or not all(isinstance(a, fx.Node) for a in m.args):
        return None
    y, r = m.args
    root = "aten.rsqrt" if op == "aten.mul" else "aten.sqrt"
    if op == "aten.mul" and _root(y, root):
        y, r = r, y
    if not _root(r, root) or not _has_reduction(r):
        return None
    y = stream_source(y)
    if op_name(y) == "aten.sub" and op_name(y.args[1]) == "aten.mean":
        return stream_source(y.args[0]), "layer_norm"
    return y, "rms_norm"


def _root(r: fx.Node, root: str) -> bool:
    for _ in range(4):
        if op_name(r) == root:
            return True
        if op_name(r) not in IDENTITY | {"aten.reciprocal"}:
            return False
        r = r.args[0]
    return False


def _has_reduction(r: fx.Node, depth: int = 6) -> bool:
    todo = [(r, 0)]
    while todo:
        n, d = todo.pop()
        if op_name(n) in ("aten.mean", "aten.var", "aten.var_mean", "aten.sum"):
            return True
        if d < depth:
            todo += [(a, d + 1) for a in n.all_input_nodes]
    return False


# -- attention -------------------------------------------------------------------------------------
def _cores(g: _Graph) -> list[tuple]:
    """(core, q, k, v, kind, scores, softmax) for every live attention core, in graph order."""
    out = []
    for n in g.nodes:
        if n not in g.live:
            continue
        if op_name(n) in SDPA:
            out.append((n, n.args[0], n.args[1], n.args[2], "sdpa", None, None))
        elif op_name(n) in SOFTMAX:
            scores = _walk_back_to(n.args[0], SCORES, SCORES_PATH)
            pv = _walk_forward_to(n, MATMUL, PASSTHROUGH)
            if scores is not None and pv is not None:
                q, kt = scores.args[-2], scores.args[-1]  # baddbmm(bias, q, k^T)
                out.append((pv, q, kt, pv.args[1], "eager", scores.name, n.name))
    return out


def _walk_back_to(n, ops: set, through: set, depth: int = 12):
    todo = deque([(n, 0)])
    while todo:
        m, d = todo.popleft()
        if op_name(m) in ops:
            return m
        if op_name(m) in through and d < depth:
            todo += [(a, d + 1) for a in m.all_input_nodes]
    return None


def _walk_forward_to(n: fx.Node, ops: set, through: set, depth: int = 8):
    """The first node of `ops` taking n (through `through` ops) as its first argument."""
    todo = deque([(n, 0)])
    while todo:
        m, d = todo.popleft()
        for u in m.users:
            if _reads(u, m) and op_name(u) in ops:
                return u
            if _reads(u, m) and op_name(u) in through and d < depth:
                todo.append((u, d + 1))
    return None


def _projection_of(x: fx.Node, g: _Graph) -> tuple[fx.Node | None, set]:
    """The projection a core input comes from, and the nodes on the way (x included)."""
    seen, todo, found = {x}, [x], []
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in g.linears:
                found.append(a)
            elif op_name(a) in QKV_PATH:
                todo.append(a)
    if not found:
        return None, seen
    # a LoRA-like sum reaches several: the base projection has the widest input
    return max(found, key=lambda l: _shape(l.args[0])[-1]), seen


def _propagate(start: fx.Node, t0: torch.Tensor, allowed: set, g: _Graph) -> dict:
    """Push index tensor t0 (standing for start's value) forward through the shape ops in `allowed`;
    returns {node: its index tensor} for every node reached."""
    env, todo = {start: t0}, deque([start])
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u in env or u not in allowed or not (op_name(u) in SHAPE or _is_scalar_scale(u)):
                continue
            if any(a is not n and not g.const(a) and not is_size(a) for a in u.all_input_nodes):
                continue  # data-dependent (e.g. indices computed from the input)
            if op_name(u) in IDENTITY or _is_scalar_scale(u):
                env[u] = env[n]
                todo.append(u)
                continue
            def swap(a):  # symbolic sizes replay with their example value
                if a is n:
                    return env[n]
                if is_size(a):
                    return size_hint(a.meta["val"])
                return g.value(a) if isinstance(a, fx.Node) else a
            try:
                env[u] = u.target(*fx.node.map_arg(u.args, swap), **fx.node.map_arg(u.kwargs, swap))
            except Exception:  # an op we cannot replay on the index tensor: stop this branch
                continue
            todo.append(u)
    return env


def _feature_index(lin: fx.Node) -> torch.Tensor:
    shape = _shape(lin)
    return torch.arange(shape[-1], dtype=torch.float64).expand(shape)


def _head_features(lin: fx.Node, path: set, head_dim: int, g: _Graph) -> list[Ranges] | None:
    """Per head, the ranges of lin's output features that reach the core, in head order: read at the
    last node on the way whose last dim is head_dim (heads repeated for GQA count once)."""
    env = _propagate(lin, _feature_index(lin), path, g)
    at = [n for n, t in env.items() if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == head_dim]
    for n in sorted(at, key=g.order.get, reverse=True):
        heads = _distinct_rows(env[n].reshape(-1, head_dim))
        flat = [f for h in heads for f in h]
        if len(set(flat)) == len(flat):  # else not a head layout (k^T with seq == head_dim)
            return [_runs(list(h)) for h in heads]
    return None


def _distinct_rows(rows: torch.Tensor) -> list[list[int]]:
    """The distinct rows of a 2-D tensor of feature indices, as int lists in the order they first
    occur (each row is repeated for every position of the sequence: deduplicated in torch, not in
    Python: 2.6 of a 1B Llama's 2.8 s of recover() before, which every pass that changes the Program runs)."""
    rows = rows.to(torch.int64)
    if not rows.numel():
        return []
    # each row by one number (a random integer projection, wrapping: equal rows, equal numbers; 1-D unique
    # is far cheaper than unique(dim=0)); distinct rows that meet on one number are caught below
    mix = torch.randint(1, 2 ** 62, (rows.shape[1],), generator=torch.Generator().manual_seed(0)) | 1
    key = (rows * mix).sum(1)
    _, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows), dtype=torch.int64).scatter_reduce_(
        0, inverse, torch.arange(len(rows)), "amin")
    if not torch.equal(rows[first][inverse], rows):  # two distinct rows met on one number: exactly instead
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        first = torch.full((len(uniq),), len(rows), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(len(rows)), "amin")
    return rows[first.sort().values].tolist()


def _o_head_features(core: fx.Node, o: fx.Node, head_dim: int, g: _Graph) -> list[Ranges] | None:
    """Per head, the ranges of the output projection's input features it feeds."""
    shape = _shape(core)
    if shape is None or len(shape) < 3:
        return None
    heads = shape[-3]
    idx = (torch.arange(heads, dtype=torch.float64)[:, None, None] * head_dim
           + torch.arange(head_dim, dtype=torch.float64)).expand(shape)
    x = o.args[0]
    t = _propagate(core, idx, descendants(core) & ancestors(x), g).get(x)
    if t is None:
        return None
    vec = t.reshape(-1, t.shape[-1])[0].to(torch.int64).tolist()
    return [_runs([f for f, v in enumerate(vec) if v // head_dim == h]) for h in range(heads)]


def _attention(core_tuple, g: _Graph) -> Attention | None:
    core, q_in, k_in, v_in, kind, scores, softmax = core_tuple
    head_dim = _shape(q_in)[-1]
    parts = {}
    for part, x in (("q", q_in), ("k", k_in), ("v", v_in)):
        lin, path = _projection_of(x, g)
        if lin is None:
            return None
        parts[part] = (lin, _head_features(lin, path, head_dim, g))
    o = _walk_forward_to(core, LINEAR, SHAPE)
    att = Attention(core=core.name, kind=kind, num_heads=0, num_kv_heads=0, head_dim=head_dim,
                    o=_linear(o) if o is not None else None, scores=scores, softmax=softmax,
                    input=parts["q"][0].args[0].name)
    att.q_heads, att.k_heads, att.v_heads = (parts[p][1] for p in "qkv")
    att.o_heads = _o_head_features(core, o, head_dim, g) if o is not None else None
    fused = [p for p in "qkv" if sum(parts[p][0] is parts[r][0] for r in "qkv") > 1]
    for p in "qkv":
        if p not in fused:
            setattr(att, p, _linear(parts[p][0]))
    if fused:
        att.qkv = _linear(parts[fused[0]][0])
        for p in fused:
            heads = parts[p][1] or []
            att.qkv_slices[p] = _runs(sorted(f for h in heads for r in h for f in range(*r)))
    # when the head layout could not be traced: a separate projection's width, else the core's heads
    count = lambda p, x: (len(parts[p][1]) if parts[p][1] else
                          _shape(x)[-3] if p in fused else _shape(parts[p][0])[-1] // head_dim)
    att.num_heads, att.num_kv_heads = count("q", q_in), count("k", k_in)
    return att


def _residual_add(out: fx.Node, stream: set, g: _Graph) -> tuple[fx.Node | None, Norm | None]:
    """(residual add, sandwich norm): forward from a sub-block's output projection through
    value-keeping ops, scalings, a norm and adds, to the add whose other operand is the block's input
    stream (`stream`: ancestors of the sub-block's input)."""
    n, out_norm = out, None
    for _ in range(32):
        nxt = None
        for u in n.users:
            if op_name(u) in ADD and len(u.args) >= 2 and all(isinstance(a, fx.Node) for a in u.args[:2]):
                other = u.args[1] if u.args[0] is n else u.args[0]
                if other in stream:
                    return u, out_norm
                nxt = nxt or u  # a parallel sibling's output (attn + mlp), keep going
            elif _reads(u, n) and (op_name(u) in PASSTHROUGH or _is_scalar_scale(u) or _is_layer_scale(u, g)):
                nxt = nxt or u
        if nxt is None and out_norm is None and g.norms_of.get(stream_source(n).name):
            out_norm = g.norms_of[stream_source(n).name][0]
            nxt = g.by_name[out_norm.node]
        if nxt is None:
            return None, out_norm
        n = nxt
    return None, out_norm


def _other_operand(add: fx.Node, inner: fx.Node) -> fx.Node:
    """The add's operand that does not come from `inner`."""
    a, b = add.args[0], add.args[1]
    return b if inner in ancestors(a) else a


# -- MLP ---------------------------------------------------------------------------------------------
def _mlp(candidates: list[fx.Node], g: _Graph) -> MLP | None:
    """Among a block's non-attention projections: down feeds a residual add of the MLP's input."""
    for down in reversed(candidates):
        anc = ancestors(down)
        ups = [c for c in candidates if c is not down and c in anc]
        if not 1 <= len(ups) <= 2:
            continue
        mlp_in = ups[0].args[0]
        add, out_norm = _residual_add(down, ancestors(mlp_in), g)
        if add is None:
            continue
        m = MLP(down=_linear(down), up=None, input=mlp_in.name, residual_add=add.name, out_norm=out_norm)
        _gate_up(m, ups, down, g)
        return m
    return None


def _mlp_chain(candidates: list[fx.Node], g: _Graph) -> list[MLP]:
    """The MLPs among candidates in stream order: _mlp finds the first one (a later down projection
    has the earlier MLP's projections among its ancestors too), the next is looked for among the
    candidates after its residual add."""
    found = []
    while candidates:
        m = _mlp(candidates, g)
        if m is None:
            break
        found.append(m)
        after = descendants(g.by_name[m.residual_add])
        candidates = [c for c in candidates if c in after]
    return found


def _mlp_stream_input(m: MLP, g: _Graph) -> fx.Node:
    """The residual stream entering an MLP-only block: its residual add's other operand."""
    return stream_source(_other_operand(g.by_name[m.residual_add], g.by_name[m.down.node]))


def _gate_up(m: MLP, ups: list[fx.Node], down: fx.Node, g: _Graph):
    """Fill gate/up (or gate_up) and act: gated when down reads act(gate) * up."""
    between = set().union(*(descendants(u) for u in ups)) & ancestors(down)
    for prod in sorted(between, key=g.order.get):
        if op_name(prod) != "aten.mul" or len(prod.args) != 2 or not all(isinstance(a, fx.Node) for a in prod.args):
            continue
        sides = [_shape_source(a) for a in prod.args]  # the up side reaches a projection by shape ops
        for up_side, gate_side in ((0, 1), (1, 0)):
            up_lin = sides[up_side]
            gate_lin = next((u for u in ups if u in ancestors(prod.args[gate_side])), None)
            if up_lin not in ups or gate_lin is None or sides[gate_side] in ups:
                continue
            if gate_lin is not up_lin:
                m.gate, m.up = _linear(gate_lin), _linear(up_lin)
            else:  # one projection split into gate and up parts (not x * f(x) inside an activation)
                gate_f = _features_at(up_lin, _act_input(prod.args[gate_side]), g)
                up_f = _features_at(up_lin, prod.args[up_side], g)
                flat = [f for r in gate_f + up_f for f in range(*r)]
                if not gate_f or not up_f or len(set(flat)) != len(flat):
                    continue
                m.gate_up, m.gate_up_slices = _linear(up_lin), {"gate": gate_f, "up": up_f}
            m.act = _activation(gate_lin, prod.args[gate_side], g)
            return
    m.up = _linear(ups[-1])
    if len(ups) == 2:  # two projections but no product found: report both, first as gate
        m.gate = _linear(ups[0])
    m.act = _activation(ups[-1], down, g)


def _shape_source(n: fx.Node) -> fx.Node:
    while op_name(n) in SHAPE and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


def _act_input(n: fx.Node) -> fx.Node:
    """Walk back from an activation's output to the shape-op node it starts from."""
    while op_name(n) not in SHAPE and op_name(n) not in LINEAR and n.all_input_nodes:
        n = next(a for a in n.all_input_nodes if not isinstance(a, fx.Node) or a.op != "get_attr")
    return n


def _features_at(lin: fx.Node, x: fx.Node, g: _Graph) -> Ranges:
    """lin's output features that make up x (x reached from lin by shape ops)."""
    t = _propagate(lin, _feature_index(lin), descendants(lin) & ancestors(x), g).get(x)
    return _runs(t.reshape(-1, t.shape[-1])[0].to(torch.int64).tolist()) if t is not None else []


def _activation(src: fx.Node, dst: fx.Node, g: _Graph) -> str | None:
    """Name the activation on the way from src to dst."""
    path = sorted(descendants(src) & ancestors(dst), key=g.order.get)
    ops = {op_name(n) for n in path}
    for n in path:
        name = ACTIVATIONS.get(op_name(n))
        if name == "gelu" and n.kwargs.get("approximate", (list(n.args[1:2]) or ["none"])[0]) == "tanh":
            return "gelu_tanh"
        if name == "tanh" and "aten.mul" in ops:
            return "gelu_tanh"  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
        if name == "sigmoid" and "aten.mul" in ops:  # x * sigmoid(x), or x * sigmoid(1.702 x)
            return "quick_gelu" if _is_scalar_scale(n.args[0]) else "silu"
        if name:
            return name
    return None


# -- embeddings and the head -----------------------------------------------------------------------
def _embedding(n: fx.Node, g: _Graph) -> Embedding:
    """token: indices are a graph input; position: 0, 1, 2... (arange, a mask's cumsum, a buffer);
    segment: one constant id (BERT's token types)."""
    w, idx = n.args[0], n.args[1]
    shape = _shape(w) or (0, _shape(n)[-1])
    src = _shape_source(idx)
    if src.op == "placeholder":
        kind = "token"
    elif g.const(idx):
        kind = _index_kind(_evaluate(idx, g.gm))
    elif op_name(src) in ("aten.gather", "aten.index", "aten.index_select") and g.const(src.args[0]):
        kind = _index_kind(_evaluate(src.args[0], g.gm))  # ids looked up in a buffer
    else:
        ops = {op_name(a) for a in ancestors(idx)}
        kind = "position" if ops & {"aten.arange", "aten.cumsum"} else "other"
    return Embedding(n.name, g.param(w), shape[0], shape[1], kind, _module(n))


def _index_kind(v) -> str:
    if not isinstance(v, torch.Tensor) or v.numel() == 0:
        return "other"
    v = v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1)
    if v.shape[-1] > 1 and bool((v[:, 1:] - v[:, :-1] == 1).all()):
        return "position"
    if bool((v == v.flatten()[0]).all()):
        return "segment"
    return "other"


def _evaluate(n: fx.Node, gm: fx.GraphModule):
    """The value of a node computed from parameters, buffers and literals only (None on failure)."""
    memo = {}

    def ev(m):
        if not isinstance(m, fx.Node):
            return m
        if m not in memo:
            if m.op == "get_attr":
                memo[m] = _attr(gm, m.target)
            else:
                memo[m] = m.target(*fx.node.map_arg(m.args, ev), **fx.node.map_arg(m.kwargs, ev))
        return memo[m]

    with torch.no_grad():
        try:
            return ev(n)
        except Exception:
            return None



def _lm_head(g: _Graph) -> fx.Node | None:
    """The projection whose value leaves the graph (through shape ops, scalings, tanh soft-capping)."""
    for o in g.output.all_input_nodes:
        src = o
        while src not in g.linears and (op_name(src) in SHAPE | {"aten.tanh"} or _is_scalar_scale(src)):
            src = src.args[0]
        if src in g.linears:
            return src
    return None


def _same_tensor(gm: fx.GraphModule, a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    try:
        ta, tb = _attr(gm, a), _attr(gm, b)
    except AttributeError:
        return False
    return ta.shape == tb.shape and ta.data_ptr() == tb.data_ptr()


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    out = []
    for level in zip(*parts) if parts else []:
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


# -- recover -----------------------------------------------------------------------------------------
def is_causal_lm(program) -> bool:
    """A causal LM by its contract: task "causal-lm", or an output named "logits" (what the
    calibration loss scores as next-token prediction)."""
    return program.task == "causal-lm" or any(s.name == "logits" for s in program.outputs)


def attention_visibility(program) -> str:
    """Which keys the program's first attention core lets each query see, with every token valid:
    "causal" (no later position: a causal flag, or a mask hiding everything above the diagonal, a
    sliding window within that too), "partial" (some positions hidden, not that way), "full"
    (everything; also without attention or with one position). A mask is read on the program's
    example inputs: an SDPA mask (bool: False hides; additive float: below -1e3 hides) or an eager
    chain's probabilities (0 hides)."""
    from .runner import GraphRunner
    a = next((b.attention for b in program.info.blocks if b.attention is not None), None)
    if a is None:
        return "full"
    by_name = nodes_by_name(program.gm)
    core = by_name[a.core]
    if op_name(core) in SDPA:
        *_, watch, _, causal = sdpa_operands(core)
        if causal:
            return "causal"
    else:
        watch = by_name.get(a.softmax)
    if watch is None:
        return "full"
    feeds = program.example_inputs()
    args = [torch.from_numpy(s.check(feeds[s.name])) for s in program.inputs]
    v = GraphRunner(program.gm).run(args, record=[watch.name]).values[watch.name]
    hidden = ~v if v.dtype == torch.bool else (v == 0) if op_name(watch) in SOFTMAX else (v < -1e3)
    if v.shape[-1] < 2 or not bool(hidden.any()):
        return "full"
    upper = torch.ones(v.shape[-2:], dtype=torch.bool).triu(1)
    return "causal" if bool(hidden[..., upper].all()) else "partial"


def recover(gm: fx.GraphModule) -> ModelInfo:
    g = _Graph(gm)
    info = ModelInfo()
    info.embeddings = [_embedding(n, g) for n in g.nodes if op_name(n) == "aten.embedding" and n in g.live]
    token = next((e for e in info.embeddings if e.kind == "token"), None)
    head = _lm_head(g)

    attentions = [a for a in (_attention(c, g) for c in _cores(g)) if a is not None]
    used = {g.by_name[l.node] for a in attentions for l in (a.q, a.k, a.v, a.o, a.qkv) if l is not None}

    # residual adds; block i's input is the stream operand of its attention's residual add
    inputs = []
    for a in attentions:
        if a.o is not None:
            add, a.out_norm = _residual_add(g.by_name[a.o.node], ancestors(g.by_name[a.input]), g)
            a.residual_add = add.name if add is not None else None
        x = _other_operand(g.by_name[a.residual_add], g.by_name[a.o.node]) if a.residual_add else g.by_name[a.input]
        inputs.append(stream_source(x))

    # MLPs: projections between this block's input and the next one's that no attention uses; the
    # first after an attention is its block's, further ones (and any before the first attention)
    # are MLP-only blocks
    def mlps_in(region):
        cands = sorted((l for l in g.linears - used if l in region and l is not head), key=g.order.get)
        found = _mlp_chain(cands, g)
        used.update(g.by_name[l.node] for m in found for l in (m.gate, m.up, m.gate_up, m.down) if l is not None)
        return found

    parts = []  # (attention, mlp, block input) in stream order
    if attentions:
        parts += [(None, m, _mlp_stream_input(m, g)) for m in mlps_in(ancestors(inputs[0]))]
    for i, a in enumerate(attentions):
        # not the input itself: a projection can make the stream (ELECTRA's embeddings_project)
        region = descendants(inputs[i]) - {inputs[i]} - (descendants(inputs[i + 1]) if i + 1 < len(inputs) else set())
        found = mlps_in(region)
        parts.append((a, found[0] if found else None, inputs[i]))
        parts += [(None, m, _mlp_stream_input(m, g)) for m in found[1:]]
    for i, (a, mlp, x) in enumerate(parts):
        paths = [l.module for l in (a and (a.q or a.qkv), a and a.o, mlp and (mlp.up or mlp.gate_up), mlp and mlp.down)
                 if l]
        name = _common_prefix(paths)
        if a is None or mlp is None:  # one sub-block's path: the block's ends at the layer index
            levels = name.split(".")
            numbered = [j for j, part in enumerate(levels) if part.isdigit()]
            name = ".".join(levels[:numbered[-1] + 1]) if numbered else name
        info.blocks.append(Block(i, name or f"block{i}", a, mlp, x.name, ""))
    _norms_and_outputs(info, g, [x for _, _, x in parts])

    if head is not None and head not in used and (token is None or _shape(head)[-1] == token.num_embeddings):
        info.lm_head = _linear(head)
        info.lm_head_tied = token is not None and _same_tensor(gm, info.lm_head.weight, token.weight)
    if attentions:
        a0 = attentions[0]
        info.num_heads, info.num_kv_heads, info.head_dim = a0.num_heads, a0.num_kv_heads, a0.head_dim
        info.hidden_size = (a0.q or a0.qkv).in_features
    elif token is not None:
        info.hidden_size = token.dim
    info.vocab_size = token.num_embeddings if token else (info.lm_head.out_features if info.lm_head else None)
    return info


def _norms_and_outputs(info: ModelInfo, g: _Graph, inputs: list[fx.Node]):
    """Norm placement, each sub-block's norm, block outputs and the final norm."""
    if not info.blocks:
        return
    # post-norm when the MLP's residual operand is a norm of the attention's residual sum (read in
    # the first block that has both)
    b0 = next((b for b in info.blocks if b.attention and b.mlp), None)
    a0, m0 = (b0.attention, b0.mlp) if b0 else (None, None)
    post = False
    if b0 is not None and a0.residual_add and m0.residual_add != a0.residual_add:
        norm = g.norm_before(_other_operand(g.by_name[m0.residual_add], g.by_name[m0.down.node]))
        post = norm is not None and norm.input == a0.residual_add
    first = next(b.attention or b.mlp for b in info.blocks)
    pre = g.norm_before(g.by_name[first.input]) is not None
    info.norm_placement = "post" if post else ("pre" if pre else "none")
    info.parallel_residual = bool(b0 and m0.residual_add == a0.residual_add)

    for i, b in enumerate(info.blocks):
        a, m = b.attention, b.mlp
        last = g.by_name[(m.residual_add if m else None) or a.residual_add or a.core]
        if post:
            if a is not None:
                a.norm = g.norm_after(g.by_name[a.residual_add]) if a.residual_add else None
            if m is not None:
                m.norm = g.norm_after(last)
        else:
            if a is not None:
                a.norm = g.norm_before(g.by_name[a.input])
            if m is not None:
                m.norm = g.norm_before(g.by_name[m.input])
        if i + 1 < len(info.blocks):
            b.output = inputs[i + 1].name
        elif post and m is not None and m.norm is not None:
            b.output = m.norm.node
        else:
            b.output = stream_source(last).name
    if not post:
        info.final_norm = g.norm_after(g.by_name[info.blocks[-1].output])


# -- describe ----------------------------------------------------------------------------------------
def _describe(info: ModelInfo) -> str:
    if not info.blocks:
        return "no transformer blocks recognised (no attention core with q/k/v projections found)"

    def lin(role, l):
        if l is None:
            return []
        extra = ("  +bias" if l.bias else "") + ("" if l.op == "aten.linear" else f"  ({l.op})")
        return [f"    {role:<7} {l.weight or l.node:<58} {l.in_features:>6} -> {l.out_features:<6}{extra}"]

    def norm(role, n):
        return [f"    {role:<7} {n.weight or n.node:<58} {n.kind}"] if n else []

    def slices(s):
        return ["            " + ", ".join(f"{p} {r}" for p, r in s.items())] if s else []

    heads = f"{info.num_heads} heads" + (f" over {info.num_kv_heads} kv heads" if info.num_kv_heads != info.num_heads else "")
    lines = [f"{len(info.blocks)} blocks, hidden {info.hidden_size}, {heads}, head_dim {info.head_dim}, "
             f"vocab {info.vocab_size}, {info.norm_placement}-norm" + (", parallel residual" if info.parallel_residual else "")]
    for e in info.embeddings:
        lines.append(f"embedding {e.kind:<9} {e.weight or e.node:<48} [{e.num_embeddings}, {e.dim}]")
    for b in info.blocks:
        a, m = b.attention, b.mlp
        lines.append(f"block {b.index}  {b.name}   (input {b.input}, output {b.output})")
        if a is None:
            lines.append("  attention: none")
        else:
            lines.append(f"  attention ({a.kind}{', fused qkv' if a.qkv else ''})  heads {a.num_heads}, kv heads "
                         f"{a.num_kv_heads}, head_dim {a.head_dim}   residual add {a.residual_add}")
            lines += norm("norm", a.norm) + lin("qkv", a.qkv) + slices(a.qkv_slices)
            for role in "qkvo":
                lines += lin(role, getattr(a, role))
            lines += norm("outnorm", a.out_norm)
        if m is None:
            lines.append("  mlp: none")
            continue
        gated = ", gated" if m.gate or m.gate_up else ""
        lines.append(f"  mlp ({m.act or 'unknown activation'}{gated})   residual add {m.residual_add}")
        lines += norm("norm", m.norm) + lin("gate_up", m.gate_up) + slices(m.gate_up_slices)
        for role in ("gate", "up", "down"):
            lines += lin(role, getattr(m, role))
        lines += norm("outnorm", m.out_norm)
    if info.final_norm:
        lines.append(f"final norm  {info.final_norm.weight or info.final_norm.node}  {info.final_norm.kind}")
    if info.lm_head:
        h = info.lm_head
        lines.append(f"lm head     {h.weight or h.node}  {h.in_features} -> {h.out_features}"
                     + ("  (tied to the token embedding)" if info.lm_head_tied else ""))
    return "\n".join(lines)
