"""Graph helpers every layer uses (passes, backends, the compression libraries), written once.

nodes(gm, op, where)      the matcher: call_function nodes of an op ("aten.div") where a predicate holds
op_name(node)             "aten.linear", "tcc.dense_w8": a node's op without its overload
module_path(node)         "model.layers.0.mlp.up_proj": the module a node was traced in
linear_bias(node)         the bias operand of aten.linear / tcc::dense* (its position from tcc.ir.ops.OPERANDS)
sdpa_operands(node)       q, k, v, mask, scale, causal of an SDPA node (aten or tcc::sdpa)
remove_dead(gm)           dead nodes, then attributes nothing reads and empty submodules (the
                          clean-up the pass manager runs after every pass that changed the program;
                          passes/dead_code.py is the same as a pass, `dce`)
mutates(node)             whether a node writes into its first argument (an in-place op)
free_name(module, name)   `name`, or name_, name__ ... : an attribute name the module does not have
new_attribute(gm, name, tensor, before, owner="", parameter=False)
                          `tensor` registered under a free name on submodule `owner`, read by a new
                          get_attr node (with meta['val']) inserted before `before`
register_tensors(gm, target, {suffix: tensor})
                          buffers `<attr>_<suffix>` next to the attribute at `target`; {suffix: path}
replace_node(gm, node, op, make_args, names)
                          node -> op(*make_args(get)), get(suffix) a new get_attr of names[suffix]
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx


def op_name(n) -> str:
    """"aten.linear", "tcc.dense_w8", "getitem" ... : a call_function node's op without its overload;
    the node kind ("placeholder", "get_attr", "output") for other nodes, "" for what is not a node."""
    if not isinstance(n, fx.Node):
        return ""
    if n.op != "call_function":
        return n.op
    t = n.target
    if t is operator.getitem:
        return "getitem"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    return getattr(t, "__name__", str(t))


def readers(n: fx.Node) -> list[fx.Node]:
    """n's users that read its value: torch.export's assertion nodes (aten._assert_tensor_metadata and
    the like, which only check it) left out."""
    return [u for u in n.users if not op_name(u).startswith("aten._assert")]


def module_path(node: fx.Node, fallback: bool = True) -> str:
    """The module a node was traced in ('model.layers.0.mlp.up_proj': the innermost entry of
    meta["nn_module_stack"], without torch.export's L['self'] and with indices as dotted parts), else
    with `fallback` its weight's owner path (a linear's args[1], an embedding's args[0]: graphs
    without module stacks), else ""."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['self'\]\.?", "", path)
        return re.sub(r"\[(\d+)\]", r".\1", path).replace("['", ".").replace("']", "").strip(".")
    if not fallback:
        return ""
    w = node.args[1] if len(node.args) > 1 else None
    if node.target is torch.ops.aten.embedding.default:
        w = node.args[0]
    return w.target.rpartition(".")[0] if isinstance(w, fx.Node) and w.op == "get_attr" else ""


def _bias_positions() -> dict[str, int]:
    from .ops import OPERANDS
    return {"aten.linear": 2, **{f"tcc.{op}": i for op, spec in OPERANDS.items() for i, (name, *_) in spec.items()
                                 if name == "b"}}


BIAS_AT = _bias_positions()  # {"aten.linear": 2, "tcc.dense": 2, "tcc.dense_w8": 3, "tcc.dense_w4": 5, ...}


