"""Frontends: a Hugging Face folder, a GGUF file, an ONNX file (tcc.onnx_frontend) or an `nn.Module`
-> `torch.export` -> Program.

Task contracts (static batch and sequence length):
  feature-extraction  inputs input_ids[B,S] int64, attention_mask[B,S] int64 -> last_hidden_state[B,S,H]
  causal-lm           inputs input_ids[B,S] int64 -> logits[B,S,V]
                      (the all-ones attention mask is made inside the graph: without an explicit
                      mask transformers 5 emits a packed-sequence check TVM cannot build)
"""
from __future__ import annotations

import dataclasses

import torch

from . import cache, models
from .canonical import canonicalize
from .errors import UserError
from .program import Program, TensorSpec
from .progress import status


class FeatureExtraction(torch.nn.Module):
    """A transformers encoder as the feature-extraction task: (input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class CausalLM(torch.nn.Module):
    """A transformers causal LM as the causal-lm task: input_ids -> logits (all-ones mask made inside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def trace(model, *, task: str | None = None, seq_len: int = 128, batch: int = 1,
          example_inputs: dict[str, torch.Tensor] | None = None,
          output_names: list[str] | None = None) -> Program:
    """Trace a model into a Program.

    `model` is a path or alias (see tcc.models.resolve) or an `nn.Module`. For a module, give
    `example_inputs` by name (positional order = dict order); outputs are named from `output_names`,
    or `output`, `output_1`... For HF models the task decides inputs and outputs.
    """
    if seq_len < 1 or batch < 1:
        raise UserError(f"--seq-len and --batch must be positive (got seq_len={seq_len}, batch={batch})")
    if isinstance(model, torch.nn.Module):
        if not example_inputs:
            raise UserError("tracing an nn.Module needs example_inputs={name: tensor}")
        prog = _trace_module(model.eval(), example_inputs, output_names, task=task or "custom",
                             source={"kind": "module", "class": type(model).__qualname__})
        prog.source["sha256"] = prog.fingerprint()
        return prog

    path = models.resolve(model)
    if path.suffix == ".onnx":
        from .onnx_frontend import trace_onnx
        return trace_onnx(path, task=task, seq_len=seq_len, batch=batch,
                          source_name=str(model) if str(model) in models.ALIASES else None)
    model_sha = models.model_hash(path)
    key = cache.trace_key(model_sha, path, task, seq_len, batch) if cache.enabled() else None
    hit = cache.load_trace(key) if key else None
    shown_path = str(model) if str(model) in models.ALIASES else str(path)  # the key holds the resolved path
    if hit is not None:
        ep, inputs, meta = hit
        with status("traced program from the cache"):
            return _hf_program(ep, inputs, {**meta, "source": {**meta["source"], "path": shown_path}})
    with status(f"loading {model}"):
        hf, task, tok_dir = models.load_hf(path, task)
    cfg = hf.config
    vocab = int(getattr(cfg, "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise UserError(f"--seq-len {seq_len} exceeds the model's maximum of {max_pos} positions")
    if task == "feature-extraction":
        wrapper, inputs, outs = FeatureExtraction(hf), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["last_hidden_state"]
    else:
        wrapper, inputs, outs = CausalLM(hf), {"input_ids": ids}, ["logits"]
    source = {"kind": "huggingface", "path": shown_path, "sha256": model_sha, "model_type": getattr(cfg, "model_type", None)}
    ep = _export(wrapper, inputs)
    meta = {"outputs": outs, "task": task, "source": source, "tokenizer_dir": tok_dir, "vocab": vocab}
    if key:
        cache.save_trace(key, ep, inputs, meta)
    return _hf_program(ep, inputs, meta)


def _hf_program(ep, inputs: dict, meta: dict) -> Program:
    """The Program of a traced Hugging Face model (fresh, or from tcc.cache)."""
    prog = _from_export(ep, inputs, meta["outputs"], task=meta["task"], source=meta["source"])
    vocab = meta["vocab"]
    prog.inputs = [dataclasses.replace(s, range=(0, vocab) if s.name == "input_ids" else (0, 2)) for s in prog.inputs]
    prog.tokenizer_dir = meta["tokenizer_dir"]
    prog.info.vocab_size = vocab
    return prog


def _trace_module(module, example_inputs, output_names, task, source) -> Program:
    return _from_export(_export(module, example_inputs), example_inputs, output_names, task, source)


def _export(module, example_inputs) -> torch.export.ExportedProgram:
    with status("tracing with torch.export"), torch.no_grad():
        try:
            return torch.export.export(module, tuple(example_inputs.values()), strict=False)
        except Exception as e:
            raise UserError(f"torch.export could not trace the model: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                            "the model must be traceable with static shapes; run with --debug for the full trace")


def _from_export(ep, example_inputs, output_names, task, source) -> Program:
    """canonicalize + structure recovery of an ExportedProgram; output specs from running it once."""
    args = tuple(example_inputs.values())
    with torch.no_grad():
        gm = canonicalize(ep.module())
        out = gm(*args)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    names = output_names or (["output"] + [f"output_{i}" for i in range(1, len(outs))])
    in_specs = [TensorSpec(n, str(t.numpy().dtype), tuple(t.shape)) for n, t in example_inputs.items()]
    out_specs = [TensorSpec(n, str(o.detach().numpy().dtype), tuple(o.shape)) for n, o in zip(names, outs)]
    prog = Program(gm=gm, inputs=in_specs, outputs=out_specs, task=task, source=source)
    from .structure import recover
    prog.info = recover(gm)
    return prog


def reexport(program: Program) -> torch.export.ExportedProgram:
    """The Program's graph as an ExportedProgram again (what backends consume)."""
    feeds = program.example_inputs()
    args = tuple(torch.from_numpy(feeds[s.name]) for s in program.inputs)
    with torch.no_grad():
        return torch.export.export(program.gm, args, strict=False)
