"""`dce`: remove dead nodes, then the parameters and buffers nothing reads any more.

Contract: outputs are unchanged (a cleanup pass). A node is dead when nothing uses its result and
  - it has no side effects (torch.fx `Node.is_impure` with random ops counted as pure: attention
    cores with dropout_p, dropout - random only in name at inference - go; placeholders, outputs,
    asserts and the `_guards_fn` input check of `torch.export` stay), or
  - it is an assert (`aten._assert_tensor_metadata`) on a value (not a graph input) that only
    asserts read, or an in-place op on an intermediate value that nothing but it and asserts read.
Removal repeats until nothing more is dead, so a dead attention core takes its q/k/v projections
and their weights with it. An attribute (parameter, buffer or plain tensor)
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
    reads_bf16_weights = True

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
    removed_nodes, changed = [], True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if not n.users and _removable(n):
                removed_nodes.append(n.name)
                gm.graph.erase_node(n)
                changed = True
    removed_attrs = _remove_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return removed_nodes, removed_attrs


# -- match ----------------------------------------------------------------------------------------

_ASSERT = torch.ops.aten._assert_tensor_metadata.default


def _removable(n: torch.fx.Node) -> bool:
    """n (which nothing uses) can go: see the module docstring."""
    if n.op == "get_attr":
        return True
    if n.op == "call_module":
        return not n.is_impure()
    if n.op != "call_function":
        return False
    subject = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
    if n.target is _ASSERT:  # checks on graph inputs stay
        return subject is not None and subject.op != "placeholder" and all(u.target is _ASSERT for u in subject.users)
    if _mutates(n):  # in-place ops on parameters, buffers and inputs stay
        return (subject is not None and subject.op == "call_function"
                and all(u is n or u.target is _ASSERT for u in subject.users))
    return not n.is_impure(impure_random=False)


def _mutates(n: torch.fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema is not None and schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write)


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
