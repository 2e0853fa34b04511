"""bf16 weights (issue 15): the kernels of backends/kernels/bf16_kernels.cc against tcc/ir/ops.py's
tcc::dense_bf16 / tcc::embedding_bf16, on x86-64 with AVX-512 BF16 (-march=native here: vdpbf16ps)
and without it (-march=x86-64-v3: bf16 -> fp32 shift + FMA), on arm64 under qemu (-march=armv8-a,
bf16 storage, fp32 math); then the `bf16` pass and `--dtype` end to end on tiny random decoders.

Kernel tolerance: |got - ref| <= 2^-15 * (|x| @ |W|^T + |b|) per element. The reference widens
each bf16 weight exactly and keeps x in fp32; vdpbf16ps multiplies bf16 x bf16, so the kernel
splits x into hi = bf16(x) and lo = bf16(x - hi), which carries x to within 2^-16 |x|; the other
2^-16 covers fp32 summation (order, and vdpbf16ps's rounding of each step). The FMA path differs
from the reference only in summation order. An unwidened or misplaced weight fails by orders of
magnitude (bf16's own rounding is 2^-8).

Model tolerance: a tiny decoder compiled `--dtype bf16` vs the same checkpoint in PyTorch with its
weights rounded to bf16 (the program the artifact computes): relative logit error <= 1e-4; vs the
fp32 model: within bf16 rounding (relative <= 2e-2), top-1 equal on most positions.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from tcc.ir import ops
from tcc.backends.kernels import build

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from test_kernels import add_function  # noqa: E402
from test_quant_kernels import _host_has, check  # noqa: E402
from test_sparse_kernels import arm64_artifact  # noqa: E402

RTOL = 2.0 ** -15
rng = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 (round to nearest even, torch's) bit patterns as int16, as the artifact stores them."""
    return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()


def widened(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits).view(torch.bfloat16).to(torch.float32).numpy()


@dataclasses.dataclass
class Case:
    kernel: str
    arrays: list[np.ndarray]
    ref: np.ndarray
    bound: np.ndarray | None  # None: exact
    out_dtype: str = "float32"


def dense_case(lead, k, n, bias=True, x=None):
    x = f32(*lead, k) if x is None else x
    w = bf16_bits(f32(n, k, scale=0.05))
    b = f32(n)
    wt = torch.from_numpy(w).view(torch.bfloat16)
    ref = ops.dense_bf16(torch.from_numpy(x), wt, torch.from_numpy(b) if bias else None).numpy()
    bound = RTOL * (np.abs(x).astype(np.float64) @ np.abs(widened(w)).T.astype(np.float64) + (np.abs(b) if bias else 0))
    return Case("tcc_dense_bf16_f32" if bias else "tcc_dense_bf16_nobias_f32", [x, w] + ([b] if bias else []), ref, bound)


def embedding_case(ids_shape, v, d):
    w = bf16_bits(f32(v, d))
    ids = rng.integers(0, v, ids_shape).astype(np.int64)
    ref = ops.embedding_bf16(torch.from_numpy(ids), torch.from_numpy(w).view(torch.bfloat16)).numpy()
    return Case("tcc_embedding_bf16_f32", [ids, w], ref, None)


def wide_range_rows(k):
    """Rows with magnitudes far apart (where bf16(x) alone would lose 2^-9 of x), one all zero."""
    x = f32(3, k) * np.logspace(-3, 3, k).astype(np.float32)
    x[1] = 0
    return x


CASES = {
    "m1": dense_case((1,), 896, 1152),                    # decode GEMV, K a multiple of 32
    "m1_odd": dense_case((1,), 333, 37),                  # K and N odd: masked tail, single rows
    "m2_nobias": dense_case((2,), 100, 70, bias=False),
    "m3_wide": dense_case((), 200, 45, x=wide_range_rows(200)),
    "m4": dense_case((4,), 576, 129),
    "m5_sgemm": dense_case((5,), 64, 48),                 # first size on the sgemm path
    "m40_odd": dense_case((2, 20), 333, 37),              # M > 32, odd K and N
    "tall": dense_case((70,), 40, 20),                    # M > N: rows split
    "k_small": dense_case((1,), 7, 3),                    # K below one vector
    "embedding": embedding_case((2, 9), 50, 33),
}

