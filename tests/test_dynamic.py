"""Dynamic sequence length (tcc.trace(..., max_seq_len=N)) end to end on tiny random-init models.

Models: BERT and LLaMA (hidden 64, 4 heads, LLaMA over 2 KV heads, 2 layers, vocab 128), traced at
16 tokens with lengths 1..MAX allowed. Each artifact is compared with its Program in PyTorch at
lengths 1, 7 and MAX: relative error max|y - y_ref| / max|y_ref| <= 1e-5 (fp32; measured <= 7.4e-7).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import tcc
from tcc.frontends import frontend
from tcc.errors import UserError
from tcc.frontends.frontend import CausalLM, FeatureExtraction
from tcc.pipeline import PassContext, Pipeline
from tcc.ir.program import TensorSpec

MAX = 32
LENGTHS = (1, 7, MAX)
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=128)


def tiny(arch: str, max_seq_len: int | None = MAX):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 16))
    if arch == "llama":
        config = AutoConfig.for_model("llama", **TINY, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        return frontend.trace(CausalLM(model), example_inputs={"input_ids": ids}, output_names=["logits"],
                              task="causal-lm", max_seq_len=max_seq_len)
    model = AutoModel.from_config(AutoConfig.for_model("bert", **TINY), attn_implementation="sdpa").eval()
    return frontend.trace(FeatureExtraction(model), example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          output_names=["last_hidden_state"], task="feature-extraction", max_seq_len=max_seq_len)


def feed(program, length: int, pad: int = 0) -> dict[str, np.ndarray]:
    f = {"input_ids": np.random.default_rng(length).integers(0, 100, (1, length))}
    if any(s.name == "attention_mask" for s in program.inputs):
        f["attention_mask"] = np.ones((1, length), np.int64)
        if pad:
            f["attention_mask"][:, -pad:] = 0
    return f


def rel_error(program, art, f) -> float:
    (name, want), = program(f).items()
    return float(np.abs(art(f)[name] - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=["bert", "llama"])
def compiled(request, tmp_path_factory):
    program = tiny(request.param)
    art = tcc.compile(program, "x86", out=tmp_path_factory.mktemp(request.param) / "a", latency=False)
    yield program, art
    art.close()


def test_specs_record_the_range():
    program = tiny("llama")
    ids, = program.inputs
    assert ids.shape == (1, 16) and ids.min_shape == (1, 1) and ids.max_shape == (1, MAX) and ids.dynamic_dims == [1]
    logits, = program.outputs
    assert logits.min_shape == (1, 1, 128) and logits.max_shape == (1, MAX, 128)
    assert program.example_inputs()["input_ids"].shape == (1, 16)
    assert TensorSpec.from_json(ids.to_json()) == ids
    static = tiny("llama", max_seq_len=None).inputs[0]
    assert static.max_shape is None and static.dynamic_dims == []


@pytest.mark.parametrize("length", LENGTHS)
def test_artifact_matches_pytorch_at_any_length(compiled, length):
    program, art = compiled
    assert rel_error(program, art, feed(program, length)) <= 1e-5
    if len(program.inputs) == 2 and length > 3:  # an encoder, with padding
        assert rel_error(program, art, feed(program, length, pad=3)) <= 1e-5


def test_manifest_and_bad_lengths(compiled):
    program, art = compiled
    assert art.manifest["inputs"][0]["max_shape"] == [1, MAX]
    for length in (0, MAX + 1):
        with pytest.raises(UserError, match=rf"size {length} in dim 1, the artifact takes 1\.\.{MAX}"):
            art(feed(program, length))


@pytest.mark.parametrize("pipeline", ["prune-heads(ratio=0.5)", "quantize(weights=int8,acts=int8)"])
def test_passes_on_a_dynamic_program(pipeline, tmp_path):
    program = tiny("llama")
    ctx = PassContext(calibration=[program.example_inputs(seed=i) for i in range(4)])
    passed = Pipeline.parse(pipeline).run(program.clone(), ctx)
    assert passed.inputs[0].max_shape == (1, MAX)
    with tcc.compile(passed, "x86", out=tmp_path / "a", latency=False) as art:
        for length in LENGTHS:
            assert rel_error(passed, art, feed(passed, length)) <= 1e-5


def test_symbolic_elementwise_loops_are_parallel_and_vectorised():
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    from tcc.backends.tvm.lower import to_relax
    from tcc.backends.tvm.schedule import Injective
    from tcc.backends.tvm.targets import get_target

    mod, _ = to_relax(tiny("llama"))
    target = get_target("x86").tvm_target()
    with target:
        mod = tvm.transform.Sequential(cpu.legalize_passes(target) + [dl.ApplyDefaultSchedule(Injective())])(mod)
    adds = [f.script() for gv, f in mod.functions_items() if gv.name_hint.startswith("add")]
    symbolic = [s for s in adds if "TypeVar(" in s]  # a residual add over [1, S, 64]
    assert symbolic and all("T.parallel(" in s and "T.vectorized(" in s for s in symbolic)


@pytest.mark.parametrize("target,backend", [("arm64", "tvm"), ("cuda", "tvm"), ("x86", "onnxruntime")])
def test_other_targets_refuse_a_dynamic_length_before_any_work(tmp_path, target, backend):
    with pytest.raises(UserError, match="x86 targets only"):
        tcc.compile(tiny("llama"), target, out=tmp_path / "a", latency=False, backend=backend)
    assert not (tmp_path / "a").exists()


def test_max_seq_len_must_allow_two_tokens():
    with pytest.raises(UserError, match="at least 2"):
        tiny("llama", max_seq_len=1)


def test_prune_tokens_refuses_a_dynamic_program():
    with pytest.raises(UserError, match="symbolic sizes"):
        Pipeline.parse("prune-tokens(keep=0.5)").run(tiny("bert"), PassContext())


def test_cli_max_seq_len(tiny_bert_dir, tmp_path):
    from tcc.cli import main
    out = tmp_path / "a"
    assert main(["-q", "compile", str(tiny_bert_dir), "--seq-len", "8", "--max-seq-len", "64", "-o", str(out),
                 "--no-latency", "--no-cache"]) == 0
    with tcc.load(out) as art:
        assert [s.max_shape for s in art.inputs] == [(1, 64), (1, 64)]
        for length in (3, 64):
            assert art(feed(art, length))["last_hidden_state"].shape == (1, length, 64)
    assert main(["-q", "compile", str(tiny_bert_dir), "--max-seq-len", "65", "-o", str(tmp_path / "b")]) != 0
