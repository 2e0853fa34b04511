"""Frontends: a Hugging Face folder, a GGUF file, an ONNX file (tcc.frontends.onnx_frontend), an `nn.Module`
or an ExportedProgram -> `torch.export` -> Program; `trace` dispatches through tcc.frontends.registry.

Task contracts (static batch; static sequence length, or any length 1..max_seq_len when given):
  feature-extraction  inputs input_ids[B,S] int64, attention_mask[B,S] int64 -> last_hidden_state[B,S,H]
  causal-lm           inputs input_ids[B,S] int64 -> logits[B,S,V]
                      (the all-ones attention mask is made inside the graph: without an explicit
                      mask transformers 5 emits a packed-sequence check TVM cannot build)
  image-feature-extraction  input pixel_values[B,C,H,W] float32 (C, H = W from the config's
                      num_channels and image_size) -> last_hidden_state[B,T,H]; chosen for configs
                      with image_size, patch_size and num_channels and no vocabulary (ViT, DeiT,
                      CLIP's vision tower)
  The CLIP towers (models.POOLED) return pooler_output[B,H] after last_hidden_state.

With `max_seq_len=N` the token inputs (input_ids, attention_mask, token_type_ids) are exported with
one `torch.export.Dim("seq", min=1, max=N)` on their sequence axis (dim 1); the specs record the
range in `min_shape`/`max_shape` and keep the example length in `shape` (Program.example_inputs).
"""
from __future__ import annotations

import dataclasses

import torch

from . import models, trace_cache as cache
from ..ir.canonical import canonicalize
from ..errors import UserError
from ..ir.program import Program, TensorSpec
from ..progress import status


class FeatureExtraction(torch.nn.Module):
    """A transformers encoder as the feature-extraction task: (input_ids, attention_mask) -> last_hidden_state
    [, pooler_output with `pooled`]."""

    def __init__(self, model, pooled: bool = False):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, input_ids, attention_mask):
        return _features(self.model(input_ids=input_ids, attention_mask=attention_mask), self.pooled)


class ImageFeatureExtraction(torch.nn.Module):
    """A transformers vision encoder: pixel_values -> last_hidden_state [, pooler_output with `pooled`]."""

    def __init__(self, model, pooled: bool = False):
        super().__init__()
        self.model, self.pooled = model, pooled

    def forward(self, pixel_values):
        return _features(self.model(pixel_values=pixel_values), self.pooled)


def _features(out, pooled: bool):
    return (out.last_hidden_state, out.pooler_output) if pooled else out.last_hidden_state


class CausalLM(torch.nn.Module):
    """A transformers causal LM as the causal-lm task: input_ids -> logits (all-ones mask made inside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def task_module(hf, task: str) -> tuple[torch.nn.Module, list[str], list[str]]:
    """The wrapper that makes a loaded transformers model `task`'s contract: (module, input names, output names)."""
    pooled = getattr(hf.config, "model_type", None) in models.POOLED
    extra = ["pooler_output"] if pooled else []
    if task == "image-feature-extraction":
        return ImageFeatureExtraction(hf, pooled), ["pixel_values"], ["last_hidden_state", *extra]
    if task == "feature-extraction":
        return FeatureExtraction(hf, pooled), ["input_ids", "attention_mask"], ["last_hidden_state", *extra]
    return CausalLM(hf), ["input_ids"], ["logits"]