BAD = {  # name -> (kernel, arrays, out shape, message)
    "bad_w_dtype": ("tcc_dense_bf16_nobias_f32", [f32(2, 40), f32(37, 40)], (2, 37),
                    r"argument 'w' must be int16, got float32"),
    "bad_w_k": ("tcc_dense_bf16_nobias_f32", [f32(2, 40), bf16_bits(f32(37, 41))], (2, 37),
                r"tcc_dense_bf16_nobias_f32: argument 'w' has shape \[37, 41\], its dim 1 must be 40"),
    "bad_bias": ("tcc_dense_bf16_f32", [f32(2, 40), bf16_bits(f32(37, 40)), f32(36)], (2, 37),
                 r"argument 'b' has shape \[36\], its dim 0 must be 37"),
}


def bf16_path(lib) -> str:
    data = lib.object.read_bytes()
    at = data.index(b"tcc_bf16_path=") + len("tcc_bf16_path=")
    return data[at:data.index(b";", at)].decode()


X86_BUILDS = {"native": "avx512bf16", "x86-64-v3": "fp32-fma"}


@pytest.fixture(scope="module", params=list(X86_BUILDS))
def x86(request, tmp_path_factory):
    march = request.param
    if march == "native" and not _host_has("avx512_bf16"):
        pytest.skip("the host has no AVX-512 BF16")
    out = tmp_path_factory.mktemp(f"bf16-{march}")
    lib = build.build_kernels("x86_64", out, [f"-march={march}"])
    bb = relax.BlockBuilder()
    for name, c in CASES.items():
        add_function(bb, name, c.kernel, c.arrays, [], c.ref.shape)
    for name, (kernel, arrays, out_shape, _) in BAD.items():
        add_function(bb, name, kernel, arrays, [], out_shape)
    mod = bb.get().with_attr("external_mods", [tvm.runtime.load_static_library(str(lib.object), list(lib.functions))])
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    so = out / "bf16_kernels_test.so"
    relax.build(mod, target).export_library(str(so), options=lib.link_options())
    return march, lib, relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


