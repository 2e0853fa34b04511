"""`quantize-weights`: int8 weights, per output channel, for the linear layers.

Contract: every `aten.linear` / `tcc::dense` node whose weight is a float `get_attr` tensor of
shape [N, K] with at least `min_size` elements, whose module path matches no `skip` glob, and whose
weight no other kind of node reads (a tied embedding table stays fp32, so quantizing its lm_head
would only add bytes), becomes

    tcc::dense_w8(x, weight_int8, weight_scale, bias)

with symmetric per-output-channel quantization: scale[n] = max_k |W[n,k]| / 127 (1 for an all-zero
row), weight_int8 = round(W / scale) in [-127, 127]. The int8 and float32 scale buffers live next to
the old weight (`<module>.weight_int8`, `<module>.weight_scale`), and the float weight is deleted,
so those layers take ~0.25x the bytes. Outputs change by the rounding only: each weight moves by at
most scale/2, i.e. 0.4% of its row's largest magnitude.

Options and defaults: bits=8 (the only width supported so far); min_size=4096, which leaves tiny
layers (classifier heads, adapters) alone, where int8 saves little and costs accuracy; skip=[] -
lm_head is quantized too when it has its own weight (int8 per-channel moves logits by well under
1% of their range), pass `skip=[lm_head]` to keep it fp32. A glob matches a module path
(from node.meta["nn_module_stack"], else the weight's attribute path) or any dotted suffix of it, so
`lm_head` matches `model.lm_head` and `layers.0.*` matches `model.layers.0.mlp.up_proj`.

Notes the quantized layers (module, weight, shape) and the skipped ones with the reason.
"""
from __future__ import annotations

import fnmatch
import re

import torch

from tcc.errors import InternalError
from tcc.pipeline import Option, Pass, PassContext, register, set_val
from tcc.program import Program

from .dead_code import remove_dead

DENSE = (torch.ops.aten.linear.default, torch.ops.tcc.dense.default)
DENSE_W8 = torch.ops.tcc.dense_w8.default


@register
class QuantizeWeights(Pass):
    """Linear weights to symmetric per-output-channel int8 (tcc::dense_w8); fp32 weights deleted."""

    name = "quantize-weights"
    kind = "transform"
    options = {
        "bits": Option(int, 8, "weight bit width (only 8 is supported so far)", choices=(8,)),
        "min_size": Option(int, 4096, "quantize weights with at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs to keep in float, e.g. [lm_head,*.classifier]"),
    }

    def run(self, program: Program, ctx: PassContext) -> Program:
        gm = program.gm
        layers, skipped = _match(gm, self.min_size, self.skip)
        quantized = [_rewrite(gm, target, nodes) for target, nodes in layers.items()]
        removed_nodes, removed_attrs = remove_dead(gm) if layers else ([], [])
        ctx.note(quantized=quantized, skipped=skipped, removed_attributes=removed_attrs)
        if layers:
            ctx.refresh_info(program)
        return program

    def ensures(self, program: Program) -> None:
        layers, _ = _match(program.gm, self.min_size, self.skip)
        if layers:
            raise InternalError(f"quantize-weights left float weights it should have quantized: {sorted(layers)}")


# -- match ----------------------------------------------------------------------------------------

def _match(gm: torch.fx.GraphModule, min_size: int, skip: list[str]) -> tuple[dict[str, list], list[dict]]:
    """{weight attribute path: [dense nodes using it]} to quantize, and [{module, reason}] skipped."""
    candidates: dict[str, list[torch.fx.Node]] = {}
    skipped: list[dict] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in DENSE:
            continue
        w = n.args[1] if len(n.args) > 1 else None
        path = module_path(n)
        if not isinstance(w, torch.fx.Node) or w.op != "get_attr":
            skipped.append({"module": path, "node": n.name, "reason": "weight is computed, not a stored tensor"})
            continue
        t = _attr(gm, w.target)
        reason = None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            reason = "weight is not a 2-D float tensor"
        elif t.numel() < min_size:
            reason = f"{t.numel()} weights < min_size={min_size}"
        elif any(_glob_matches(g, path) for g in skip):
            reason = "matches skip"
        if reason:
            skipped.append({"module": path, "node": n.name, "reason": reason})
        else:
            candidates.setdefault(w.target, []).append(n)

    readers: dict[str, set[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in candidates:
            readers.setdefault(n.target, set()).update(n.users)
    layers = {}
    for target, nodes in candidates.items():
        others = [u.name for u in readers[target] if u not in nodes or u.args[1].target != target]
        if others:
            skipped += [{"module": module_path(n), "node": n.name, "reason": f"weight '{target}' is also read by {others}"}
                        for n in nodes]
        else:
            layers[target] = nodes
    return layers, skipped


def module_path(node: torch.fx.Node) -> str:
    """The module a node was traced in ('model.layers.0.mlp.up_proj'), else its weight's owner path."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['self'\]\.?", "", path)
        return re.sub(r"\[(\d+)\]", r".\1", path).replace("['", ".").replace("']", "").strip(".")
    w = node.args[1] if len(node.args) > 1 else None
    return w.target.rpartition(".")[0] if isinstance(w, torch.fx.Node) and w.op == "get_attr" else ""


def _glob_matches(glob: str, path: str) -> bool:
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), glob) for i in range(len(parts)))


# -- rewrite --------------------------------------------------------------------------------------

def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (row): (qweight int8 [N, K], scale float32 [N])."""
    w = w.detach().to(torch.float32)
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _rewrite(gm: torch.fx.GraphModule, target: str, nodes: list[torch.fx.Node]) -> dict:
    weight = _attr(gm, target)
    q, scale = quantize_per_channel(weight)
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    q_name, s_name = _free_name(owner, f"{attr}_int8"), _free_name(owner, f"{attr}_scale")
    owner.register_buffer(q_name, q)
    owner.register_buffer(s_name, scale)
    prefix = owner_path + "." if owner_path else ""
    modules = sorted({module_path(n) for n in nodes})
    for n in nodes:
        x = n.args[0]
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias", n.kwargs.get("b"))
        with gm.graph.inserting_before(n):
            q_node = gm.graph.get_attr(prefix + q_name)
            s_node = gm.graph.get_attr(prefix + s_name)
            new = gm.graph.call_function(DENSE_W8, (x, q_node, s_node, bias))
        set_val(gm, q_node, q)
        set_val(gm, s_node, scale)
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    return {"weight": target, "modules": modules, "shape": list(weight.shape),
            "bytes_before": weight.numel() * weight.element_size(), "bytes_after": q.numel() + scale.numel() * 4}


def _free_name(module: torch.nn.Module, name: str) -> str:
    while hasattr(module, name):
        name += "_"
    return name


def _attr(gm, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj
