"""The TVM lowering of sparse weights (backends/tvm/lower.py): annotated block-sparse fp32 weights at or
above BSR_MIN_SPARSITY run tcc_dense_bsr on BSR arrays; every other annotated weight (unstructured,
N:M, block below the crossover, int8 codes, fused q/k/v) is stored as nonzeros + a bitmask and
restored by tcc_unmask before its dense kernel. Compiled output must match the sparse Program in
PyTorch within 1e-5 (fp32: the same products, summed in another order; measured ~1e-7), the
artifact's weight bytes must fall with sparsity, and the manifest must say, per tensor, which
storage and kernel it got.

Weights are sparsified here by hand (a fixed random mask) and annotated directly, so this file tests
the backend alone; tests/test_sparsify.py tests the pass that normally does this.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcc
from tcc.backends.kernels.sparse_layout import compress, to_bsr
from tcc.backends.tvm.lower import BSR_MIN_SPARSITY, kernelize
from tcc.pipeline import Pipeline

from test_elimination import build


def test_reference_ops_match_dense():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    w[torch.rand(8, 3, generator=g).repeat_interleave(4, 0).repeat_interleave(16, 1) < 0.6] = 0  # 4x16 blocks
    x, b = torch.randn(5, 48, generator=g), torch.randn(32, generator=g)
    v, c, r = (torch.from_numpy(a) for a in to_bsr(w.numpy(), (4, 16)))
    torch.testing.assert_close(torch.ops.tcc_tvm.dense_bsr(x, v, c, r, b, 48), torch.nn.functional.linear(x, w, b))
    for t in (w, (w * 10).to(torch.int8)):
        values, mask = (torch.from_numpy(a) for a in compress(t.numpy()))
        assert torch.equal(torch.ops.tcc_tvm.unmask(values, mask, list(t.shape)), t)


def _sparsify(prog, pattern: str, sparsity: float, block=(1, 16), seed=0):
    """Zero a random pattern in every block linear's weight and annotate it as the sparsify pass does."""
    rng = np.random.default_rng(seed)
    for lin in prog.info.linears():
        w = prog.gm.get_parameter(lin.weight) if lin.weight in dict(prog.gm.named_parameters()) \
            else prog.gm.get_buffer(lin.weight)
        n, k = w.shape
        if pattern == "block":
            r, c = block
            keep = rng.random((n // r, k // c)) >= sparsity
            keep = np.repeat(np.repeat(keep, r, 0), c, 1)
        elif pattern == "n:m":  # 2:4
            order = np.argsort(rng.random((n, k // 4, 4)), axis=-1)
            keep = (order < 2).reshape(n, k)
        else:
            keep = rng.random((n, k)) >= sparsity
        with torch.no_grad():
            w.mul_(torch.from_numpy(keep).to(w.dtype))
        prog.annotations[lin.weight] = {"sparsity": {
            "pattern": pattern, "n": 2 if pattern == "n:m" else None, "m": 4 if pattern == "n:m" else None,
            "block": list(block) if pattern == "block" else None, "sparsity": float(1 - keep.mean()),
            "method": "test"}}
    return prog


def _compile_and_match(prog, tmp_path, tol=1e-5):
    art = tcc.compile(prog, "x86", out=tmp_path / "a")
    try:
        for seed in range(2):
            feeds = prog.example_inputs(seed)
            want, got = prog(feeds), art(feeds)
            for name in want:
                assert np.abs(got[name] - want[name]).max() <= tol * max(1.0, np.abs(want[name]).max()), name
        return art.manifest
    finally:
        art.close()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_block_sparse_weights_run_the_bsr_kernel(tmp_path, arch):
    prog, _ = build(arch)
    dense_bytes = tcc.compile(prog, "x86", out=tmp_path / "dense", verify=False).manifest["sizes"]["weight_bytes"]
    _sparsify(prog, "block", 0.8)
    manifest = _compile_and_match(prog, tmp_path)
    rows = manifest["sparsity"]
    assert {r["tensor"] for r in rows} == set(prog.annotations)
    assert all(r["storage"] == "bsr" and "tcc_dense_bsr" in r["kernel"] for r in rows)
    saved = sum(r["bytes_before"] - r["bytes_after"] for r in rows)
    assert saved > 0.7 * sum(r["bytes_before"] for r in rows)  # 80 % of the blocks gone, + indices
    assert manifest["sizes"]["weight_bytes"] <= dense_bytes - saved + 1024


@pytest.mark.parametrize("pattern,sparsity", [("n:m", 0.5), ("unstructured", 0.5), ("block", BSR_MIN_SPARSITY - 0.1)])
def test_other_sparse_weights_are_stored_compressed(tmp_path, pattern, sparsity):
    prog, _ = build("llama")
    _sparsify(prog, pattern, sparsity)
    gm = kernelize(prog.gm, prog.annotations)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "tcc_tvm.dense_bsr.default" not in targets and "tcc_tvm.unmask.default" in targets
    manifest = _compile_and_match(prog, tmp_path)
    rows = manifest["sparsity"]
    assert rows and all(r["storage"] == "bitmask" and "no speed-up" in r["kernel"] for r in rows)
    # q/k/v and gate/up are fused first; the fused weights are stored compressed, naming their parts
    assert any(r.get("fused") for r in rows)
    ratio = sum(r["bytes_after"] for r in rows) / sum(r["bytes_before"] for r in rows)
    assert ratio <= (1 - sparsity) + 1 / 32 + 0.05  # fp32 nonzeros + 1 bit per element (random masks)
    assert "Sparse weights on this target" in (tmp_path / "a" / "report.md").read_text()


def test_unannotated_zeros_are_left_alone(tmp_path):
    prog, _ = build("llama")
    _sparsify(prog, "n:m", 0.5)
    prog.annotations.clear()  # zeros alone are not a promise the backend may rely on
    gm = kernelize(prog.gm, prog.annotations)
    assert not any("unmask" in str(n.target) or "bsr" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("text,storage", [
    ("sparsify(pattern=2:4,method=magnitude,min_size=0),quantize(weights=int8,min_size=0)", "bitmask"),
    ("sparsify(pattern=2:4,method=magnitude,min_size=0),quantize(acts=int8,min_size=0)", "bitmask"),
    ("sparsify(pattern=block,block=4x16,sparsity=0.75,method=magnitude,min_size=0)", "bsr"),
])
def test_sparsify_pass_then_compile(tmp_path, text, storage):
    """The pass's annotations reach the backend, through quantize's codes (int8 per row, and the W8A8
    kernel's packed layout) too."""
    prog, _ = build("llama")
    sparse = Pipeline.parse(text).run(prog)
    art = tcc.compile(sparse, "x86", out=tmp_path / "a")
    try:
        feeds = sparse.example_inputs(1)
        want = sparse(feeds)["logits"]
        tol = 1e-2 if "acts=int8" in text else 1e-5  # W8A8: one-step code flips (test_quant_lowering.py)
        assert np.abs(art(feeds)["logits"] - want).max() <= tol * np.abs(want).max()
        rows = art.manifest["sparsity"]
        assert rows and all(r["storage"] == storage for r in rows)
        assert all(r["sparsity"] >= 0.5 if storage == "bitmask" else r["sparsity"] >= 0.7 for r in rows)
    finally:
        art.close()


@pytest.mark.arm64
def test_arm64_sparse_program_matches_under_qemu(tmp_path):
    """tcc_dense_bsr and tcc_unmask (fp32 and int8 codes) in one aarch64 artifact, under qemu."""
    import shutil
    if not all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "qemu-aarch64")):
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user")
    prog, _ = build("llama")
    _sparsify(prog, "block", 0.8, block=(4, 16))
    first = prog.info.blocks[0].mlp.down.weight
    prog.annotations[first]["sparsity"]["sparsity"] = 0.1  # below the crossover: stored compressed instead
    q = Pipeline.parse("quantize(weights=int8,min_size=0,skip=[*.layers.1.*])").run(prog)
    art = tcc.compile(q, "arm64", out=tmp_path / "a")
    try:
        feeds = q.example_inputs(1)
        want = q(feeds)["logits"]
        assert np.abs(art(feeds)["logits"] - want).max() <= 1e-5 * np.abs(want).max()
        storages = {r["storage"] for r in art.manifest["sparsity"]}
        assert storages == {"bsr", "bitmask"}
    finally:
        art.close()
