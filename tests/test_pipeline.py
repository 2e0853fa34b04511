"""Pipeline text, option validation, the pass registry and plugins, and the pass manager's checks
and records (tcc/pipeline/__init__.py)."""
from __future__ import annotations

import importlib.metadata
import json
import sys
import types

import numpy as np
import pytest
import torch

from tcc import pipeline
from tcc.errors import AccuracyBudgetError, InternalError, UserError
from tcc.pipeline import (Option, Pass, PassContext, Pipeline, PluginWarning, all_passes, estimate_flops,
                          format_value, get_pass, parse_text, register)
from tcc.ir.program import Program, TensorSpec


# -- tiny programs --------------------------------------------------------------------------------

class TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def make_program(module=None, shape=(4, 16)) -> Program:
    torch.manual_seed(0)
    module = (module or TwoLinear()).eval()
    x = torch.randn(*shape)
    gm = torch.export.export(module, (x,)).module()
    out = gm(x)
    return Program(gm, [TensorSpec("x", "float32", tuple(shape))], [TensorSpec("y", "float32", tuple(out.shape))],
                   task="custom")


class Knobs(Pass):
    """Test pass with one option of every type."""

    name = "knobs"
    options = {
        "n": Option(int, 3, "a count", validator=lambda v: None if v > 0 else "must be > 0"),
        "ratio": Option(float, 0.5, "a fraction"),
        "flag": Option(bool, False, "a switch"),
        "mode": Option(str, "fast", "how", choices=("fast", "slow")),
        "layers": Option(list[int], [], "layer indices"),
        "skip": Option(list[str], [], "globs"),
    }

    def run(self, program, ctx):
        return program


# -- parser ---------------------------------------------------------------------------------------

def test_parse_names_and_options():
    specs = parse_text("dce, fold-constants ,quantize-weights(bits=8)")
    assert [s.name for s in specs] == ["dce", "fold-constants", "quantize-weights"]
    assert [s.options for s in specs] == [{}, {}, {"bits": 8}]
    assert [s.column for s in specs] == [1, 6, 22]
    assert parse_text("") == [] and parse_text("   ") == []


def test_parse_value_types():
    (spec,) = parse_text(r"""p(a=1,b=2.5,c=25%,d=true,e=False,f=int8,g=[1,2],h=[a, b],i="x,y",j=-3,k=1e-3,l=[],"""
                         r"""m=layers.*.mlp,n='it\'s')""")
    o = spec.options
    assert o["a"] == 1 and type(o["a"]) is int
    assert o["b"] == 2.5 and o["c"] == pytest.approx(0.25) and o["k"] == pytest.approx(1e-3)
    assert o["d"] is True and o["e"] is False
    assert o["f"] == "int8" and o["g"] == [1, 2] and o["h"] == ["a", "b"] and o["i"] == "x,y"
    assert o["j"] == -3 and o["l"] == [] and o["m"] == "layers.*.mlp" and o["n"] == "it's"
    (spec,) = parse_text("drop-attention(max=1%,min-size=4)")
    assert spec.options == {"max": pytest.approx(0.01), "min_size": 4}  # dashes in keys become underscores


@pytest.mark.parametrize("text, column, words", [
    ("dce,,fold-constants", 5, "expected a pass name"),
    ("dce,", 5, "expected a pass name"),
    ("quantize-weights(bits=8", 24, "expected ',' or ')'"),
    ("quantize-weights(bits)", 22, "expected '=' after option 'bits'"),
    ("q(a=[1,[2]])", 8, "lists cannot be nested"),
    ("q(a=1,a=2)", 7, "option 'a' given twice"),
    ('q(a="open)', 5, "unterminated string"),
    ("dce fold-constants", 5, "expected ',' between passes"),
    ("q(a=)", 5, "expected a value"),
])
def test_malformed_text_names_the_column_with_a_caret(text, column, words):
    with pytest.raises(UserError) as e:
        parse_text(text)
    first, shown, caret = e.value.message.split("\n")
    assert f"column {column}:" in first and words in first
    assert shown.strip() == text
    assert caret.index("^") - 4 == column - 1  # 4 spaces of indent, then the caret under the column


def test_unknown_pass_suggests_close_names():
    with pytest.raises(UserError) as e:
        Pipeline.parse("dce,quantize-weight(bits=8)")
    assert "unknown pass 'quantize-weight'" in e.value.message
    assert "quantize-weights" in e.value.hint
    assert e.value.message.split("\n")[2].index("^") - 4 == 4  # caret under the unknown name


def test_round_trip_and_canonical_form():
    p = Pipeline.parse("dce , fold-constants(size_limit=100),quantize-weights(skip=[lm_head, 'a,b'])")
    assert str(p) == 'dce,fold-constants(size_limit=100),quantize-weights(skip=[lm_head,"a,b"])'
    assert p.canonical() == ('dce,fold-constants(size_limit=100),'
                             'quantize-weights(bits=8,min_size=4096,skip=[lm_head,"a,b"])')
    assert Pipeline.parse(str(p)) == p and Pipeline.parse(p.canonical()) == p
    assert str(Pipeline.parse("quantize-weights(bits=8)")) == "quantize-weights"  # defaults are not shown
    assert Pipeline.parse("dce") != Pipeline.parse("fold-constants")


def test_format_value_round_trips_every_type():
    values = [3, -2, 0.25, 1e-07, True, False, "int8", "a,b", "8", "true", 'say "hi"', "", [1, 2], ["x", "y z"], []]
    for v in values:
        (spec,) = parse_text(f"p(v={format_value(v)})")
        assert spec.options["v"] == v and type(spec.options["v"]) is type(v)


# -- options --------------------------------------------------------------------------------------

def test_options_are_validated_and_coerced():
    k = Knobs(n=2, ratio=1, flag=True, mode="slow", layers=4, skip="lm_head")
    assert (k.n, k.ratio, k.flag, k.mode, k.layers, k.skip) == (2, 1.0, True, "slow", [4], ["lm_head"])
    assert type(k.ratio) is float
    assert Knobs().opts == {"n": 3, "ratio": 0.5, "flag": False, "mode": "fast", "layers": [], "skip": []}


@pytest.mark.parametrize("opts, words", [
    ({"bogus": 1}, "pass 'knobs' has no option 'bogus'"),
    ({"n": "many"}, "option 'n' expects int, got many"),
    ({"n": 2.5}, "option 'n' expects int, got 2.5"),
    ({"n": True}, "option 'n' expects int, got true"),
    ({"n": 0}, "option 'n' must be > 0"),
    ({"ratio": "half"}, "option 'ratio' expects float"),
    ({"flag": 1}, "option 'flag' expects bool, got 1"),
    ({"mode": "medium"}, "option 'mode' must be one of ['fast', 'slow'], got medium"),
    ({"layers": [1, "x"]}, "option 'layers' expects int, got x"),
    ({"ratio": [1.0]}, "option 'ratio' expects a single float, got a list"),
])
def test_option_errors_name_pass_and_option(opts, words):
    with pytest.raises(UserError) as e:
        Knobs(**opts)
    assert words in e.value.message


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(UserError) as e:
        Pipeline.parse("dce,quantize-weights(bitz=8)")
    assert "pass 'quantize-weights' has no option 'bitz'" in e.value.message
    assert "bits (int)" in e.value.hint and "min_size (int)" in e.value.hint and "skip (list[str])" in e.value.hint
    assert e.value.message.split("\n")[2].index("^") - 4 == 4


def test_unsupported_bits_says_what_is_supported():
    with pytest.raises(UserError) as e:
        Pipeline.parse("quantize-weights(bits=4)")
    assert "option 'bits' must be one of [8], got 4" in e.value.message


# -- registry and plugins -------------------------------------------------------------------------

@pytest.fixture
def clean_registry(monkeypatch):
    all_passes()  # built-ins and real plugins in first, so the snapshot holds them
    monkeypatch.setattr(pipeline, "_REGISTRY", dict(pipeline._REGISTRY))
    monkeypatch.setattr(pipeline, "_plugins_tried", set())


def fake_entry_points(monkeypatch, eps):
    calls = []

    def entry_points(group=None):
        calls.append(group)
        return [ep for ep in eps if ep.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


def test_builtins_are_registered():
    names = all_passes()
    assert {"dce", "fold-constants", "quantize-weights"} <= set(names)
    assert get_pass("dce").kind == "cleanup" and get_pass("quantize-weights").kind == "transform"
    for cls in names.values():
        assert cls.__doc__.strip()


def test_register_rejects_bad_passes(clean_registry):
    with pytest.raises(ValueError, match="kind"):
        register(type("Bad", (Pass,), {"__doc__": "x", "name": "bad", "kind": "magic"}))
    with pytest.raises(ValueError, match="docstring"):
        register(type("NoDoc", (Pass,), {"__doc__": None, "name": "no-doc"}))
    with pytest.raises(ValueError, match="must match"):
        register(type("BadName", (Pass,), {"__doc__": "x", "name": "has space"}))
    with pytest.raises(ValueError, match="taken by"):
        register(type("Dce2", (Pass,), {"__doc__": "x", "name": "dce"}))
    with pytest.raises(ValueError, match="must be one of"):
        register(type("BadDefault", (Pass,), {"__doc__": "x", "name": "bad-default",
                                              "options": {"m": Option(str, "z", "h", choices=("a",))}}))


def test_plugins_load_lazily_and_broken_ones_warn(clean_registry, monkeypatch):
    plugin = types.ModuleType("tcc_test_plugin")

    class Hello(Pass):
        """Plugin pass: does nothing."""

        name = "hello"
        kind = "analysis"

        def run(self, program, ctx):
            ctx.report[self.name] = {"nodes": len(program.gm.graph.nodes)}
            return program

    plugin.Hello = Hello
    monkeypatch.setitem(sys.modules, "tcc_test_plugin", plugin)
    calls = fake_entry_points(monkeypatch, [
        importlib.metadata.EntryPoint("hello", "tcc_test_plugin:Hello", "tcc.passes"),
        importlib.metadata.EntryPoint("broken", "tcc_no_such_module_xyz:Pass", "tcc.passes"),
        importlib.metadata.EntryPoint("other-group", "tcc_test_plugin:Hello", "something.else"),
    ])
    assert get_pass("dce") is not None and calls == []  # built-ins never touch entry points
    assert get_pass("hello") is Hello  # loads only the entry point named like the pass: no warning yet
    with pytest.warns(PluginWarning, match="skipping pass plugin 'broken'.*ModuleNotFoundError"):
        names = all_passes()
    assert "hello" in names and "broken" not in names
    program = make_program()
    ctx = PassContext()
    Pipeline.parse("hello").run(program, ctx)
    assert ctx.report["hello"]["nodes"] == len(program.gm.graph.nodes)
    with pytest.raises(UserError, match="unknown pass 'broken'"):
        get_pass("broken")


def test_plugin_cannot_shadow_a_builtin(clean_registry, monkeypatch):
    plugin = types.ModuleType("tcc_test_plugin2")
    plugin.Fake = type("Fake", (Pass,), {"__doc__": "x", "name": "dce"})
    monkeypatch.setitem(sys.modules, "tcc_test_plugin2", plugin)
    fake_entry_points(monkeypatch, [importlib.metadata.EntryPoint("dce2", "tcc_test_plugin2:Fake", "tcc.passes")])
    with pytest.warns(PluginWarning, match="pass name 'dce' is taken"):
        all_passes()
    assert get_pass("dce").__module__.endswith("dead_code")


# -- the pass manager -----------------------------------------------------------------------------

class Poison(Pass):
    """Test pass: writes NaN into one weight."""

    name = "poison"

    def run(self, program, ctx):
        with torch.no_grad():
            program.gm.b.weight[0, 0] = float("nan")
        return program


class Nudge(Pass):
    """Test pass: scales one weight by (1 + eps), pretending to be a cleanup."""

    name = "nudge"
    kind = "cleanup"
    options = {"eps": Option(float, 0.01, "relative change")}

    def run(self, program, ctx):
        with torch.no_grad():
            program.gm.b.weight.mul_(1 + self.eps)
        ctx.note(scaled="b.weight")
        return program


class Crop(Pass):
    """Test pass: cuts the last output column."""

    name = "crop"

    def run(self, program, ctx):
        out = program.gm.graph.output_node()
        (y,) = out.args[0]
        with program.gm.graph.inserting_before(out):
            cut = program.gm.graph.call_function(torch.ops.aten.slice.Tensor, (y, 1, 0, 7))
        out.args = ((cut,),)
        return program


def test_nan_is_caught_and_names_the_pass():
    with pytest.raises(UserError) as e:
        Pipeline([Poison()]).run(make_program())
    assert "pass 'poison' produced NaN in output 'y'" in e.value.message


def test_changed_output_shape_is_caught():
    with pytest.raises(UserError) as e:
        Pipeline([Crop()]).run(make_program())
    assert "pass 'crop' changed the shape of output 'y' from [4, 8] to [4, 7]" in e.value.message


def test_cleanup_passes_must_keep_outputs_and_tolerance_is_enforced():
    with pytest.raises(InternalError, match="cleanup pass 'nudge' changed output 'y'"):
        Pipeline([Nudge()]).run(make_program())
    Pipeline([Nudge(eps=1e-7)]).run(make_program())  # within cleanup_tolerance
    with pytest.raises(AccuracyBudgetError, match="pass 'quantize-weights' changed output 'y'"):
        Pipeline.parse("quantize-weights(min_size=1)").run(make_program(), PassContext(tolerance=1e-6))


def test_records_hold_the_numbers():
    program = make_program()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(6)]
    ctx = PassContext(calibration=feeds, check_feeds=3)
    before = program.gm(torch.from_numpy(feeds[0]["x"])).detach().numpy()
    Pipeline([Nudge(eps=1e-7), Knobs(), Pipeline.parse("quantize-weights(min_size=1)").passes[0]]).run(program, ctx)
    json.dumps(ctx.records)  # plain JSON
    nudge, knobs, quant = ctx.records
    assert [r["pass"] for r in ctx.records] == ["nudge", "knobs", "quantize-weights"]
    assert nudge["details"] == {"scaled": "b.weight"} and knobs["details"] == {}
    assert quant["text"] == "quantize-weights(bits=8,min_size=1,skip=[])"
    assert quant["options"] == {"bits": 8, "min_size": 1, "skip": []}
    # bytes: fp32 16x32 + 32 + 32x8 + 8 -> int8 weights + fp32 scales, biases unchanged
    assert quant["param_bytes"] == {"before": 4 * (512 + 32 + 256 + 8), "after": 512 + 256 + 4 * (32 + 8) * 2}
    assert knobs["param_bytes"]["before"] == knobs["param_bytes"]["after"] == 4 * (512 + 32 + 256 + 8)
    flops = 2 * 4 * 16 * 32 + 2 * 4 * 32 * 8
    assert quant["flops"] == {"before": flops, "after": flops}
    assert quant["nodes"]["after"] == quant["nodes"]["before"] + 2  # 2 weights -> int8 + scale get_attrs each
    # knobs changed nothing: its drift is nudge's outputs reused, not a second run
    assert knobs["drift"] == {"max_abs": 0.0, "rel": 0.0, "output": "y", "feeds": 3, "reused": True}
    assert "reused" not in nudge["drift"] and "reused" not in quant["drift"]
    assert 0 < quant["drift"]["rel"] < 0.02 and quant["drift"]["feeds"] == 3
    after = program.gm(torch.from_numpy(feeds[0]["x"])).detach().numpy()
    measured = np.abs(after - before).max()
    assert quant["drift"]["max_abs"] >= measured * 0.999  # the record covers feed 0 (and more)
    assert all(r["seconds"] >= 0 for r in ctx.records)