def trace(model, *, task: str | None = None, seq_len: int = 128, batch: int = 1,
          example_inputs: dict[str, torch.Tensor] | None = None,
          output_names: list[str] | None = None, max_seq_len: int | None = None, weights: str = "fp32") -> Program:
    """Trace a model into a Program.

    `model` is a path or alias (see tcc.frontends.models.resolve), an `nn.Module` or a
    `torch.export.ExportedProgram`; the frontend registered for its kind reads it
    (tcc.frontends.registry.find). For a module, give `example_inputs` by name (positional order = dict order); outputs are named from `output_names`,
    or `output`, `output_1`... For HF models the task decides inputs and outputs.
    `max_seq_len`: export the token inputs with a dynamic sequence length 1..max_seq_len (the example
    length is min(seq_len, max_seq_len)); None keeps every shape static.
    `weights` "bf16" (a Hugging Face checkpoint saved in bf16): the Program keeps the checkpoint's own
    bf16 tensors, never a float32 copy of them (_bind_bf16); "fp32" loads every weight as float32.
    """
    if seq_len < 1 or batch < 1:
        raise UserError(f"--seq-len and --batch must be positive (got seq_len={seq_len}, batch={batch})")
    if max_seq_len is not None and max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2 (got {max_seq_len})",
                        "leave it out for a static sequence length")
    from .registry import find
    return find(model).load(model, task=task, seq_len=seq_len, batch=batch, example_inputs=example_inputs,
                            output_names=output_names, max_seq_len=max_seq_len, weights=weights)


def trace_module(model: torch.nn.Module, *, example_inputs=None, output_names=None, task=None, max_seq_len=None,
                 **_) -> Program:
    """The "module" frontend: an nn.Module traced on `example_inputs` ({name: tensor})."""
    if not example_inputs:
        raise UserError("tracing an nn.Module needs example_inputs={name: tensor}")
    prog = _trace_module(model.eval(), example_inputs, output_names, task=task or "custom",
                         source={"kind": "module", "class": type(model).__qualname__},
                         dynamic=_dynamic_shapes(example_inputs, max_seq_len))
    prog.source["sha256"] = prog.fingerprint()
    return prog


def trace_exported(ep: torch.export.ExportedProgram, *, example_inputs=None, output_names=None, task=None,
                   max_seq_len=None, **_) -> Program:
    """The "exported-program" frontend: a torch.export.ExportedProgram as it was exported (its own
    dynamic dims); inputs named after its signature, examples from `example_inputs` or its own."""
    if max_seq_len is not None:
        raise UserError("--max-seq-len does not apply to an ExportedProgram: it keeps the shapes it was exported with",
                        "export it with dynamic_shapes instead")
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if not example_inputs:
        args, kwargs = ep.example_inputs or ((), {})
        if kwargs or len(args) != len(names) or not all(isinstance(a, torch.Tensor) for a in args):
            raise UserError("this ExportedProgram has no positional tensor example inputs",
                            "pass example_inputs={name: tensor}")
        example_inputs = dict(zip(names, args))
    prog = _from_export(ep, example_inputs, output_names, task or "custom", {"kind": "exported-program"})
    prog.source["sha256"] = prog.fingerprint()
    return prog


