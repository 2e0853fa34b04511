"""The cuda targets (backends/tvm/cuda.py, backends/kernels/cuda): compiled here, never run (no GPU).

What can be checked without a GPU, and is:
  * the CPU math of the kernels: backends/kernels/cuda/emulate.cc replays each kernel's blocks,
    warps, lanes and steps with the kernels' own tcc_cuda.cuh functions and tensor-core
    instructions emulated from the PTX element mappings. Against tcc/ir/ops.py on odd shapes (partial
    blocks, K not a multiple of the step): dense_a8w8 bit-exact (as the CPU kernel), dense_w4
    within 1e-5 relative on both paths (measured <= 4e-7), dense_sp24 within 1e-5 of the float64
    product of its float16 operands (measured ~2e-6 abs) and 2e-3 relative of the float32
    reference (measured ~4e-4); the float16 conversions bit-exact with numpy; the 2:4 layout
    decoded as mma.sp decodes its fragments equals the weight;
  * nvcc compiles every hand-written kernel and the TVM-generated source of tiny BERT/LLaMA
    programs (fp32, W8A8, int4, 2:4) for sm_80 and sm_90 (CUDA ELF images of those archs);
  * the artifact says it was not run, and calling it is one UserError.
nvcc-dependent tests skip with a reason when the CUDA toolkit is absent.
"""
from __future__ import annotations

import json

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tcc
from tcc.ir import ops
from tcc.backends.kernels.cuda import emulate, layout
from tcc.backends.kernels.quant_layout import pack_a8w8, pack_w4
from tcc.backends.tvm.cuda import compile_source, cubin_archs  # also registers tcc_tvm::dense_sp24
from tcc.backends.tvm.targets import get_target
from tcc.errors import UserError
from tcc.pipeline import PassContext, Pipeline

from test_elimination import build

HAVE_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
needs_nvcc = pytest.mark.skipif(not HAVE_NVCC, reason="nvcc (the CUDA toolkit) is not installed")
ARCHS = ["sm_80", "sm_90"]


def _t(a):
    return None if a is None else torch.from_numpy(np.asarray(a))


# -- targets ----------------------------------------------------------------------------------------

def test_cuda_presets():
    sm80, sm90 = get_target("cuda"), get_target("sm90")
    assert sm80.name == "sm80" and sm80.gpu_archs == ("sm_80", "sm_90") and sm80.tvm["arch"] == "sm_80"
    assert sm90.gpu_archs == ("sm_90",) and sm90.tvm["arch"] == "sm_90"
    assert not sm80.runs_here and not sm80.is_host and get_target("x86-64-v3").runs_here
    assert str(sm80.tvm_target().kind) == "cuda" and sm80.to_json()["device"] == "cuda"


# -- CPU math: float16 ------------------------------------------------------------------------------

def test_float16_conversions_match_numpy():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(emulate.from_f16(bits).view(np.uint32), want.view(np.uint32))  # NaN payloads too
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
                        want[np.isfinite(want)],                          # every half exactly
                        (want[1:31744] + want[:31743]) / 2,               # ties between neighbours
                        [65504.0, 65519.0, 65520.0, 1e6, -1e6, 2.0 ** -25, 2.0 ** -24 * 1.5]]).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.array_equal(emulate.to_f16(x), x.astype(np.float16).view(np.uint16))


# -- CPU math: dense_a8w8 ---------------------------------------------------------------------------

@pytest.mark.parametrize("asym,static", [(False, False), (True, False), (False, True), (True, True)])
def test_a8w8_quantization_matches_reference(asym, static):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 45)) * 3).astype(np.float32)
    x[2] = 0.0                        # an all-zero row: scale 1
    x[3] = np.abs(x[3]) + 0.5         # all positive: the asymmetric zero point is 0
    x_scale, x_zero = (np.array([0.03], np.float32), np.array([9.0], np.float32)) if static else (None, None)
    codes, s, z = emulate.quantize_rows(x, x_scale, x_zero, asym)
    q, rs, rz = ops.quantize_rows(torch.from_numpy(x), _t(x_scale), _t(x_zero), asym)
    assert np.array_equal(codes, q.numpy().astype(np.int32))
    assert np.array_equal(s, rs.numpy()[:, 0]) and np.array_equal(z, rz.numpy()[:, 0])