class Swap(Pass):
    """Test pass: replaces b.weight by a new tensor (the old one is freed) with other values."""

    name = "swap"

    def run(self, program, ctx):
        w = program.gm.b.weight
        program.gm.b.weight = torch.nn.Parameter(w.detach() * 2)
        del w
        return program


class DeadNode(Pass):
    """Test pass: adds a node nothing reads, then (remove=True) removes it again."""

    name = "dead-node"
    options = {"remove": Option(bool, False, "remove the dead nodes")}

    def run(self, program, ctx):
        graph = program.gm.graph
        if self.remove:
            graph.eliminate_dead_code()
        else:
            x = next(n for n in graph.nodes if n.op == "placeholder")
            with graph.inserting_after(x):
                graph.call_function(torch.ops.aten.mul.Tensor, (x, 3.0))
        return program


def test_a_pass_that_changes_nothing_the_outputs_need_is_not_run_again(monkeypatch):
    """Pipeline.run re-runs the program after a pass only when the computation changed: adding or
    removing a dead node reuses the outputs (drift 0, exact); a tensor replaced or written in place
    is measured."""
    runs = []
    real = pipeline._observe
    monkeypatch.setattr(pipeline, "_observe", lambda *a, **k: runs.append(1) or real(*a, **k))
    ctx = PassContext()
    Pipeline([DeadNode(), DeadNode(remove=True), Swap(), Nudge(eps=1e-7)]).run(make_program(), ctx)
    add, remove, swap, nudge = ctx.records
    assert len(runs) == 3  # before the passes, after swap, after nudge
    assert add["nodes"]["after"] == add["nodes"]["before"] + 1 and remove["nodes"]["after"] == add["nodes"]["before"]
    assert add["drift"]["reused"] and remove["drift"]["reused"] and add["drift"]["rel"] == remove["drift"]["rel"] == 0
    assert "reused" not in swap["drift"] and swap["drift"]["rel"] > 0.1
    assert "reused" not in nudge["drift"] and 0 < nudge["drift"]["rel"] < 1e-6


def test_without_calibration_the_example_inputs_are_checked():
    ctx = PassContext()
    Pipeline.parse("dce").run(make_program(), ctx)
    assert ctx.records[0]["drift"]["feeds"] == 1


def test_estimate_flops_linear_matmul_and_attention():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x):  # x [2, 10, 32], 4 heads of 8
            q, k, v = self.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
            o = torch.ops.tcc.sdpa(q, k, v, None, 8 ** -0.5, True)
            return o.transpose(1, 2).reshape(2, 10, 32) @ x.transpose(1, 2)

    program = make_program(Attn(), shape=(2, 10, 32))
    expected = 2 * 20 * 32 * 96 + 2 * 2 * (2 * 4 * 10 * 10 * 8) + 2 * 2 * 10 * 32 * 10  # qkv, QK^T and PV, @
    assert estimate_flops(program.gm) == expected  # from meta['val']
    for n in program.gm.graph.nodes:
        n.meta.pop("val", None)
        n.meta.pop("tensor_meta", None)
    with pytest.raises(InternalError):
        estimate_flops(program.gm)
    assert estimate_flops(program.gm, (torch.randn(2, 10, 32),)) == expected  # by ShapeProp
