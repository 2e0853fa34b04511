"""`dce`: remove dead nodes, then the parameters and buffers nothing reads any more.

Contract: outputs are unchanged (a cleanup pass). A node is dead when nothing uses its result and it
has no side effects (torch.fx `Node.is_impure`: placeholders, outputs, mutating or random ops, the
`_guards_fn` input check of `torch.export` stay). An attribute (parameter, buffer or plain tensor)
is unused when no `get_attr` node reads it and no `call_module` node runs a module that owns it;
submodules left without anything in use are deleted too. Notes the removed node names, attribute
names and bytes freed.

`remove_dead(gm)` is the same clean-up for other passes to call after a rewrite.
"""
from __future__ import annotations

import torch

from tcc.pipeline import Pass, PassContext, register
from tcc.program import Program


@register
class DeadCode(Pass):
    """Remove unused side-effect-free nodes, then parameters/buffers no node reads."""

    name = "dce"
    kind = "cleanup"
    options = {}

    def run(self, program: Program, ctx: PassContext) -> Program:
        bytes_before = program.param_bytes()
        nodes, attributes = remove_dead(program.gm)
        ctx.note(removed_nodes=nodes, removed_attributes=attributes,
                 bytes_freed=bytes_before - program.param_bytes())
        if nodes or attributes:
            ctx.refresh_info(program)
        return program

    def ensures(self, program: Program) -> None:
        gm = program.gm
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                _resolve(gm, n.target)  # raises AttributeError if we deleted something still read


def remove_dead(gm: torch.fx.GraphModule) -> tuple[list[str], list[str]]:
    """Dead nodes, then unread attributes and empty submodules; returns (node names, attribute paths)."""
    names_before = [n.name for n in gm.graph.nodes]
    gm.graph.eliminate_dead_code()
    alive = {n.name for n in gm.graph.nodes}
    removed_nodes = [name for name in names_before if name not in alive]
    removed_attrs = _remove_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return removed_nodes, removed_attrs


# -- match ----------------------------------------------------------------------------------------

def _unused_attributes(gm: torch.fx.GraphModule) -> list[str]:
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules_run = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def used(path: str) -> bool:
        if path in read:
            return True
        prefixes = [path.rsplit(".", i)[0] for i in range(1, path.count(".") + 1)]
        return any(p in modules_run or p in read for p in prefixes)

    return [path for path in _tensor_attributes(gm) if not used(path)]


def _tensor_attributes(gm: torch.fx.GraphModule) -> list[str]:
    """Paths of every parameter, buffer and plain tensor attribute, aliases included."""
    paths = []
    for mod_path, mod in gm.named_modules(remove_duplicate=False):
        if isinstance(mod, torch.fx.GraphModule) and mod is not gm:
            continue  # a nested graph (e.g. _guards_fn) manages its own attributes
        prefix = mod_path + "." if mod_path else ""
        names = list(mod._parameters) + list(mod._buffers)
        names += [k for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        paths += [prefix + k for k in names if getattr(mod, k, None) is not None]
    return list(dict.fromkeys(paths))


# -- rewrite --------------------------------------------------------------------------------------

def _remove_unused_attributes(gm: torch.fx.GraphModule) -> list[str]:
    removed = _unused_attributes(gm)
    for path in removed:
        owner_path, _, attr = path.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, attr)
    return removed


# -- verify ---------------------------------------------------------------------------------------

def _resolve(gm: torch.nn.Module, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
