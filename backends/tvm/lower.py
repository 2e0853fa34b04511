"""Lowering a Program to a TVM Relax module whose dense ops call tcc's kernels.

Steps:
 0. `fuse_parallel_linears(gm)`: linears that read the same tensor (q/k/v, gate/up) become one
    wider linear whose output is split: one GEMM with N = sum of the widths instead of several
    narrow ones (narrow GEMMs waste the kernel's blocking; MiniLM's q/k/v are 384 wide each).
 1. `kernelize(gm)`: on a copy of the graph, route every dense op to a tcc custom op
    (aten.linear -> tcc::dense, aten.scaled_dot_product_attention -> tcc::sdpa with an additive
    float mask); ops already in tcc form (tcc::dense_w8 from quantize-weights) stay.
 2. `torch.export` the copy again and import it with `from_exported_program(keep_params_as_input=
    True, custom_convert_map=...)`: each tcc op becomes `R.call_dps_packed("tcc_...", ...)`, a call
    into backends/kernels (BLAS-backed); everything else (norms, activations, embeddings, rotary,
    reshapes) is legalised and fused by TVM's CPU pipeline.
 3. Parameters stay function inputs (not constants baked into the library): they are stored in
    the artifact's safetensors, so the library stays small and building it stays cheap.
"""
from __future__ import annotations

import copy
import operator

import torch

from tcc import ops  # noqa: F401  (registers torch.ops.tcc.*)
from tcc.errors import UserError
from tcc.program import Program

aten = torch.ops.aten
tcc_ops = torch.ops.tcc


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool "keep" mask -> additive float mask (0 keep, most negative float drop), as SDPA does."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.to(torch.float32)


def _attr(gm, node):
    return gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else gm.get_buffer(node.target)


