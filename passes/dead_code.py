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

The clean-up itself is tcc.ir.graph.remove_dead, which the pass manager runs after every pass that
changed the program.
"""
from __future__ import annotations


from tcc.ir.graph import remove_dead, resolve
from tcc.pipeline import Pass, PassContext, register
from tcc.ir.program import Program


@register
class DeadCode(Pass):
    """Remove unused side-effect-free nodes, then parameters/buffers no node reads."""

    name = "dce"
    kind = "cleanup"
    options = {}
    reads_bf16_weights = True

    def run(self, program: Program, ctx: PassContext) -> bool:
        bytes_before = program.param_bytes()
        nodes, attributes = remove_dead(program.gm)
        ctx.note(removed_nodes=nodes, removed_attributes=attributes,
                 bytes_freed=bytes_before - program.param_bytes())
        return bool(nodes or attributes)  # the manager recovers ModelInfo

    def ensures(self, program: Program) -> None:
        gm = program.gm
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                resolve(gm, n.target)  # raises AttributeError if we deleted something still read