@pytest.mark.parametrize("m,n,k,asym,static,bias", [
    (5, 37, 70, False, False, True),     # one partial block, K not a multiple of 32 (nor of 4)
    (70, 130, 97, True, False, False),   # 2 x 3 blocks, the last ones partial
    (3, 17, 33, True, True, True),       # static asymmetric scale
    (65, 64, 64, False, True, False),
])
def test_a8w8_kernel_is_bit_exact(m, n, k, asym, static, bias):
    rng = np.random.default_rng(m * n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    qw = rng.integers(-127, 128, (n, k)).astype(np.int8)
    w_scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x_scale, x_zero = (np.array([0.02], np.float32), np.array([7.0], np.float32)) if static else (None, None)
    want = ops.dense_a8w8(torch.from_numpy(x), torch.from_numpy(qw), torch.from_numpy(w_scale), _t(b), _t(x_scale),
                          _t(x_zero), asym).numpy()
    packed, wsum = pack_a8w8(qw)
    got = emulate.dense_a8w8(x, packed, wsum, w_scale, b, x_scale, x_zero, asym)
    assert np.array_equal(got, want)


# -- CPU math: dense_w4 -----------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k,group,sym,path", [
    (3, 37, 64, 16, True, "simt"),     # decode-sized: CUDA cores
    (40, 70, 96, 32, False, "mma"),    # tensor cores, partial blocks, zero points
    (40, 70, 96, 32, False, "simt"),
    (17, 20, 48, 16, True, "auto"),    # > 16 rows, groups of 16: tensor cores
    (20, 33, 40, 8, True, "auto"),     # groups of 8: CUDA cores
])
def test_w4_kernels_match_reference(m, n, k, group, sym, path):
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    qw = ops.pack_int4(torch.from_numpy(rng.integers(0, 16, (n, k)).astype(np.uint8)))
    scale = torch.from_numpy((rng.random((n, k // group)) * 0.1 + 0.01).astype(np.float32))
    zero = None if sym else torch.from_numpy(rng.integers(0, 16, (n, k // group)).astype(np.uint8))
    b = rng.standard_normal(n).astype(np.float32)
    want = ops.dense_w4(torch.from_numpy(x), qw, scale, zero, group, torch.from_numpy(b)).numpy()
    got, ran = emulate.dense_w4(x, *pack_w4(qw, scale, zero), n, b, path)
    assert ran == {"auto": "mma" if group % 16 == 0 and m > 16 else "simt"}.get(path, path)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# -- CPU math: 2:4 ----------------------------------------------------------------------------------

def _weight_24(n: int, k: int, seed: int) -> np.ndarray:
    """A random [n, k] weight keeping the 2 largest of every 4 (K padded to 4 for the pattern), with
    an all-zero chunk and a chunk holding one nonzero at position 3."""
    rng = np.random.default_rng(seed)
    kp = -(-k // 4) * 4
    chunks = np.zeros((n, kp), np.float32)
    chunks[:, :k] = rng.standard_normal((n, k))
    chunks = chunks.reshape(n, kp // 4, 4)
    np.put_along_axis(chunks, np.argsort(np.abs(chunks), axis=-1)[..., :2], 0.0, axis=-1)
    chunks[0, 0] = 0.0
    chunks[1, 0] = [0.0, 0.0, 0.0, 1.5]
    return np.ascontiguousarray(chunks.reshape(n, kp)[:, :k])


@pytest.mark.parametrize("n,k", [(37, 70), (130, 96), (16, 8)])
def test_24_layout_decodes_as_mma_sp_reads_it(n, k):
    w = _weight_24(n, k, seed=n)
    values, meta = layout.compress_24(w)
    assert values.shape == (n, -(-k // 32) * 16) and meta.shape == (n, -(-k // 32) * 2)
    w16 = w.astype(np.float16).astype(np.float32)
    assert np.array_equal(layout.decompress_24(values, meta, k), w16)
    assert np.array_equal(emulate.sp24_weight(values, meta, k), w16)  # fragments -> instruction's decoding
    x, b = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32), np.ones(n, np.float32)
    ref = torch.ops.tcc_tvm.dense_sp24(torch.from_numpy(x), torch.from_numpy(values),
                                       torch.from_numpy(meta.view(np.int16)), torch.from_numpy(b), k).numpy()
    np.testing.assert_allclose(ref, x @ w16.T + b, rtol=0, atol=1e-5)


def test_24_layout_rejects_dense_chunks():
    w = _weight_24(8, 32, seed=1)
    w[2, 4:7] = 1.0
    assert not layout.is_24(w)
    with pytest.raises(UserError, match="more than 2 nonzeros"):
        layout.compress_24(w)


@pytest.mark.parametrize("m,n,k", [(5, 37, 70), (70, 130, 96), (1, 16, 8)])
def test_sp24_kernel_matches_reference(m, n, k):
    rng = np.random.default_rng(m + n)
    w = _weight_24(n, k, seed=k)
    x, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    got = emulate.dense_sp24(x, *layout.compress_24(w), n, b)
    f16 = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    assert np.abs(got - (f16(x) @ f16(w).T + b)).max() <= 1e-5 * np.abs(got).max()
    want = x @ w.T + b
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


# -- lowering (no nvcc) -----------------------------------------------------------------------------

def test_cuda_lowering_routes_ops_to_the_kernels():
    """device "cuda": 2:4 float32 linears -> dense_sp24 (compressed: 9/32 of their fp32 bytes), W8A8 ->
    the packed op; the kernelized graph still computes the program (fp16 weights: 2e-3)."""
    from tcc.backends.tvm.lower import kernelize
    prog, _ = build("llama")
    prog = Pipeline.parse("sparsify(pattern=2:4,min_size=0)").run(prog, PassContext(calibration=[prog.example_inputs()]))
    report = []
    gm = kernelize(prog.gm, prog.annotations, report, device="cuda")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.tcc_tvm.dense_sp24.default) == len(report) == 4 * 7  # q k v o gate up down
    assert all(r["kernel"].startswith("tcc_cuda_dense_sp24") and r["bytes_after"] * 32 == r["bytes_before"] * 9
               for r in report)
    feeds = prog.example_inputs()
    want = prog(feeds)["logits"]
    got = gm(*[torch.from_numpy(feeds[s.name]) for s in prog.inputs])
    got = (got[0] if isinstance(got, (tuple, list)) else got).detach().numpy()
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_cuda_lowering_refuses_fractional_int4_zero_points():
    """quantize zero=float runs on the CPU int4 kernel only: the CUDA lowering says so."""
    from tcc.backends.tvm.lower import kernelize
    prog, _ = build("llama")
    text = "quantize(weights=int4,group=32,sym=false,zero=float,min_size=0)"
    prog = Pipeline.parse(text).run(prog, PassContext(calibration=[prog.example_inputs()]))
    with pytest.raises(UserError, match="fractional zero points .* CPU kernels only"):
        kernelize(prog.gm, prog.annotations, [], device="cuda")
    kernelize(prog.gm, prog.annotations, [], device="cpu")


def test_cuda_target_refuses_cpu_only_formats_before_the_passes_run(tmp_path):
    """The formats the CUDA lowering refuses (above) are refused from the pipeline text, before any pass
    runs: `--preset w4a8 --target cuda` stopped after 55 s of GPTQ on SmolLM2 before; now at once."""
    from tcc.backends.tvm.lower import CUDA_REFUSALS, cuda_pipeline_refusal
    from tcc.pipeline.backend import get_backend, get_target
    cases = {"w4a8": "w4a8", "quantize(weights=int4,acts=int8)": "w4a8",
             "quantize(weights=int4,embeddings=true,embedding_format=int4)": "int4 embeddings",
             "q4": "fractional zero points", "drop-blocks(count=1),q4_1": "fractional zero points"}
    for text, kind in cases.items():
        err = cuda_pipeline_refusal(Pipeline.parse(text))
        assert err is not None and str(err).startswith(CUDA_REFUSALS[kind][0]), text
    for text in ("q4-fast", "w8a8", "q8", "q4_0", "quantize(weights=int8,acts=int8)", "bf16", ""):
        assert cuda_pipeline_refusal(Pipeline.parse(text) if text else Pipeline([])) is None, text
    backend = get_backend("tvm")
    with pytest.raises(UserError, match="W4A8"):
        backend.check_pipeline(Pipeline.parse("w4a8"), get_target("cuda"))
    backend.check_pipeline(Pipeline.parse("w4a8"), get_target("x86"))
    if not HAVE_NVCC:
        return
    # the whole compile: GPTQ without calibration text or a tokenizer would fail if it ran; the refusal comes first
    prog, _ = build("llama")
    with pytest.raises(UserError, match="W4A8"):
        tcc.compile(prog, "cuda", out=tmp_path / "art", pipeline="w4a8", latency=False)
    assert not (tmp_path / "art").exists()


# -- nvcc: hand-written kernels ---------------------------------------------------------------------

@needs_nvcc
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    from tcc.backends.kernels.build import build_cuda_kernels
    lib = build_cuda_kernels(tmp_path)
    data = lib.object.read_bytes()
    assert cubin_archs(data) == ARCHS
    assert len(re.findall(rb"\x7fELF\x02\x01\x01", data)) == 1 + 2 * len(ARCHS)  # the host object + 2 sources x 2 archs
    for kernel in (b"a8w8_kernel", b"w4_mma_kernel", b"w4_simt_kernel", b"sp24_kernel"):
        assert kernel in data
    assert set(lib.functions) == {f"tcc_cuda_dense_{op}{v}_f32" for op, vs in (
        ("a8w8", ("", "_nobias", "_static", "_static_nobias")), ("w4", ("", "_nobias")), ("sp24", ("", "_nobias")))
        for v in vs}
    for name in lib.functions:
        assert f"__tvm_ffi_{name}".encode() in data


@needs_nvcc
def test_nvcc_rejection_is_a_user_error(tmp_path):
    (tmp_path / "bad.cu").write_text("__global__ void k() { undeclared_thing(); }\n")
    with pytest.raises(UserError, match="rejected the CUDA code"):
        compile_source(tmp_path / "bad.cu", "sm_80", tmp_path / "bad.cubin")


# -- nvcc: end to end -------------------------------------------------------------------------------

CASES = {  # name: (arch, pipeline, the tcc kernel the library must call, or None)
    "bert-fp32": ("bert", "", None),
    "bert-w8a8": ("bert", "quantize(acts=int8,min_size=0)", "tcc_cuda_dense_a8w8_f32"),
    "llama-int4": ("llama", "quantize(weights=int4,group=16,min_size=0)", "tcc_cuda_dense_w4_nobias_f32"),
    "llama-2:4": ("llama", "sparsify(pattern=2:4,min_size=0)", "tcc_cuda_dense_sp24_nobias_f32"),
}


@pytest.fixture(scope="module", params=list(CASES))
def cuda_artifact(request, tmp_path_factory):
    if not HAVE_NVCC:
        pytest.skip("nvcc (the CUDA toolkit) is not installed")
    arch, pipeline, kernel = CASES[request.param]
    prog, _ = build(arch)
    out = tmp_path_factory.mktemp("cuda") / request.param.replace(":", "")
    art = tcc.compile(prog, "cuda", out=out, pipeline=pipeline)
    yield art, prog, kernel
    art.close()


@needs_nvcc
def test_cuda_artifact_holds_device_code_for_both_archs(cuda_artifact):
    art, _, kernel = cuda_artifact
    m = art.manifest
    assert m["run"]["verify"] == "not run: no GPU on this host"
    dc = m["device_code"]
    assert dc["run"] is False and dc["compiled_with"].startswith("nvcc ") and "not run on a GPU" in dc["note"]
    for arch in ARCHS:
        cubin = art.dir / dc[arch]["tvm_kernels"]
        assert cubin_archs(cubin.read_bytes()) == [arch]          # the TVM-generated source, compiled by nvcc
    lib = (art.dir / "model.so").read_bytes()
    assert cubin_archs(lib) == ARCHS                              # tcc's kernels, linked in as SASS
    assert "__global__" in (art.dir / "model.cu").read_text()
    for name in dc["sources"]["tcc"] + ["model.cu"]:
        assert name in m["files"]
    if kernel:
        assert kernel.encode() in lib                             # the host code calls it by name
    if "sparsity" in m:
        assert {r["storage"] for r in m["sparsity"]} == {"2:4 (float16 values + 2-bit indices)"}
    final = json.loads((art.dir / "report.json").read_text())["final"]    # what the passes changed, in PyTorch
    assert final["accuracy"]["measured_with"] == "pytorch" and "not run" in final["accuracy_note"]
    worst = max(e["max_rel_err"] for e in final["accuracy"]["vs_source"].values())
    assert (worst == 0.0) == (not m["pipeline"].replace("dce", "").strip(","))  # fp32: unchanged; compressed: moved


@needs_nvcc
def test_running_a_cuda_artifact_here_is_one_user_error(cuda_artifact):
    art, prog, _ = cuda_artifact
    with tcc.load(art.dir) as again:
        with pytest.raises(UserError, match="compiled for CUDA sm_80, sm_90; this host has no GPU"):
            again(prog.example_inputs())