def trace_hf(path, *, task=None, seq_len=128, batch=1, max_seq_len=None, weights="fp32", shown=None, **_) -> Program:
    """The "huggingface" and "gguf" frontends: a Hugging Face folder or a .gguf file (`path`, resolved;
    `shown` the alias the user typed) through transformers and torch.export, with the trace cache."""
    cached = cache.enabled() and max_seq_len is None and weights == "fp32"  # the trace cache holds static programs only
    model_sha = models.model_hash(path) if cached else None
    hashing = None if cached else _in_background(models.model_hash, path)  # read beside loading and tracing
    key = cache.trace_key(model_sha, path, task, seq_len, batch) if cached else None
    hit = cache.load_trace(key) if key else None
    shown_path = shown or str(path)  # the key holds the resolved path
    if hit is not None:
        ep, inputs, meta = hit
        with status("traced program from the cache"):
            # the tokenizer is looked for again: its files are not part of the cache key
            return _hf_program(ep, inputs, {**meta, "source": {**meta["source"], "path": shown_path},
                                            "tokenizer_dir": models.tokenizer_dir(path)})
    with status(f"loading {shown or path}"):
        hf, task, tok_dir = models.load_hf(path, task, weights)
    stand_ins = _fp32_stand_ins(hf) if weights == "bf16" else {}
    cfg = hf.config
    wrapper, names, outs = task_module(hf, task)
    vocab = int(getattr(cfg, "vocab_size", 1000))
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if task != "image-feature-extraction" and max_pos and max(seq_len, max_seq_len or 0) > max_pos:
        flag = "--max-seq-len" if (max_seq_len or 0) > seq_len else "--seq-len"
        raise UserError(f"{flag} {max(seq_len, max_seq_len or 0)} exceeds the model's maximum of {max_pos} positions")
    if max_seq_len is not None:
        seq_len = min(seq_len, max_seq_len)
    g = torch.Generator().manual_seed(0)
    if task == "image-feature-extraction":
        vocab = None
        hw = (cfg.image_size,) * 2 if isinstance(cfg.image_size, int) else tuple(cfg.image_size)
        inputs = {"pixel_values": torch.randn((batch, cfg.num_channels, *hw), generator=g)}
    else:
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs = {n: inputs[n] for n in names}
    source = {"kind": "huggingface", "path": shown_path, "sha256": model_sha or hashing(),
              "model_type": getattr(cfg, "model_type", None)}
    ep = _export(wrapper, inputs, _dynamic_shapes(inputs, max_seq_len))
    meta = {"outputs": outs, "task": task, "source": source, "tokenizer_dir": tok_dir, "vocab": vocab}
    if key:
        cache.save_trace(key, ep, inputs, meta)
    del hf, wrapper
    return _hf_program(ep, inputs, meta, stand_ins)