def fuse_parallel_linears(gm: torch.fx.GraphModule) -> int:
    """In place: every group of >= 2 aten.linear nodes reading the same input, with stored weights of
    one dtype and all or none with biases, becomes one linear over the concatenated weights followed
    by a split of its output. Returns the number of groups fused."""
    from tcc.passes.dead_code import remove_dead

    g = gm.graph
    fused = 0
    for x in list(g.nodes):
        group = [u for u in x.users if u.op == "call_function" and u.target == aten.linear.default
                 and u.args[0] is x and isinstance(u.args[1], torch.fx.Node) and u.args[1].op == "get_attr"]
        biases = [(u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")) for u in group]
        if len(group) < 2 or len({b is None for b in biases}) != 1:
            continue
        if any(b is not None and (not isinstance(b, torch.fx.Node) or b.op != "get_attr") for b in biases):
            continue
        weights = [_attr(gm, u.args[1]) for u in group]
        if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
            continue
        sizes = [int(w.shape[0]) for w in weights]
        name = f"_tcc_fused_linear_{fused}"
        # parameters, not buffers: torch.export lifts new buffers of a GraphModule as constants,
        # which TVM would bake into the library instead of taking them as inputs
        gm.register_parameter(name + "_w", torch.nn.Parameter(torch.cat([w.detach() for w in weights], 0), requires_grad=False))
        if biases[0] is not None:
            gm.register_parameter(name + "_b", torch.nn.Parameter(torch.cat([_attr(gm, b).detach() for b in biases], 0), requires_grad=False))
        with g.inserting_after(x):
            w_node = g.get_attr(name + "_w")
        with g.inserting_after(w_node):
            b_node = g.get_attr(name + "_b") if biases[0] is not None else None
        with g.inserting_after(b_node if b_node is not None else w_node):
            lin = g.call_function(aten.linear.default, (x, w_node, b_node))
        with g.inserting_after(lin):
            parts = g.call_function(aten.split_with_sizes.default, (lin, sizes, -1))
        last = parts
        for i, u in enumerate(group):
            with g.inserting_after(last):
                item = g.call_function(operator.getitem, (parts, i))
            last = item
            u.replace_all_uses_with(item)
            g.erase_node(u)
        fused += 1
    if fused:
        remove_dead(gm)
    return fused


def _buffers_to_parameters(gm: torch.fx.GraphModule) -> None:
    """Buffers (int8 weights and their scales, folded constants) become parameters: TVM's importer
    keeps only parameters as function inputs and would bake buffers into the library as constants,
    while the artifact stores every tensor in weights.safetensors."""
    for name, buf in list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        del mod._buffers[leaf]
        mod._non_persistent_buffers_set.discard(leaf)
        mod.register_parameter(leaf, torch.nn.Parameter(buf.detach(), requires_grad=False))


def kernelize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` whose dense ops are tcc custom ops the TVM backend maps to kernels."""
    gm = copy.deepcopy(gm)
    _buffers_to_parameters(gm)
    fuse_parallel_linears(gm)
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default:
            x, w, *rest = n.args
            b = rest[0] if rest else n.kwargs.get("bias")
            with g.inserting_before(n):
                new = g.call_function(tcc_ops.dense.default, (x, w, b))
        elif n.target == aten.scaled_dot_product_attention.default:
            q, k, v, *rest = n.args
            kw = dict(n.kwargs)
            names = ["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            for name, val in zip(names, rest):
                kw[name] = val
            if kw.get("dropout_p", 0.0):
                raise UserError(f"node {n.name}: attention dropout p={kw['dropout_p']} in an inference graph",
                                "put the model in eval() mode before tracing")
            scale = kw.get("scale")
            if scale is None:
                scale = float(q.meta["val"].shape[-1]) ** -0.5
            mask = kw.get("attn_mask")
            with g.inserting_before(n):
                if mask is not None:
                    mask = g.call_function(_additive_mask, (mask,))
                new = g.call_function(tcc_ops.sdpa.default, (q, k, v, mask, float(scale), bool(kw.get("is_causal", False))))
        else:
            continue
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
    g.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# Relax import: tcc ops -> call_dps_packed
# ---------------------------------------------------------------------------------------------

def _out_sinfo(node):
    from tvm import relax
    val = node.meta["val"]
    return relax.TensorType([int(s) for s in val.shape], str(val.dtype).replace("torch.", ""))


def _arg(importer, a):
    return importer.env[a]


def _dense_converter(kernel: str, n_inputs: int):
    """tcc dense-family op -> call of `kernel` (`{kernel}_f32` with a bias, `{kernel}_nobias_f32` without);
    the op's first `n_inputs` arguments are tensors, an optional bias follows."""
    def convert(node, importer):
        from tvm import relax
        args = list(node.args) + [None]
        bias = args[n_inputs]
        tensors = [_arg(importer, a) for a in args[:n_inputs]]
        name = f"{kernel}_nobias_f32" if bias is None else f"{kernel}_f32"
        if bias is not None:
            tensors.append(_arg(importer, bias))
        return importer.block_builder.emit(relax.call_dps_packed(name, relax.Tuple(tensors), _out_sinfo(node)))
    return convert


def _convert_sdpa(node, importer):
    import tvm
    from tvm import relax
    q, k, v, mask, scale, causal = node.args
    args = [_arg(importer, q), _arg(importer, k), _arg(importer, v)]
    name = "tcc_sdpa_nomask_f32"
    if mask is not None:
        args.append(_arg(importer, mask))
        name = "tcc_sdpa_f32"
    args += [relax.prim_value(tvm.tirx.FloatImm("float64", float(scale))), relax.prim_value(tvm.tirx.IntImm("bool", bool(causal)))]
    return importer.block_builder.emit(relax.call_dps_packed(name, relax.Tuple(args), _out_sinfo(node)))


CONVERT_MAP = {
    "dense.default": _dense_converter("tcc_dense", 2),
    "dense_w8.default": _dense_converter("tcc_dense_w8", 3),
    "sdpa.default": _convert_sdpa,
}


def to_relax(program: Program):
    """Program -> (IRModule with `main(*inputs, *params)`, [(param name, numpy array)])."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    gm = kernelize(program.gm)
    feeds = program.example_inputs()
    args = tuple(torch.from_numpy(feeds[s.name]) for s in program.inputs)
    with torch.no_grad():
        ep = torch.export.export(gm, args, strict=False).run_decompositions()
    try:
        mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=CONVERT_MAP,
                                    run_ep_decomposition=False)
    except AssertionError as e:
        if "Unsupported function types" in str(e):
            raise UserError(f"the TVM backend cannot lower these ops: {str(e).split('types')[-1].strip()}",
                            "try --backend onnxruntime, or a pipeline that removes them")
        raise
    mod, _ = detach_params(mod)
    # The Relax parameters after the user inputs are the lifted tensors, named by their
    # placeholder (spec.arg.name); store each under its module path (spec.target).
    tensors = {**ep.state_dict, **dict(ep.named_buffers()), **ep.constants}
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target is not None}
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    params = []
    for var in func.params[n_in:]:
        target = by_arg[var.name]
        params.append((target, tensors[target].detach().contiguous().numpy()))
    return mod, params
