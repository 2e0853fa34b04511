"""Helpers for testing passes: tiny models as Programs, and assertions about graphs.

    from tcc.testing import assert_ops, program_of, run_pass, tiny_lm

    program = tiny_lm("llama")                       # a 2-layer random-init LLaMA, traced (seq 8)
    out, record = run_pass("quantize-weights(min_size=0)", program)
    assert_ops(out, ["tcc.dense_w8"] * 7, only=True)  # these ops, in this order (others ignored)
    assert_close(out, program)                      # same outputs within a tolerance

Names of ops in assertions are what `op_names` prints: "aten.linear", "tcc.dense_w8", "aten.add"...
(the overload dropped). `assert_ops(program, names)` checks that `names` occur in the graph in this
order (other ops may come between); with `only=True` the graph's ops of those names must be exactly
`names`, one for one.
"""
from __future__ import annotations

import numpy as np
import torch

from .ir.graph import op_name
from .pipeline import PassContext, Pipeline
from .ir.program import Program, TensorSpec

TINY = dict(hidden_size=64, num_attention_heads=4, vocab_size=100, intermediate_size=128, num_hidden_layers=2)


def program_of(module: torch.nn.Module, *args: torch.Tensor, task: str = "custom") -> Program:
    """`module(*args)` exported (torch.export) as a Program with inputs in0.. and outputs out0.."""
    gm = torch.export.export(module.eval(), args).module()
    outs = gm(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return Program(gm, [TensorSpec(f"in{i}", str(a.numpy().dtype), tuple(a.shape)) for i, a in enumerate(args)],
                   [TensorSpec(f"out{i}", str(o.detach().numpy().dtype), tuple(o.shape)) for i, o in enumerate(outs)],
                   task=task)


def tiny_lm(model_type: str = "llama", seq_len: int = 8, seed: int = 0, **config) -> Program:
    """A random-init Hugging Face causal LM (hidden 64, 4 heads, 2 layers, vocab 100 unless `config`
    says otherwise) traced by tcc.frontends.frontend.trace with input_ids [1, seq_len] -> logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .frontends.frontend import CausalLM, trace
    cfg = AutoConfig.for_model(model_type, **{**TINY, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    return trace(CausalLM(model), example_inputs={"input_ids": ids}, output_names=["logits"], task="causal-lm")


def run_pass(text: str, program: Program, feeds: list[dict] | None = None) -> tuple[Program, dict]:
    """Run pipeline `text` on a copy of `program` (the manager's checks included); returns (the new
    program, the last pass's record)."""
    ctx = PassContext(calibration=feeds or [])
    out = Pipeline.parse(text).run(program, ctx)
    return out, ctx.records[-1]


def op_names(program: Program) -> list[str]:
    """The graph's call_function ops in order (op_name of each)."""
    return [op_name(n) for n in program.gm.graph.nodes if n.op == "call_function"]


def assert_ops(program: Program, names: list[str], only: bool = False) -> None:
    """`names` occur in the graph in this order (a subsequence of op_names); with `only`, the graph's
    ops of those names are exactly `names`, one for one. The error shows the graph's ops."""
    ops = op_names(program)
    if only:
        wanted = set(names)
        got = [o for o in ops if o in wanted]
        assert got == list(names), f"expected exactly {names}, the graph has {got} (all ops: {ops})"
        return
    it = iter(ops)
    missing = [n for n in names if not any(o == n for o in it)]
    assert not missing, f"ops {names} not in this order in the graph: {missing[0]} missing after the earlier ones; " \
                        f"the graph has {ops}"


def assert_no_ops(program: Program, names: list[str]) -> None:
    """None of `names` is left in the graph."""
    left = sorted({o for o in op_names(program) if o in set(names)})
    assert not left, f"the graph still has {left}"


def outputs(program: Program, feeds: dict | None = None) -> dict[str, np.ndarray]:
    """The program's outputs on `feeds` (default: its example inputs)."""
    return program(feeds if feeds is not None else program.example_inputs())


def assert_close(program: Program, reference: Program, rtol: float = 1e-5, atol: float = 1e-5,
                 feeds: dict | None = None) -> None:
    """Both programs' outputs on the same feeds (default: the reference's example inputs) agree."""
    feeds = feeds if feeds is not None else reference.example_inputs()
    got, want = outputs(program, feeds), outputs(reference, feeds)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol, err_msg=f"output {name}")