def _in_background(fn, *args):
    """Start fn(*args) in a daemon thread; returns a function that waits for its result (or raises
    its exception). For hashing a checkpoint (reads and sha256 release the GIL) while the model is
    loaded and traced: 10-18 s of a 1B model's trace on 2 cores."""
    import threading
    box: dict = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised by result()
            box["error"] = e

    thread = threading.Thread(target=work, name=f"tcc-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]
    return result


def _fp32_stand_ins(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """In place: every bfloat16 parameter and buffer of `model` is replaced by a float32 tensor of its
    shape that is never written (torch.empty: its pages never become resident), so that torch.export
    traces float32 math without a float32 copy of the weights; a tensor shared by several modules
    (tied embeddings) gets one stand-in. Returns {stand-in data_ptr: the bf16 tensor} for _bind_bf16."""
    bound, made = {}, {}
    for mod in model.modules():
        for slots in (mod._parameters, mod._buffers):
            for name, t in slots.items():
                if t is None or t.dtype != torch.bfloat16:
                    continue
                if id(t) not in made:
                    stand_in = torch.empty(t.shape, dtype=torch.float32)
                    made[id(t)] = torch.nn.Parameter(stand_in, requires_grad=False) if slots is mod._parameters else stand_in
                    bound[stand_in.data_ptr()] = t.detach()
                slots[name] = made[id(t)]
    return bound


def _reads_as_weight(u: torch.fx.Node, g: torch.fx.Node) -> bool:
    """Node u reads get_attr g only as a linear's weight or an embedding's table."""
    aten = torch.ops.aten
    if u.op != "call_function" or u.kwargs:
        return False
    if u.target is aten.linear.default:
        return len(u.args) > 1 and u.args[1] is g and g not in (u.args[0], *u.args[2:])
    return u.target is aten.embedding.default and u.args[0] is g and g not in u.args[1:]


def _bind_bf16(gm: torch.fx.GraphModule, stand_ins: dict[int, torch.Tensor]) -> None:
    """In place, on a graph traced with _fp32_stand_ins: a stand-in read only as linear weights and
    embedding tables becomes the checkpoint's bf16 tensor itself, read by tcc::dense_bf16 /
    tcc::embedding_bf16 (tcc.ir.ops: float32 math on the weights widened exactly, one at a time, so the
    graph computes what the float32 model computes); any other (norm weights, biases, tensors read
    by other ops) becomes a float32 copy of its bf16 values (small tensors, exact)."""
    from ..ir import ops  # noqa: F401  (registers tcc::dense_bf16, tcc::embedding_bf16)
    from ..pipeline import set_val
    from ..ir.program import attribute
    tcc_ops = torch.ops.tcc
    bound: dict[int, torch.Tensor] = {}  # id(bf16 tensor) -> what replaced it (tied names: one object)
    getters: dict[str, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            getters.setdefault(n.target, []).append(n)
    for target, nodes in getters.items():
        t = attribute(gm, target)
        src = stand_ins.get(t.data_ptr()) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else None
        if src is None:
            continue
        keep = src.dim() == 2 and all(_reads_as_weight(u, g) for g in nodes for u in g.users)
        if id(src) not in bound or (bound[id(src)].dtype == torch.bfloat16) != keep:
            bound[id(src)] = torch.nn.Parameter(src if keep else src.to(torch.float32), requires_grad=False)
        value = bound[id(src)]
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if name in owner._parameters:
            owner._parameters[name] = value
        elif name in owner._buffers:
            owner._buffers[name] = value
        else:
            setattr(owner, name, value)
        for g in nodes:
            set_val(gm, g, value)
            for u in list(g.users) if keep else ():
                if u.target is torch.ops.aten.linear.default:
                    u.target, u.args = tcc_ops.dense_bf16.default, (u.args[0], g, *u.args[2:])
                else:
                    u.target, u.args = tcc_ops.embedding_bf16.default, (u.args[1], g)
    gm.recompile()


def _hf_program(ep, inputs: dict, meta: dict, stand_ins: dict | None = None) -> Program:
    """The Program of a traced Hugging Face model (fresh, or from tcc.cache); `stand_ins`: _bind_bf16."""
    prog = _from_export(ep, inputs, meta["outputs"], task=meta["task"], source=meta["source"], stand_ins=stand_ins)
    vocab = meta["vocab"]
    ranges = {"input_ids": (0, vocab), "attention_mask": (0, 2), "token_type_ids": (0, 2)}
    prog.inputs = [dataclasses.replace(s, range=ranges.get(s.name)) for s in prog.inputs]
    prog.tokenizer_dir = meta["tokenizer_dir"]
    prog.info.vocab_size = vocab
    return prog


def _trace_module(module, example_inputs, output_names, task, source, dynamic=None) -> Program:
    return _from_export(_export(module, example_inputs, dynamic), example_inputs, output_names, task, source)


def _dynamic_shapes(example_inputs: dict, max_seq_len: int | None) -> tuple | None:
    """torch.export's dynamic_shapes (by position): one Dim("seq", 1..max_seq_len) on dim 1 of the
    token inputs; None (static) without max_seq_len."""
    if max_seq_len is None:
        return None
    if not any(n in TOKEN_INPUTS and t.dim() >= 2 for n, t in example_inputs.items()):
        raise UserError(f"--max-seq-len needs a token input ({', '.join(TOKEN_INPUTS)}) of shape [batch, seq]; "
                        f"the model takes {list(example_inputs)}")
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    return tuple({1: seq} if n in TOKEN_INPUTS and t.dim() >= 2 else None for n, t in example_inputs.items())


def dynamic_shapes(program: Program) -> tuple | None:
    """The dynamic_shapes that export `program.gm` again with its inputs' ranges (None: static)."""
    if not any(s.dynamic_dims for s in program.inputs):
        return None
    dims = {}
    def dim(spec, i):
        key = (spec.min_shape[i], spec.max_shape[i])
        return dims.setdefault(key, torch.export.Dim(f"seq{len(dims)}", min=key[0], max=key[1]))
    return tuple({i: dim(s, i) for i in s.dynamic_dims} or None for s in program.inputs)


def _spec(name: str, value: torch.Tensor, val, ranges: dict) -> TensorSpec:
    """The spec of a graph input or output: `value` its example, `val` its fake tensor in the graph
    (symbolic sizes give min_shape/max_shape from the export's `ranges`, its range_constraints)."""
    from torch.utils._sympy.value_ranges import bound_sympy
    dtype = str(torch.empty((), dtype=value.dtype).numpy().dtype)  # (value may be a meta tensor: _graph_outputs)
    spec = TensorSpec(name, dtype, tuple(value.shape))
    sizes = list(val.shape) if isinstance(val, torch.Tensor) else []
    if not any(isinstance(d, torch.SymInt) for d in sizes):
        return spec
    lo, hi = [], []
    for d in sizes:
        if isinstance(d, torch.SymInt):
            r = bound_sympy(d.node.expr, ranges)
            lo.append(int(r.lower)), hi.append(int(r.upper))
        else:
            lo.append(int(d)), hi.append(int(d))
    return dataclasses.replace(spec, min_shape=tuple(lo), max_shape=tuple(hi))


def _export(module, example_inputs, dynamic=None) -> torch.export.ExportedProgram:
    with status("tracing with torch.export"), torch.no_grad():
        try:
            return torch.export.export(module, tuple(example_inputs.values()), dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            raise UserError(f"torch.export could not trace the model: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                            "the model must be traceable with static shapes; run with --debug for the full trace")


def _graph_outputs(gm: torch.fx.GraphModule) -> list[torch.Tensor] | None:
    """The outputs' dtypes and example shapes as meta tensors, read from the graph's fake values (a
    symbolic size by its example value), so that tracing need not run the model (a forward pass of a
    1B model: 10-14 s of its trace on 2 cores); None where an output has no fake value."""
    from torch._subclasses.fake_tensor import FakeTensor
    from ..ir.structure import size_hint
    results = gm.graph.output_node().args[0]
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in results]
    if not vals or not all(isinstance(v, FakeTensor) for v in vals):
        return None
    try:
        return [torch.empty([size_hint(d) for d in v.shape], dtype=v.dtype, device="meta") for v in vals]
    except (TypeError, ValueError):  # a size without an example value
        return None


def _from_export(ep, example_inputs, output_names, task, source, stand_ins=None) -> Program:
    """canonicalize + structure recovery of an ExportedProgram; output specs from the graph's fake
    values (_graph_outputs), else from running it once."""
    args = tuple(example_inputs.values())
    with torch.no_grad():
        gm = ep.module()
        if stand_ins:
            _bind_bf16(gm, stand_ins)
        gm = canonicalize(gm)
        outs = _graph_outputs(gm)
        if outs is None:
            out = gm(*args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
    names = output_names or (["output"] + [f"output_{i}" for i in range(1, len(outs))])
    in_vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder")]
    results = gm.graph.output_node().args[0]
    results = list(results) if isinstance(results, (tuple, list)) else [results]
    out_vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in results]
    in_specs = [_spec(n, t, v, ep.range_constraints) for (n, t), v in zip(example_inputs.items(), in_vals)]
    out_specs = [_spec(n, o, v, ep.range_constraints) for n, o, v in zip(names, outs, out_vals)]
    prog = Program(gm=gm, inputs=in_specs, outputs=out_specs, task=task, source=source)
    from ..ir.structure import recover
    prog.info = recover(gm)
    return prog


def reexport(program: Program) -> torch.export.ExportedProgram:
    """The Program's graph as an ExportedProgram again (what backends consume)."""
    feeds = program.example_inputs()
    args = tuple(torch.from_numpy(feeds[s.name]) for s in program.inputs)
    with torch.no_grad():
        return torch.export.export(program.gm, args, dynamic_shapes=dynamic_shapes(program), strict=False)
