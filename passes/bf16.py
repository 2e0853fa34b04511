"""`bf16`: linear weights and embedding tables stored as bfloat16, computed in float32.

Contract: every `aten.linear` / `tcc::dense` node whose weight is a float32 `get_attr` tensor
[N, K], and (with embeddings=true, the default) every `aten.embedding` whose table is one, becomes

    tcc::dense_bf16(x, weight_bf16, bias)        tcc::embedding_bf16(ids, table_bf16)

when no other kind of node reads that tensor and its module path matches no `skip` glob. A table
shared by the embedding and a tied LM head becomes one bf16 tensor both read. The weight is
rounded to bfloat16 (round to nearest even, torch's `.to(torch.bfloat16)`) into a buffer
`<module>.weight_bf16` beside it and the float32 weight is deleted: those tensors take half the
bytes. Each float32 weight's pages are handed back (tcc.memory.page_out) as soon as its bf16 copy
exists, so a checkpoint mapped from its file is not held twice. Biases, norms and every other
tensor stay float32; activations, outputs and the sums stay float32 (tcc/ir/ops.py defines the
numerics; backends/kernels/bf16_kernels.cc runs them). On a checkpoint saved in bf16 the rounding
is exact: the weights are the checkpoint's own. Elsewhere each weight moves by at most 2^-9 of its
magnitude (bf16 keeps 8 significant bits).

`tcc compile --dtype bf16` appends this pass to the pipeline, and so does the default for a
checkpoint whose weights are stored in bf16 (tcc.compiler); passes before it (quantize) see the
float32 weights, so the layers they leave in float become bf16.

Options: embeddings=true (tables too), skip=[] (module-path globs kept float32, as in quantize).
Notes each converted weight (modules, shape, bytes before/after) and the ones skipped with why.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tcc.errors import InternalError
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program, attribute as _attr
from tcc.compress.quantization import glob_matches
from tcc.memory import page_out

from tcc.ir.graph import linear_bias, module_path, register_tensors as _register, replace_node as _replace

aten, tcc_ops = torch.ops.aten, torch.ops.tcc
DENSE = (aten.linear.default, tcc_ops.dense.default)
EMBEDDING = aten.embedding.default


def _weight_of(n: fx.Node):
    """The node holding the weight/table n reads in the slot bf16 converts, else None."""
    if n.op != "call_function":
        return None
    if n.target in DENSE and len(n.args) > 1:
        return n.args[1]
    if n.target is EMBEDDING:
        return n.args[0]
    return None


def _only_as_weight(u: fx.Node, g: fx.Node) -> bool:
    """u reads the tensor of get_attr g as its weight (table) and nowhere else."""
    others = (u.args[1:] if u.target is EMBEDDING else u.args[:1] + u.args[2:]) + tuple(u.kwargs.values())
    return _weight_of(u) is g and g not in others


def match(program: Program, opts: "Bf16") -> tuple[dict[str, list[fx.Node]], list[dict]]:
    """{weight target: the dense/embedding nodes reading it} to convert, and the skipped weights."""
    gm = program.gm
    found: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        w = _weight_of(n)
        if isinstance(w, fx.Node) and w.op == "get_attr":
            found.setdefault(w.target, []).append(n)
    chosen, skipped = {}, []
    for target, nodes in found.items():
        t = _attr(gm, target)
        getters = [g for g in gm.graph.nodes if g.op == "get_attr" and g.target == target]
        readers = [u for g in getters for u in g.users]
        paths = sorted({module_path(n) for n in nodes})
        reason = None
        if t.dtype != torch.float32 or t.dim() != 2:
            reason = f"{t.dtype} [{', '.join(map(str, t.shape))}], not a float32 matrix"
        elif not all(_only_as_weight(u, g) for g in getters for u in g.users):
            reason = "read by other ops too"
        elif isinstance(program.annotations.get(target), dict) and "sparsity" in program.annotations[target]:
            reason = "sparse (annotated): kept float32 for its sparse storage"
        elif not opts.embeddings and any(u.target is EMBEDDING for u in readers):
            reason = "an embedding table (embeddings=false)"
        elif any(glob_matches(g, p) for g in opts.skip for p in paths):
            reason = "matches skip"
        if reason:
            skipped.append({"weight": target, "modules": paths, "reason": reason})
        else:
            chosen[target] = readers
    return chosen, skipped


def rewrite(gm: fx.GraphModule, chosen: dict[str, list[fx.Node]]) -> list[dict]:
    notes = []
    for target, nodes in chosen.items():
        w = _attr(gm, target)
        names = _register(gm, target, {"bf16": w.detach().to(torch.bfloat16)})
        # a weight mapped from the checkpoint file: its pages leave RSS now that its bf16 copy exists
        # (the mapping lives as long as any tensor of the file does: without this the float32 weights
        # stay resident beside their bf16 copies until the end of the compile; issue 15)
        page_out([w])
        for n in nodes:
            if n.target is EMBEDDING:
                _replace(gm, n, tcc_ops.embedding_bf16.default, lambda get, n=n: (n.args[1], get("bf16")), names)
            else:
                b = linear_bias(n)
                _replace(gm, n, tcc_ops.dense_bf16.default, lambda get, n=n, b=b: (n.args[0], get("bf16"), b), names)
        notes.append({"weight": target, "modules": sorted({module_path(n) for n in nodes}), "shape": list(w.shape),
                      "format": "bf16", "bytes_before": w.numel() * w.element_size(), "bytes_after": w.numel() * 2})
    return notes


def verify(gm: fx.GraphModule) -> None:
    """Every bf16 op reads a stored bfloat16 matrix."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (tcc_ops.dense_bf16.default, tcc_ops.embedding_bf16.default):
            w = n.args[1]
            t = _attr(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
            if t is None or t.dtype != torch.bfloat16 or t.dim() != 2:
                raise InternalError(f"bf16: node {n.name} must read a stored bfloat16 [N, K] tensor")


@register
class Bf16(Pass):
    """Linear weights and embedding tables to bfloat16 (tcc::dense_bf16, tcc::embedding_bf16); fp32 math."""

    name = "bf16"
    kind = "transform"
    writes_weights = False  # new bf16 tensors replace the float32 ones
    reads_bf16_weights = True  # a bf16 checkpoint's own tensors (tcc.frontends.frontend) are left as they are
    options = {
        "embeddings": Option(bool, True, "embedding tables (and a tied LM head) in bf16 too"),
        "skip": Option(list[str], [], "module-path globs to keep in float32, e.g. [lm_head]"),
    }

    def run(self, program: Program, ctx: PassContext) -> bool:
        chosen, skipped = match(program, self)
        notes = rewrite(program.gm, chosen)
        ctx.note(options=dict(self.opts), converted=notes, skipped=skipped, removed_attributes=[])
        return bool(chosen)  # the manager removes the float32 tensors (noted) and recovers ModelInfo

    def ensures(self, program: Program) -> None:
        verify(program.gm)
        left, _ = match(program, self)
        if left:
            raise InternalError(f"bf16 left float32 weights it should have converted: {sorted(left)}")
