"""End to end: tcc.trace -> tcc.compile -> tcc.load on real and random-init models.

Bounds (measured on the 2-core AMD EPYC dev machine, stated next to each test):
* MiniLM (fp32): the artifact matches the Program in PyTorch within 1e-4 max abs error on fresh
  inputs whose attention mask has padding zeros, on x86 (seq 16) and on arm64 under qemu (seq 8).
* SmolLM2-135M (fp32): logits within 1e-3 relative (max abs / max |ref|), same argmax everywhere.
* quantize-weights(bits=8) on MiniLM: linear layers <= 0.27x their fp32 bytes (measured 0.252x),
  per-token cosine with the fp32 output >= 0.99 (worst token measured 0.9988).
* The same model, pipeline and target compiled twice give byte-identical files and manifests that
  differ only in "run".
* Seven architectures, random-init (hidden 64, 2 layers, seq 8), match their eager nn.Module
  within 1e-4.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import tcc
from conftest import fresh_feeds
from tcc.frontends import models
from tcc.artifact import sha256
from tcc.errors import UserError
from tcc.frontends.frontend import CausalLM, FeatureExtraction
from test_structure import ARCHS, TINY

FP32_ABS = 1e-4
LOGITS_REL = 1e-3


def run(artifact_dir, feeds: list[dict]) -> list[dict]:
    with tcc.load(artifact_dir) as art:
        return [art(f) for f in feeds]


def max_abs(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in want)


def check_encoder(compiled, tol: float = FP32_ABS) -> float:
    got = run(compiled.dir, compiled.feeds)
    err = max(max_abs(g, w) for g, w in zip(got, compiled.want))
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"
    return err


def check_causal_lm(compiled) -> float:
    (got,), (want,) = run(compiled.dir, compiled.feeds), compiled.want
    logits, ref = got["logits"], want["logits"]
    rel = float(np.max(np.abs(logits - ref)) / np.max(np.abs(ref)))
    assert rel <= LOGITS_REL, f"relative logits error {rel:.2e} > {LOGITS_REL:.0e}"
    np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))
    return rel


# -- real models ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_x86_matches_pytorch_with_padding(minilm_x86):
    padded, full = minilm_x86.want
    kept = minilm_x86.feeds[0]["attention_mask"][0].astype(bool)
    # the padding changes the real tokens' outputs, so a mask baked in at trace time would fail
    assert np.max(np.abs(padded["last_hidden_state"][0, kept] - full["last_hidden_state"][0, kept])) > 1e-2
    check_encoder(minilm_x86)  # measured 2.9e-06


@pytest.mark.slow
def test_minilm_program_matches_transformers_eager(minilm_x86):
    """The reference itself: the traced Program agrees with the Hugging Face model run eagerly."""
    hf, _, _ = models.load_hf(models.resolve("minilm"))
    for feed, want in zip(minilm_x86.feeds, minilm_x86.want):
        with torch.no_grad():
            ref = hf(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        assert np.max(np.abs(ref - want["last_hidden_state"])) <= 1e-5


@pytest.mark.slow
def test_smollm2_x86_matches_pytorch(smollm2_x86):
    check_causal_lm(smollm2_x86)  # measured 1.9e-06 relative; closest top-2 logits 0.068 apart


@pytest.mark.slow
@pytest.mark.arm64
def test_minilm_arm64_under_qemu_matches_pytorch(minilm_arm64):
    check_encoder(minilm_arm64)  # measured 2.4e-06


@pytest.mark.slow
@pytest.mark.arm64
def test_smollm2_arm64_under_qemu_matches_pytorch(smollm2_arm64):
    check_causal_lm(smollm2_arm64)  # measured 3.7e-06 relative


# -- quantize-weights on MiniLM --------------------------------------------------------------------

def _quantized_records(compiled) -> list[dict]:
    manifest = json.loads((compiled.dir / "manifest.json").read_text())
    (record,) = [r for r in manifest["passes"] if r["pass"] == "quantize-weights"]
    return record["details"]["quantized"]


def _artifact_bytes(compiled) -> int:
    return sum((compiled.dir / f).stat().st_size for f in ("model.so", "weights.safetensors"))


@pytest.mark.slow
def test_quantized_minilm_accuracy_and_size(minilm_q8_x86, minilm_x86):
    quantized = _quantized_records(minilm_q8_x86)
    assert len(quantized) == 6 * 6  # q, k, v, o, up, down in each of the 6 blocks
    before = sum(q["bytes_before"] for q in quantized)
    after = sum(q["bytes_after"] for q in quantized)
    assert after <= 0.27 * before, f"linear layers {after / before:.3f}x"  # measured 0.252x

    # the files on disk shrink by what the linear layers save: everything else stays as in fp32
    fp32_total = _artifact_bytes(minilm_x86)
    assert _artifact_bytes(minilm_q8_x86) <= fp32_total - before + 0.27 * before  # measured 58.8 vs 90.5 MB

    # accuracy against the fp32 Program on fresh inputs (want = the source, before any pass)
    worst = 1.0
    for got, want, feed in zip(run(minilm_q8_x86.dir, minilm_q8_x86.feeds), minilm_q8_x86.want, minilm_q8_x86.feeds):
        kept = feed["attention_mask"][0].astype(bool)
        a, b = got["last_hidden_state"][0, kept], want["last_hidden_state"][0, kept]
        cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        worst = min(worst, float(cos.min()))
    assert worst >= 0.99, f"per-token cosine {worst:.4f}"  # measured 0.9988 (mean-pooled: 0.9993)


@pytest.mark.slow
def test_quantized_weights_are_int8_in_safetensors(minilm_q8_x86):
    weights = load_file(str(minilm_q8_x86.dir / "weights.safetensors"))
    quantized = _quantized_records(minilm_q8_x86)
    # (q/k/v share an input, so the backend stores them as one fused int8 tensor)
    int8 = sum(w.nbytes for w in weights.values() if w.dtype == np.int8)
    assert int8 == sum(q["shape"][0] * q["shape"][1] for q in quantized)
    assert not any(q["weight"] in weights for q in quantized)
    scales = 4 * sum(q["shape"][0] for q in quantized)
    assert int8 + scales <= 0.27 * sum(q["bytes_before"] for q in quantized)


# -- determinism ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_inputs_give_byte_identical_artifact(minilm_q8_x86, tmp_path):
    again = tmp_path / "again"
    program = tcc.trace("minilm", seq_len=16)
    tcc.compile(program, "x86", out=again, pipeline="quantize-weights(bits=8)", cache=False).close()  # a real second build
    for f in ("weights.safetensors", "model.so"):  # report.md holds this run's timings, as report.json does
        assert sha256(again / f) == sha256(minilm_q8_x86.dir / f), f"{f} differs between two compiles"
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (minilm_q8_x86.dir, again))
    assert set(first) == set(second)
    assert without_run(first) == without_run(second)


def without_run(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "run"}


def test_skipping_verification_changes_only_the_run_field(tiny_bert_dir, tmp_path):
    dirs = [tmp_path / "verified", tmp_path / "unverified"]
    for d, verify in zip(dirs, (True, False)):
        tcc.compile(str(tiny_bert_dir), "x86", out=d, seq_len=8, verify=verify).close()
    verified, unverified = (json.loads((d / "manifest.json").read_text()) for d in dirs)
    assert "verify" in verified["run"] and "verify" not in unverified["run"]
    assert without_run(verified) == without_run(unverified)


# -- artifact contents --------------------------------------------------------------------------------

@pytest.mark.slow
def test_artifact_manifest_and_files(minilm_x86, minilm_dir):
    d = minilm_x86.dir
    m = json.loads((d / "manifest.json").read_text())
    assert m["tcc_version"] == tcc.__version__
    assert m["source"]["sha256"] == models.model_hash(minilm_dir)
    assert m["pipeline"] == "dce"
    assert m["target"]["name"] == "x86" and m["target"]["arch"] == "x86_64"
    assert m["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 16], "range": [0, 30522]},
                           {"name": "attention_mask", "dtype": "int64", "shape": [1, 16], "range": [0, 2]}]
    assert m["outputs"] == [{"name": "last_hidden_state", "dtype": "float32", "shape": [1, 16, 384]}]
    weights = load_file(str(d / "weights.safetensors"))
    assert sorted(m["params"]) == sorted(weights) and len(set(m["params"])) == len(m["params"])
    assert m["sizes"]["weight_bytes"] == sum(a.nbytes for a in weights.values())
    assert set(m["files"]) == {"model.so", "weights.safetensors"}
    for f, digest in m["files"].items():
        assert sha256(d / f) == digest
    assert "dce" in (d / "report.md").read_text()
    assert m["run"]["verify"]["last_hidden_state"]["max_abs_err"] <= FP32_ABS
    assert sorted(p.name for p in d.iterdir()) == ["build.log", "manifest.json", "model.so", "report.html",
                                                   "report.json", "report.md", "weights.safetensors"]


@pytest.mark.slow
def test_load_refuses_modified_weights(minilm_x86, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(minilm_x86.dir, copy)
    tcc.load(copy).close()  # an intact copy loads
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="sha256"):
        tcc.load(copy)


# -- random-init architectures ------------------------------------------------------------------------

TINY_ARCHS = ["gpt2", "opt", "qwen2", "gpt_neox", "distilbert", "roberta", "llama"]


def tiny_module(arch: str):
    """(eager wrapper module, example inputs) for a random-init model of `arch` (test_structure's
    configs, 2 layers, seq 8)."""
    model_type, causal, overrides, _ = ARCHS[arch]
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides, "num_hidden_layers": 2})
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    if causal:
        return CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")).eval(), {"input_ids": ids}
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    return FeatureExtraction(model).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_random_init_architecture_matches_eager(arch, tmp_path):
    module, example = tiny_module(arch)
    program = tcc.trace(module, example_inputs=example)
    assert len(program.info.blocks) == 2
    tcc.compile(program, "x86", out=tmp_path / arch, verify=False).close()
    feeds = fresh_feeds(program, pad=3)
    for feed, got in zip(feeds, run(tmp_path / arch, feeds)):
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in feed.values())).numpy()
        err = float(np.max(np.abs(got["output"] - want)))
        assert err <= FP32_ABS, f"{arch}: max abs error {err:.2e}"


def test_artifact_rebuilt_in_place_loads_the_new_library(tmp_path):
    """Compiling a different program into the same directory and loading it again in the same
    process runs the new library (the loader names libraries by content; with the plain path the
    dynamic loader handed back the first one)."""
    from test_elimination import build
    from tcc.pipeline import Pipeline

    prog, _ = build("llama")
    pruned = Pipeline.parse("drop-attention(layers=[1,2])").run(prog.clone())
    feeds = prog.example_inputs(1)
    first = tcc.compile(prog, "x86", out=tmp_path / "a", verify=False)
    got_first = first(feeds)["logits"]
    second = tcc.compile(pruned, "x86", out=tmp_path / "a", verify=False)
    try:
        np.testing.assert_allclose(second(feeds)["logits"], pruned(feeds)["logits"], atol=1e-5)
        assert np.abs(got_first - second(feeds)["logits"]).max() > 1e-3
    finally:
        first.close()
        second.close()


def test_patch_embedding_convolution_runs_as_a_gemm(tmp_path):
    """A ViT's patch embedding (conv, stride = kernel) is lowered to patches -> tcc::dense, and a
    padded stride-1 convolution to im2col -> tcc::dense (tests/test_conv_lowering.py has the rest).
    Both match PyTorch."""
    from tcc.frontends import frontend
    from tcc.backends.tvm.lower import kernelize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 24, 8, 8)
            self.conv = torch.nn.Conv2d(24, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.patch(x))

    torch.manual_seed(0)
    prog = frontend.trace(Net().eval(), example_inputs={"x": torch.randn(1, 3, 32, 48)})
    ops = [str(n.target) for n in kernelize(prog.gm).graph.nodes if n.op == "call_function"]
    assert "aten.conv2d.default" not in ops and ops.count("tcc.dense.default") == 2
    art = tcc.compile(prog, "x86", out=tmp_path / "a")
    try:
        feeds = prog.example_inputs(3)
        want = prog(feeds)
        for name, got in art(feeds).items():
            np.testing.assert_allclose(got, want[name], rtol=1e-4, atol=1e-5)
    finally:
        art.close()
