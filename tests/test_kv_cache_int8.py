"""The int8 KV cache (`tcc compile --kv-cache int8`, tcc.generation.kv_cached(..., kv_cache="int8")).

Each layer's cache holds int8 codes [B, Hkv, C, D] and one float32 scale per KV head and position
[B, Hkv, C], for k and for v: (D + 4) / (4 D) of the fp32 cache's bytes. Checked here:
- the kernel tcc_sdpa_kv_i8_f32 (decode: tiles of keys dequantized for one sgemm per KV head, values
  summed from the codes; longer chunks dequantized into the fp32 attention) against its reference op tcc::sdpa_kv_int8: outputs within 1e-4 absolute (measured <= 3e-7),
  and the codes and scales it writes equal the reference's exactly;
- tiny random-init decoders with grouped KV heads (Llama: 4 query heads over 2 KV heads; Qwen2: 6
  over 2, with q/k/v biases; hidden 96, head dim 24 / 16, 2 layers, vocab 128), traced with lengths
  1..48, compiled with an int8 cache: an 8-token prompt (one prefill chunk), then 32 greedy decode
  steps. The artifact equals the int8 cache's reference Program in PyTorch (1e-4 relative; measured
  3e-7); against the fp32 cache (PyTorch, which test_generation checks the fp32 artifact against)
  the logits stay within INT8_TOL relative (measured 3.0e-3 Llama, 4.1e-3 Qwen2), the 32 greedy
  tokens are the same, and so is the argmax at every teacher-forced step whose fp32 top-2 margin
  is more than twice the largest logit difference seen;
- perplexity through the cache (tcc.evaluate.perplexity_cached) equals the full forward pass's
  (tcc.evaluate.perplexity's windows) for the fp32 cache, and the int8 cache's is within 1 %;
- the manifest (kv_cache, cache specs and bytes), the CLI flag, and the errors where there is no KV
  cache to quantize.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM halves the core count on x86; split the work

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tcc
from tcc.frontends import frontend; from tcc.ir import ops
from tcc.errors import UserError
from tcc.evaluate import _nll, perplexity_cached, windows
from tcc.frontends.frontend import CausalLM
from tcc.generation import ProgramSession, kv_cached

from test_cli import assert_user_error, compile_fails, tcc_cli
from test_dynamic import tiny
from test_kernels import add_function

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

MAX = 48          # traced maximum length: the cache's context
PROMPT = 8        # the traced example length: the prefill chunk
STEPS = 32
INT8_TOL = 2e-2   # int8 vs fp32 cache: max |logit difference| / max |logit| over the 32 steps
rng = np.random.default_rng(0)


# -- the kernel against its reference op -------------------------------------------------------------

def kernel_case(b, h, hkv, length, ctx, d, pos, window=0, softcap=0.0):
    """New rows written at pos into int8 caches whose earlier rows hold codes (and later ones junk
    scales that must not be read); returns (inputs, scalars, reference output, reference caches)."""
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, h, length, d), (b, hkv, length, d), (b, hkv, length, d)))
    codes = [rng.integers(-127, 128, (b, hkv, ctx, d)).astype(np.int8) for _ in range(2)]
    scales = [(rng.random((b, hkv, ctx)) * 0.02).astype(np.float32) for _ in range(2)]
    for s in scales:
        s[:, :, pos + length:] *= 1e4
    caches = [codes[0], scales[0], codes[1], scales[1]]
    ref_caches = [torch.from_numpy(c.copy()) for c in caches]
    ref = ops.sdpa_kv_int8(*map(torch.from_numpy, (q, k, v)), *ref_caches, torch.tensor([pos]), 0.35, window, softcap)
    return [q, k, v, *caches, np.array([pos], np.int64)], [0.35, window, softcap], ref.numpy(), [c.numpy() for c in ref_caches]


KERNEL_CASES = {
    "decode_gqa": kernel_case(1, 6, 2, 1, 40, 16, pos=30),          # on the codes: one task per head
    "decode_batch2": kernel_case(2, 4, 4, 1, 16, 8, pos=15),        # the last row of the cache
    "chunk_67": kernel_case(1, 4, 2, 67, 80, 8, pos=9),             # dequantized, two query blocks
    "chunk_first": kernel_case(1, 6, 3, 5, 16, 8, pos=0),
    "window_chunk": kernel_case(1, 4, 2, 6, 24, 8, pos=7, window=4),
    "window_decode": kernel_case(1, 4, 2, 1, 24, 8, pos=20, window=5),
    "softcap": kernel_case(1, 4, 2, 5, 16, 8, pos=3, softcap=0.5),
    "softcap_decode": kernel_case(1, 4, 2, 1, 16, 8, pos=9, softcap=0.5),
    "decode_3rows_window": kernel_case(1, 6, 2, 3, 300, 16, pos=280, window=7),  # 2 key tiles, 3 query rows
}


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    from tcc.backends.kernels import build
    kernels = build.build_kernels("x86_64", tmp_path_factory.mktemp("kernels"))
    bb = relax.BlockBuilder()
    for name, (arrays, scalars, ref, _) in KERNEL_CASES.items():
        add_function(bb, name, "tcc_sdpa_kv_i8_f32", arrays, scalars, ref.shape)
    lib = tvm.runtime.load_static_library(str(kernels.object), list(kernels.functions))
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    so = tmp_path_factory.mktemp("module") / "kv_int8.so"
    relax.build(bb.get().with_attr("external_mods", [lib]), target).export_library(str(so), options=kernels.link_options())
    return relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernel_matches_reference(vm, name):
    arrays, _, ref, ref_caches = KERNEL_CASES[name]
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    got = vm[name](*tensors).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    for t, want in zip(tensors[3:7], ref_caches):  # the codes and scales written in place
        assert np.array_equal(t.numpy(), want)


def test_quantize_kv_rows():
    x = torch.tensor([[0.5, -1.27, 0.004, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scales = ops.quantize_kv(x)
    assert scales.tolist() == pytest.approx([0.01, 1.0]) and codes.dtype == torch.int8
    assert codes.tolist() == [[50, -127, 0, 0], [0, 0, 0, 0]]


# -- tiny decoders, compiled ---------------------------------------------------------------------------

def decoder(arch: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, hidden_size=96, num_hidden_layers=2, intermediate_size=192, vocab_size=128,
                                  max_position_embeddings=64, num_attention_heads=4 if arch == "llama" else 6,
                                  num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return frontend.trace(CausalLM(model), example_inputs={"input_ids": torch.randint(0, 128, (1, PROMPT))},
                          output_names=["logits"], task="causal-lm", max_seq_len=MAX)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def compiled(request, tmp_path_factory):
    program = decoder(request.param)
    art = tcc.compile(program, "x86", out=tmp_path_factory.mktemp(request.param) / "a", latency=False, kv_cache="int8")
    yield request.param, program, art
    art.close()


def greedy(session, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    logits = [session.prefill(np.array(prompt), 0, len(prompt) - 1)]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(session.decode(tokens[-1], len(prompt) + i))
    return tokens, np.stack(logits)


def forced(session, ids: list[int]) -> np.ndarray:
    """Logits at positions PROMPT-1 .. len(ids)-1: the prompt prefilled, the rest decoded."""
    out = [session.prefill(np.array(ids[:PROMPT]), 0, PROMPT - 1)]
    return np.stack(out + [session.decode(ids[p], p) for p in range(PROMPT, len(ids))])


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_int8_cache_decode_tracks_the_fp32_cache(compiled):
    arch, program, art = compiled
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 128, PROMPT)]
    want_tokens, _ = greedy(ProgramSession(kv_cached(program, MAX)), prompt, STEPS)
    got_tokens, _ = greedy(art.session(), prompt, STEPS)
    assert got_tokens == want_tokens
    ids = prompt + want_tokens
    got = forced(art.session(), ids)
    fp32 = forced(ProgramSession(kv_cached(program, MAX)), ids)
    assert rel(got, forced(ProgramSession(kv_cached(program, MAX, "int8")), ids)) <= 1e-4  # the kernel = its op
    err = rel(got, fp32)
    assert 0 < err <= INT8_TOL, f"{arch}: int8 vs fp32 cache {err:.2e}"
    top2 = np.sort(fp32, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - fp32).max()
    assert clear.sum() >= STEPS // 2 and (got.argmax(-1) == fp32.argmax(-1))[clear].all()


def test_manifest_records_the_int8_cache(compiled):
    arch, program, art = compiled
    gen = art.manifest["generation"]
    assert gen["kv_cache"] == "int8"
    hkv, d = 2, 96 // (4 if arch == "llama" else 6)
    per_layer = [("cache_k", "int8", [1, hkv, MAX, d]), ("cache_k_scale", "float32", [1, hkv, MAX]),
                 ("cache_v", "int8", [1, hkv, MAX, d]), ("cache_v_scale", "float32", [1, hkv, MAX])]
    assert [(c["name"], c["dtype"], c["shape"]) for c in gen["caches"]] == [
        (f"{n}.{i}", t, s) for i in (0, 1) for n, t, s in per_layer]
    assert gen["cache_bytes"] == 2 * 2 * hkv * MAX * (d + 4)
    fp32 = kv_cached(program, MAX).manifest(PROMPT)
    assert fp32["kv_cache"] == "fp32" and fp32["cache_bytes"] == 2 * 2 * hkv * MAX * d * 4
    assert gen["cache_bytes"] / fp32["cache_bytes"] == pytest.approx((d + 4) / (4 * d))


def test_perplexity_through_the_cache(compiled):
    _, program, art = compiled
    ids = np.random.default_rng(3).integers(0, 128, 80)
    seq_len, stride = 40, 20
    nll, count = 0.0, 0
    for begin, first in windows(len(ids), seq_len, stride):  # the full forward's windows, as tcc eval scores
        logits = program({"input_ids": ids[None, begin:begin + seq_len]})["logits"][0]
        pos = np.arange(first, begin + seq_len)
        nll += _nll(logits[pos - begin - 1], ids[pos])
        count += len(pos)
    full = np.exp(nll / count)
    fp32 = perplexity_cached(lambda: ProgramSession(kv_cached(program, MAX)), ids, seq_len, PROMPT, stride)
    assert fp32["tokens"] == count == 79 and fp32["value"] == pytest.approx(full, rel=1e-5)
    int8 = perplexity_cached(art.session, ids, seq_len, PROMPT, stride)
    assert int8["value"] != fp32["value"] and int8["value"] == pytest.approx(fp32["value"], rel=1e-2)


# -- options and errors ----------------------------------------------------------------------------------

def test_kv_cached_refuses_unknown_formats():
    with pytest.raises(UserError, match="not a KV-cache format"):
        kv_cached(tiny("llama"), 16, "int4")


def test_compile_refuses_int8_cache_without_generation(tmp_path):
    with pytest.raises(UserError, match="--kv-cache int8 needs a KV cache.*not causal-lm"):
        tcc.compile(tiny("bert"), "x86", out=tmp_path / "a", kv_cache="int8")
    with pytest.raises(UserError, match="which --no-generate turns off"):
        tcc.compile(tiny("llama"), "x86", out=tmp_path / "b", kv_cache="int8", generate=False)
    assert not any(tmp_path.iterdir())


def test_cli_flag(tmp_path, tiny_bert_dir):
    work = tmp_path / "work"
    work.mkdir()
    assert_user_error(compile_fails(tiny_bert_dir, work, "--kv-cache", "int8"), "--kv-cache int8", "not a causal LM")
    r = tcc_cli("compile", "--help")
    assert "--kv-cache {fp32,int8}" in r.stdout and "scale per KV head and position" in " ".join(r.stdout.split())
    r = tcc_cli("eval", "--help")
    assert "--kv-cache" in r.stdout and "--window" in r.stdout