def linear_bias(n: fx.Node):
    """The bias operand of a linear node (aten.linear, a tcc::dense* op): args[BIAS_AT[op]], else the
    keyword "bias" / "b"; None when it has none."""
    at = BIAS_AT[op_name(n)]
    return n.args[at] if len(n.args) > at else n.kwargs.get("bias", n.kwargs.get("b"))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_operands(n: fx.Node) -> tuple:
    """(q, k, v, mask or None, scale, causal) of an SDPA node: aten.scaled_dot_product_attention
    (positional or keyword) or tcc::sdpa(q, k, v, mask, scale, causal). A scale left out is SDPA's
    1/sqrt(head dim) (None when q has no meta['val'])."""
    if op_name(n) == "tcc.sdpa":
        q, k, v, mask, scale, causal = n.args
    else:
        a = {**dict(zip(_SDPA_ARGS, n.args)), **n.kwargs}
        q, k, v, mask, scale, causal = (a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("scale"),
                                        a.get("is_causal", False))
    val = q.meta.get("val") if isinstance(q, fx.Node) else None
    if scale is None and val is not None:
        scale = float(val.shape[-1]) ** -0.5
    return q, k, v, mask, scale, bool(causal)


def nodes(gm: fx.GraphModule, op: str, where=None) -> list[fx.Node]:
    """The matcher: call_function nodes of `op` ("aten.div", "tcc.dense"...) for which `where(node)`
    holds (all of them without `where`), in graph order; a list, so the caller may rewrite them."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n) == op and (where is None or where(n))]


def free_name(module: torch.nn.Module, name: str) -> str:
    """`name`, or it with underscores appended until `module` has no attribute of that name."""
    while hasattr(module, name):
        name += "_"
    return name


def new_attribute(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node, owner: str = "",
                  parameter: bool = False) -> fx.Node:
    """`tensor` registered on the submodule at path `owner` (the graph module itself for "") under
    `name` or a free variant of it (a Parameter without grad when `parameter`, else a buffer), and a
    get_attr node of it inserted before `before`, with a meta['val'] when the graph has them."""
    module = gm.get_submodule(owner) if owner else gm
    name = free_name(module, name)
    if parameter:
        module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        module.register_buffer(name, tensor)
    target = f"{owner}.{name}" if owner else name
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    set_val(gm, node, getattr(module, name))
    return node


def register_tensors(gm: fx.GraphModule, target: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Buffers `<attr>_<suffix>` next to the attribute at `target`; {suffix: attribute path}."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    out = {}
    for suffix, t in tensors.items():
        name = free_name(owner, f"{attr}_{suffix}")
        owner.register_buffer(name, t)
        out[suffix] = f"{owner_path}.{name}" if owner_path else name
    return out


def replace_node(gm: fx.GraphModule, n: fx.Node, op, make_args, names: dict[str, str]) -> fx.Node:
    """Swap node n for op(*make_args(get)), where get(suffix) is a new get_attr of names[suffix]
    (with a meta['val'] when the graph has them); returns the new node."""
    from .program import attribute
    with gm.graph.inserting_before(n):
        def get(suffix):
            node = gm.graph.get_attr(names[suffix])
            set_val(gm, node, attribute(gm, names[suffix]))
            return node
        new = gm.graph.call_function(op, make_args(get))
    new.meta.update(n.meta)
    n.replace_all_uses_with(new)
    gm.graph.erase_node(n)
    return new


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
    if mutates(n):  # in-place ops on parameters, buffers and inputs stay
        return (subject is not None and subject.op == "call_function"
                and all(u is n or u.target is _ASSERT for u in subject.users))
    return not n.is_impure(impure_random=False)


def mutates(n: torch.fx.Node) -> bool:
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

def resolve(gm: torch.nn.Module, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_val(gm: fx.GraphModule, node: fx.Node, tensor: torch.Tensor | None = None) -> None:
    """Give a new node a meta['val'] like torch.export's: a fake tensor of `tensor` (for get_attr
    nodes), else the node's target run on its inputs' fake values. No-op on graphs without vals."""
    from torch._subclasses.fake_tensor import FakeTensor
    some = next((n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), FakeTensor)), None)
    if some is None:
        return
    with some.fake_mode:
        if tensor is not None:
            node.meta["val"] = some.fake_mode.from_tensor(tensor, static_shapes=True)
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)
