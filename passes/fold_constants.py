"""`fold-constants`: compute constant subgraphs once, at compile time.

Contract: outputs are unchanged (a cleanup pass). A node is constant when it is a `get_attr` of a
tensor, or a pure, deterministic `call_function` whose inputs are all constant (so factory ops
like `arange` with no inputs count; anything reading a user input does not). Each constant node
that a non-constant node (or the output) uses is evaluated and replaced by a new buffer
`_folded_<node>` read with `get_attr`; the subgraph behind it, and the parameters only it read,
are then removed (see `dce`). Folding is skipped where it would store a tensor larger than the
constants it is computed from by more than `size_limit` elements (an `expand` of a bias to
[batch, seq, hidden], say): the inputs of such a node are folded instead, and the node stays.
Checks on constants that `torch.export` leaves (`_assert_tensor_metadata`...) run once here and
are removed.

Notes each folded node (new buffer, shape, which attributes it was computed from), each skipped one
with the reason, the checks it ran, and what the clean-up removed.

torch.fx.experimental.const_fold does not fit these graphs: on a `torch.export` module it drops the
output pytree (outputs come back as tuples), bundles all folded tensors into one attribute, and has
no size limit.
"""
from __future__ import annotations

import math

import torch
from torch.fx.node import map_arg

from tcc.errors import InternalError
from tcc.ir.graph import new_attribute
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program, attribute as _attr



@register
class FoldConstants(Pass):
    """Replace subgraphs that read only constants with precomputed buffers."""

    name = "fold-constants"
    kind = "cleanup"
    options = {
        "size_limit": Option(int, 65536, "largest folded tensor (elements) allowed to be bigger than the constants it comes from",
                             validator=lambda v: None if v >= 0 else "must be >= 0"),
    }

    def run(self, program: Program, ctx: PassContext) -> bool:
        gm = program.gm
        values = _constant_values(gm)
        roots, skipped = _roots(gm, values, self.size_limit)
        folded = [_fold(gm, node, values) for node in roots]
        checks = [n for n in values if n.target in CHECKS]
        checked = [n.name for n in checks]
        for n in checks:
            gm.graph.erase_node(n)
        ctx.note(folded=folded, skipped=skipped, checked=checked, removed_nodes=[], removed_attributes=[])
        return bool(roots or checked)  # the manager removes what is dead now (noted) and recovers ModelInfo

    def ensures(self, program: Program) -> None:
        values = _constant_values(program.gm)
        left, _ = _roots(program.gm, values, self.size_limit)
        if left:
            raise InternalError(f"fold-constants left foldable nodes: {[n.name for n in left]}")


# -- match ----------------------------------------------------------------------------------------

def _constant_values(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, object]:
    """Every constant node's value, in graph order."""
    values: dict[torch.fx.Node, object] = {}
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                value = _attr(gm, n.target)
                if isinstance(value, torch.Tensor):
                    values[n] = value
            elif n.op == "call_function" and (_pure(n) or n.target in CHECKS) and all(a in values for a in n.all_input_nodes):
                args, kwargs = map_arg((n.args, n.kwargs), lambda a: values[a])
                try:
                    values[n] = n.target(*args, **kwargs)
                except Exception:
                    continue  # cannot evaluate here: leave it to run time
    return values


CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_async.msg,
          torch.ops.aten._assert_scalar.default}  # side effect = raising; on constants, checked here once


def _pure(n: torch.fx.Node) -> bool:
    tags = getattr(n.target, "tags", ())
    return not n.is_impure() and torch.Tag.nondeterministic_seeded not in tags


def _roots(gm, values: dict, size_limit: int) -> tuple[list[torch.fx.Node], list[dict]]:
    """Constant call_function nodes a run-time node uses, minus the ones too large to store."""
    constant = {n for n in values if n.op == "call_function"}
    skipped: list[dict] = []
    while True:
        roots = [n for n in gm.graph.nodes if n in constant and any(u not in constant for u in n.users)]
        bad = []
        for n in roots:
            reason = _why_not(n, values, size_limit)
            if reason:
                bad.append(n)
                skipped.append({"node": n.name, "reason": reason})
        if not bad:
            return roots, skipped
        constant.difference_update(bad)  # their constant inputs become roots on the next round


def _why_not(n: torch.fx.Node, values: dict, size_limit: int) -> str | None:
    value = values[n]
    if not isinstance(value, torch.Tensor):
        return f"gives {type(value).__name__}, not a tensor"
    sources = sum(values[a].numel() for a in _attr_sources(n, values))
    if value.numel() > max(sources, size_limit):
        return f"would store {value.numel()} elements computed from {sources} (size_limit={size_limit})"
    return None


def _attr_sources(n: torch.fx.Node, values: dict) -> list[torch.fx.Node]:
    seen, stack, found = set(), [n], []
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "get_attr":
            found.append(m)
        stack.extend(a for a in m.all_input_nodes if a in values)
    return found


# -- rewrite --------------------------------------------------------------------------------------

def _fold(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict) -> dict:
    tensor = values[node].detach().clone(memory_format=torch.contiguous_format)
    new = new_attribute(gm, f"_folded_{node.name}", tensor, node)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(new)
    return {"node": node.name, "into": new.target, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
            "from": sorted(a.target for a in _attr_sources(node, values)), "elements": math.prod(tensor.shape)}