def _run(vm, name, arrays):
    return vm[name](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def test_build_compiles_the_intended_bf16_path(x86):
    march, lib, _ = x86
    assert bf16_path(lib) == X86_BUILDS[march]


@pytest.mark.parametrize("name", list(CASES))
def test_x86_kernel_matches_reference(x86, name):
    case = CASES[name]
    check(name, case, _run(x86[2], name, case.arrays))


@pytest.mark.parametrize("name", list(BAD))
def test_kernel_rejects_bad_arguments(x86, name):
    _, arrays, _, message = BAD[name]
    with pytest.raises((TypeError, ValueError), match=message):
        _run(x86[2], name, arrays)


def test_hi_lo_split_is_needed():
    """The bound is tight enough to catch a kernel that rounds x to bf16 (one vdpbf16ps, no lo half)."""
    c = CASES["m3_wide"]
    x, w = c.arrays[0], widened(c.arrays[1])
    rounded_x = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert (np.abs(rounded_x @ w.T + c.arrays[2] - c.ref) > c.bound).any()


# ---------------------------------------------------------------------------------------------
# arm64 under qemu: one artifact whose main runs a few cases
# ---------------------------------------------------------------------------------------------

ARM_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
ARM_CASES = {"m1_odd": CASES["m1_odd"], "m2": dense_case((2,), 64, 37, bias=False), "m40": CASES["m40_odd"],
             "embedding": CASES["embedding"]}


@pytest.mark.arm64
@pytest.mark.skipif(any(shutil.which(x) is None for x in ARM_TOOLS),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_arm64_kernels_match_reference(tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    lib = build.build_kernels("aarch64", tmp_path / "kernels", ["-march=armv8-a"])
    assert bf16_path(lib) == "fp32-fma"
    arm64_artifact(lib, tmp_path, ARM_CASES)
    with Arm64Session(tmp_path) as session:
        got = session({f"in_{n}": c.arrays[0] for n, c in ARM_CASES.items()})
    for name, case in ARM_CASES.items():
        check(name, case, got[name])


# ---------------------------------------------------------------------------------------------
# The bf16 pass and --dtype, end to end on a tiny random Llama (tied embeddings: one bf16 table)
# ---------------------------------------------------------------------------------------------

LOGIT_RTOL_PROGRAM = 1e-4  # artifact vs the bf16-weight program in PyTorch (kernel-level error only)
LOGIT_RTOL_FP32 = 2e-2     # artifact vs the fp32 model: bf16 rounding of every weight (2^-9 each)


def _tiny_llama(path, dtype, hidden=64, intermediate=160, vocab=500):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                               max_position_embeddings=64, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return model.float()


@pytest.fixture(scope="module")
def fp32_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-fp32")
    return path, _tiny_llama(path, torch.float32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_bf16_pass_rounds_weights_and_shares_a_tied_table(fp32_llama):
    import tcc
    from tcc.pipeline import Pipeline
    path, _ = fp32_llama
    prog = tcc.trace(str(path), seq_len=8)
    fp32_bytes = prog.param_bytes()
    feeds = prog.example_inputs(seed=3)
    want = prog(feeds)["logits"]
    out = Pipeline.parse("bf16(skip=[layers.1.mlp.down_proj])").run(prog)
    ops_used = {str(n.target) for n in out.gm.graph.nodes if n.op == "call_function"}
    assert "tcc.dense_bf16.default" in ops_used and "tcc.embedding_bf16.default" in ops_used
    tensors = out.named_tensors()
    bf16 = {n for n, t in tensors.items() if t.dtype == torch.bfloat16}
    table = [n for n in bf16 if tuple(tensors[n].shape) == (500, 64)]
    assert len(table) == 1 and not any(tuple(t.shape) == (500, 64) for n, t in tensors.items() if n not in table)
    readers = {str(u.target) for g in out.gm.graph.nodes if g.op == "get_attr" and g.target == table[0] for u in g.users}
    assert readers == {"tcc.embedding_bf16.default", "tcc.dense_bf16.default"}  # the tied table, once
    down = [n for n in tensors if n.endswith("layers.1.mlp.down_proj.weight")]
    assert len(down) == 1 and tensors[down[0]].dtype == torch.float32  # skipped
    assert all(t.dtype == torch.float32 for n, t in tensors.items() if "norm" in n)
    assert 0.5 < out.param_bytes() / fp32_bytes < 0.56
    got = out(feeds)["logits"]
    assert 0 < _rel(got, want) <= LOGIT_RTOL_FP32


def _resident_bytes(path) -> int:
    """This process's resident bytes of the mappings of file `path` (/proc/self/smaps)."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:
                mapped = len(head) > 5 and head[5] == str(path)
            elif mapped and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")
def test_bf16_pass_hands_back_the_float32_weights(tmp_path):
    """On an fp32 checkpoint (mapped from its file by transformers) the bf16 pass leaves no float32
    weight resident beside its bf16 copy (issue 15: the 1B compile held both, 8.4 GB for 4.7 GB of
    weights), and its results are the same: each bf16 tensor is its float32 weight rounded (bit for
    bit), the Program's logits those of the model with its weights rounded to bf16 in PyTorch."""
    import tcc
    from tcc.pipeline import Pipeline
    from transformers import AutoModelForCausalLM
    path = tmp_path / "llama"
    _tiny_llama(path, torch.float32, hidden=512, intermediate=1376, vocab=4096)  # 31 MB
    prog = tcc.trace(str(path), seq_len=8)
    weights = {n: t for n, t in prog.named_tensors().items() if t.dim() == 2}
    file = next(path.glob("*.safetensors")).resolve()
    size = file.stat().st_size
    assert _resident_bytes(file) > 0.9 * size  # traced and run once: the checkpoint's pages are resident
    out = Pipeline.parse("bf16").run(prog, in_place=True)
    # the float32 weights' pages are handed back; what stays: the norms' pages, and the kernel's fault-around
    # (up to 16 neighbouring pages mapped with each one the run after the pass reads)
    assert _resident_bytes(file) < 0.1 * size
    stored = {n.removesuffix("_bf16"): t for n, t in out.named_tensors().items() if t.dtype == torch.bfloat16}
    assert set(stored) <= set(weights)  # every matrix converted (the tied table once, under one of its names)
    assert {weights[n].data_ptr() for n in stored} == {t.data_ptr() for t in weights.values()}
    for name, t in stored.items():  # read again from the file where paged out: the same values
        assert torch.equal(t.view(torch.int16), weights[name].to(torch.bfloat16).view(torch.int16)), name
    ids = np.random.default_rng(7).integers(0, 4096, (1, 8)).astype(np.int64)
    ref = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    assert _rel(out({"input_ids": ids})["logits"], _logits(ref, ids)) <= 1e-5


def test_dtype_bf16_artifact_matches_torch(fp32_llama, tmp_path):
    """--dtype bf16 on an fp32 checkpoint: prefill/decode included (the M = 1 kernel path)."""
    import tcc
    path, model = fp32_llama
    art = tcc.compile(str(path), "x86", out=tmp_path / "a", seq_len=8, max_context=32, latency=False, cache=False,
                      dtype="bf16")
    m = art.manifest
    assert m["pipeline"].startswith("dce,bf16(")
    assert 0.45 < m["sizes"]["weight_bytes"] / m["sizes"]["source_param_bytes"] < 0.55
    ids = np.random.default_rng(5).integers(0, 500, (1, 8)).astype(np.int64)
    got = art({"input_ids": ids})["logits"]
    ref = type(model)(model.config).eval()
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert _rel(got, _logits(ref, ids)) <= LOGIT_RTOL_PROGRAM
    assert _rel(got, _logits(model, ids)) <= LOGIT_RTOL_FP32
    gen = art.generate(ids[0].tolist(), max_new_tokens=4, stop_at_eos=False)["token_ids"]
    seq = ids
    for _ in range(4):  # greedy, full forward each step
        seq = np.concatenate([seq, _logits(ref, seq)[:, -1:].argmax(-1)], axis=1)
    assert gen == seq[0, 8:].tolist()
    art.close()


def test_bf16_checkpoint_stays_bf16_unless_asked(tmp_path):
    import tcc
    path = tmp_path / "llama-bf16"
    model = _tiny_llama(path, torch.bfloat16)
    kept = tcc.compile(str(path), "x86", out=tmp_path / "kept", seq_len=8, generate=False, latency=False, cache=False)
    fp32 = tcc.compile(str(path), "x86", out=tmp_path / "fp32", seq_len=8, generate=False, latency=False,
                       cache=False, dtype="fp32")
    assert kept.manifest["pipeline"].startswith("dce,bf16(") and fp32.manifest["pipeline"] == "dce"
    ratio = kept.manifest["sizes"]["weight_bytes"] / fp32.manifest["sizes"]["weight_bytes"]
    assert 0.45 < ratio < 0.55
    ids = np.random.default_rng(6).integers(0, 500, (1, 8)).astype(np.int64)
    want = _logits(model, ids)  # the checkpoint's bf16 weights, fp32 math: both artifacts compute this
    for art in (kept, fp32):
        assert _rel(art({"input_ids": ids})["logits"], want) <= LOGIT_RTOL_PROGRAM
        art.close()


def test_dtype_bf16_refused_where_it_cannot_run(fp32_llama, tmp_path):
    import tcc
    from tcc.errors import UserError
    with pytest.raises(UserError, match="bf16 weights run on tcc's CPU kernels"):
        tcc.compile(str(fp32_llama[0]), "x86", out=tmp_path / "o", backend="onnxruntime", dtype="bf16", seq_len=8)
    with pytest.raises(UserError, match="contradicts"):
        tcc.compile(str(fp32_llama[0]), "x86", out=tmp_path / "o", pipeline="bf16", dtype="fp32", seq_len=8,
                    generate=False)
    assert not (tmp_path / "o").exists()


def test_recipe_dtype_is_the_flag(tmp_path):
    from tcc import recipe
    from tcc.cli import build_parser
    (tmp_path / "r.toml").write_text('model = "smollm2"\ndtype = "bf16"\n')
    r = recipe.load(tmp_path / "r.toml")
    assert r.settings == {"--dtype": "bf16"}
    assert build_parser().parse_args(["compile", "m", *[f"{k}={v}" for k, v in r.settings.items()]]).dtype == "bf16"
