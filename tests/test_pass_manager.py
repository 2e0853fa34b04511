"""The pass manager's side of the pass contract (tcc.pipeline.Pass.apply, Pipeline.run): a pass says
whether it changed the program; after a change the manager removes dead code and recovers ModelInfo;
every tcc op's operands are checked against tcc.ir.ops.OPERANDS; --print-after prints the graph; a
failing pass leaves a reproducer. Also runs examples/custom_pass.py (as CI does)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tcc.errors import InternalError
from tcc.ir.graph import nodes
from tcc.pipeline import Pass, PassContext, Pipeline, register
from tcc.report import error_json
from tcc.testing import assert_close, assert_ops, op_names, program_of, run_pass, tiny_lm

ROOT = Path(__file__).resolve().parents[1]


class DeadMul(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)

    def forward(self, x):
        y = self.a(x)
        _ = y * 2  # dead: nothing reads it
        return torch.relu(y)


@register
class _Nothing(Pass):
    """Test pass: looks, changes nothing, says so."""
    name = "test-nothing"

    def run(self, program, ctx) -> bool:
        return False


@register
class _ReluToAbs(Pass):
    """Test pass: relu(x) -> abs(x) (leaves the relu's input chain as it was)."""
    name = "test-relu-to-abs"

    def run(self, program, ctx) -> bool:
        g = program.gm.graph
        for n in nodes(program.gm, "aten.relu"):
            with g.inserting_before(n):
                new = g.call_function(torch.ops.aten.abs.default, n.args)
            new.meta.update(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
        return True


@register
class _BadDenseW8(Pass):
    """Test pass: linear -> tcc::dense_w8 with a float32 weight, which breaks the op's spec (qw int8)."""
    name = "test-bad-dense-w8"

    def run(self, program, ctx) -> bool:
        g = program.gm.graph
        for n in nodes(program.gm, "aten.linear"):
            w = program.gm.get_parameter(n.args[1].target)
            program.gm.register_buffer("bad_scale", torch.ones(w.shape[0]))
            with g.inserting_before(n):
                new = g.call_function(torch.ops.tcc.dense_w8.default, (n.args[0], n.args[1], g.get_attr("bad_scale"),
                                                                     n.args[2] if len(n.args) > 2 else None))
            n.replace_all_uses_with(new)
            g.erase_node(n)
        return True


def _program():
    torch.manual_seed(0)
    return program_of(DeadMul(), torch.randn(3, 8))


def test_unchanged_program_is_left_as_it_was():
    program = _program()
    before = op_names(program)
    out, record = run_pass("test-nothing", program)
    assert op_names(out) == before and "aten.mul" in before  # the manager did not clean up after "no change"
    assert record["nodes"]["before"] == record["nodes"]["after"]
    assert "removed_nodes" not in record["details"]
    assert_close(out, program, rtol=0, atol=0)


def test_manager_removes_dead_code_after_a_change():
    program = _program()
    out, record = run_pass("test-relu-to-abs", program)
    assert_ops(out, ["aten.linear", "aten.abs"], only=True)
    assert "aten.mul" not in op_names(out) and "aten.relu" not in op_names(out)  # dce by the manager
    assert any(name.startswith("mul") for name in record["details"]["removed_nodes"])
    x = program.example_inputs()["in0"]
    y = torch.from_numpy(x) @ program.gm.a.weight.T + program.gm.a.bias
    assert torch.allclose(torch.from_numpy(out({"in0": x})["out0"]), y.abs(), atol=1e-6)


def test_manager_recovers_model_info_after_a_change():
    program = tiny_lm("llama", num_hidden_layers=1)
    assert len(program.info.blocks) == 1
    ctx = PassContext()
    out = Pipeline.parse("bf16").run(program, ctx)  # returns True: the manager cleans up and recovers
    details = ctx.records[-1]["details"]
    assert "model.model.layers.0.mlp.down_proj.weight" in details["removed_attributes"]  # the float32 copies
    assert out.info is not program.info and len(out.info.blocks) == 1
    assert out.info.blocks[0].mlp.down is not None  # recovered from the rewritten graph (dense_bf16)
    assert_close(out, program, rtol=1e-2, atol=1e-2)


def test_operand_spec_violation_is_named_and_leaves_a_reproducer():
    program = _program()
    ctx = PassContext()
    with pytest.raises(InternalError) as e:
        Pipeline.parse("dce,test-bad-dense-w8").run(program, ctx)
    message = str(e.value)
    assert "test-bad-dense-w8" in message and "tcc::dense_w8" in message and "qw" in message and "torch.int8" in message
    repro = ctx.reproducer
    assert repro["pipeline"] == "dce,test-bad-dense-w8" and repro["pass"] == "test-bad-dense-w8"
    assert "torch.ops.aten.linear" in repro["program"] and "dense_w8" not in repro["program"]  # its input program
    assert error_json(e.value)["reproducer"] == repro  # what the compile's report carries


def test_print_after(capsys):
    program = _program()
    Pipeline.parse("dce,test-relu-to-abs").run(program, PassContext(print_after=frozenset({"test-relu-to-abs"})))
    out = capsys.readouterr().out
    assert "after pass 2/2 test-relu-to-abs" in out and "aten.abs" in out and "after pass 1/2" not in out
    Pipeline.parse("dce,test-nothing").run(program, PassContext(print_after=frozenset({"all"})))
    out = capsys.readouterr().out
    assert "after pass 1/2 dce" in out and "after pass 2/2 test-nothing" in out


def test_print_after_names_an_unknown_pass():
    r = subprocess.run([sys.executable, "-m", "tcc.cli", "compile", "minilm", "--print-after", "dce,no-such-pass",
                        "-o", "/nonexistent/x"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown pass 'no-such-pass'" in r.stderr and "Traceback" not in r.stderr


def test_custom_pass_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_pass.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'weights_pruned': 2" in r.stdout and "zeros per weight [0.5, 0.5]" in r.stdout
