"""The decoder architectures users bring next, end to end on tiny random-init models, and the models
tcc refuses at load.

Models (hidden 64, 4 query heads over 2 KV heads, head_dim 16, 3 layers, vocab 128, 64 positions),
each saved as a Hugging Face folder (safetensors, no tokenizer):
  gemma2  soft-capped attention scores (50) and logits (30), sandwich norms, GeGLU, scaled embeddings,
          sliding-window (4) and global layers alternating; transformers runs it eagerly
  gemma3  gemma3_text: q/k RMS norms, sliding-window (4) / global / sliding layers, two rotary bases
  qwen3   q/k RMS norms
  llama3  LLaMA with rope_scaling type llama3 (factor 8 over an original 16 positions, so the scaled
          and the smoothed frequency bands both occur)
  phi3    fused qkv and gate_up projections
Per architecture: the x86 artifact (tcc.compile of the folder: main at 8 tokens, prefill chunks of 8,
decode, a 32-position KV cache) matches transformers' logits within 1e-4 relative (measured <= 1e-6),
and its greedy tokens for 8 new tokens after an 11-token prompt (longer than the sliding window, fed
in two chunks) equal transformers' `generate(do_sample=False)`; the structural passes apply to the
recovered structure (drop-attention, drop-mlp, prune-heads, drop-blocks) and the pruned program's KV
cache reproduces its full forward pass within 1e-5; the arm64 artifact of a pruned program (seq 8)
matches that program under qemu within 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tcc
from tcc.generation import at_length, kv_cached
from tcc.pipeline import PassContext, Pipeline

from conftest import missing_arm64_tools
from test_generation import full_logits, rel, run_cached

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=128,
            intermediate_size=128, max_position_embeddings=64, eos_token_id=None)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
# arch -> (model_type, config overrides, expected structure). initializer_range: the default 0.02 makes
# the non-Gemma tiny models repeat one token, which would make the greedy comparison weak.
ARCHS = {
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, layer_types=SLIDING),
               dict(act="gelu_tanh", sandwich=True, windows=[4, 0, 4], softcap=50.0, tied=True)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=4, layer_types=SLIDING),
               dict(act="gelu_tanh", sandwich=True, windows=[4, 0, 4], softcap=0.0, tied=True)),
    "qwen3": ("qwen3", dict(head_dim=16, initializer_range=0.1),
              dict(act="silu", windows=[0, 0, 0], softcap=0.0, tied=False)),
    "llama3": ("llama", dict(rope_scaling=LLAMA3_ROPE, initializer_range=0.1),
               dict(act="silu", windows=[0, 0, 0], softcap=0.0, tied=False)),
    "phi3": ("phi3", dict(pad_token_id=0, bos_token_id=1, initializer_range=0.1),
             dict(act="silu", fused=True, windows=[0, 0, 0], softcap=0.0, tied=False)),
}
CONTEXT = 32
PROMPT = [int(t) for t in np.random.default_rng(3).integers(0, 128, 11)]
PRUNE = "drop-attention(count=1),drop-mlp(layers=[2]),prune-heads(ratio=0.5)"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """arch -> (its folder, the transformers model read back from it, as a user would load it)."""
    made = {}

    def get(arch):
        if arch not in made:
            model_type, overrides, _ = ARCHS[arch]
            torch.manual_seed(0)
            config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
            path = tmp_path_factory.mktemp(arch) / arch
            AutoModelForCausalLM.from_config(config).eval().save_pretrained(path, safe_serialization=True)
            made[arch] = path, AutoModelForCausalLM.from_pretrained(path).eval()
        return made[arch]
    return get


@pytest.fixture(scope="module")
def dynamic(folder):
    """arch -> its Program traced from the folder with lengths 1..CONTEXT (example length 8)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tcc.trace(str(folder(arch)[0]), seq_len=8, max_seq_len=CONTEXT)
        return made[arch]
    return get


@pytest.fixture(scope="module")
def x86(dynamic, tmp_path_factory):
    """arch -> the x86 artifact of its Program with the default pipeline and generation (prefill
    chunks of 8, a KV cache of CONTEXT positions)."""
    made = {}

    def get(arch):
        if arch not in made:
            out = tmp_path_factory.mktemp(f"{arch}-x86") / "a"
            made[arch] = tcc.compile(dynamic(arch), "x86", out=out, max_context=CONTEXT, latency=False)
        return made[arch]
    yield get
    for art in made.values():
        art.close()


@pytest.fixture(scope="module")
def pruned(dynamic):
    """arch -> its Program after PRUNE (calibrated on two example inputs)."""
    made = {}

    def get(arch):
        if arch not in made:
            prog = dynamic(arch)
            ctx = PassContext(calibration=[prog.example_inputs(seed=i) for i in range(2)])
            made[arch] = Pipeline.parse(PRUNE).run(prog.clone(), ctx)
        return made[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_x86_matches_transformers(arch, folder, x86):
    _, model = folder(arch)
    art = x86(arch)
    for length in (8, 21):  # the second is longer than a sliding window (4) and than a prefill chunk
        ids = np.random.default_rng(length).integers(0, 128, (1, length))
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).logits.numpy()
        assert rel(art({"input_ids": ids})["logits"], want) <= 1e-4
    # the compile's own check: the artifact's prefill/decode agree with the source's greedy tokens
    assert art.manifest["run"]["generation_agreement"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
def test_x86_greedy_equals_transformers(arch, folder, x86):
    _, model = folder(arch)
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT):].tolist()
    assert len(want) == 8
    assert x86(arch).generate(PROMPT, max_new_tokens=8, stop_at_eos=False)["token_ids"] == want


@pytest.mark.parametrize("arch", ARCHS)
def test_structure_and_kv_cache(arch, dynamic):
    """Recovered structure; the KV-cache rewrite finds each layer's window and soft cap, and the
    cached program equals the full forward over 24 tokens (6 past the longest window)."""
    prog, exp = dynamic(arch), ARCHS[arch][2]
    info = prog.info
    assert len(info.blocks) == 3 and (info.num_heads, info.num_kv_heads, info.head_dim) == (4, 2, 16)
    assert info.norm_placement == "pre" and info.lm_head is not None and info.lm_head_tied == exp["tied"]
    for b in info.blocks:
        a, m = b.attention, b.mlp
        assert m.act == exp["act"] and len(a.q_heads) == 4 and len(a.k_heads) == 2
        assert (a.qkv is not None, m.gate_up is not None) == (exp.get("fused", False),) * 2
        assert (a.out_norm is not None, m.out_norm is not None) == (exp.get("sandwich", False),) * 2
    gen = kv_cached(prog, CONTEXT)
    cores = [n for n in gen.program.gm.graph.nodes if n.target == torch.ops.tcc.sdpa_kv.default]
    assert [n.args[7] for n in cores] == exp["windows"] and {n.args[8] for n in cores} == {exp["softcap"]}
    ids = np.random.default_rng(1).integers(0, 128, 24)
    want = full_logits(prog, ids)
    got = run_cached(gen, ids, chunk=8, decode_from=14)  # chunks 8, 6 (padded), then 10 decode steps
    assert max(rel(logits, want[13 + i]) for i, logits in enumerate(got)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_passes(arch, dynamic, pruned):
    """drop-attention, drop-mlp and prune-heads (then drop-blocks) change what they say on each
    architecture; the pruned programs keep an exact KV cache."""
    prog, small = dynamic(arch), pruned(arch)
    blocks = small.info.blocks
    assert [b.attention is None for b in blocks] == [False, True, False]  # count=1 keeps the ends
    assert [b.mlp is None for b in blocks] == [False, False, True]
    assert [b.attention.num_heads for b in blocks if b.attention] == [2, 2]
    assert small.param_bytes() < prog.param_bytes()
    calibration = [prog.example_inputs(seed=i) for i in range(2)]
    dropped = Pipeline.parse("drop-blocks(count=1)").run(prog.clone(), PassContext(calibration=calibration))
    assert len(dropped.info.blocks) == 2
    ids = np.random.default_rng(2).integers(0, 128, 20)
    for p in (small, dropped):
        want = full_logits(p, ids)
        got = run_cached(kv_cached(p, CONTEXT), ids, chunk=8, decode_from=12)
        assert max(rel(logits, want[11 + i]) for i, logits in enumerate(got)) <= 1e-5


@pytest.mark.arm64
@pytest.mark.parametrize("arch", ARCHS)
def test_arm64_pruned_under_qemu(arch, pruned, tmp_path):
    """The pruned program at a static length of 8 (arm64 takes static shapes), compiled for arm64 and
    run under qemu, matches the program."""
    if missing_arm64_tools():
        pytest.skip(f"arm64 needs {', '.join(missing_arm64_tools())}")
    small = at_length(pruned(arch), 8)
    feed = small.example_inputs(seed=7)
    with tcc.compile(small, "arm64", out=tmp_path / "a", verify=False, generate=False) as art:
        assert rel(art(feed)["logits"], small(feed)["logits"]) <= 1e-4


# -- models tcc refuses at load ------------------------------------------------------------------------
REFUSED = {
    "t5": ("t5", dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16), "encoder-decoder"),
    "bart": ("bart", dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64), "encoder-decoder"),
    "whisper": ("whisper", dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                                bos_token_id=0, eos_token_id=0, decoder_start_token_id=0), "encoder-decoder"),
    "mixtral": ("mixtral", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, num_local_experts=4), "mixture-of-experts"),
    "qwen2_moe": ("qwen2_moe", dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, num_experts=4, num_experts_per_tok=2), "mixture-of-experts"),
    "mamba": ("mamba", dict(hidden_size=32, num_hidden_layers=1, state_size=4), "layers tcc does not support"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_at_load(name, tmp_path, capsys):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from tcc.cli import main
    model_type, overrides, what = REFUSED[name]
    config = AutoConfig.for_model(model_type, vocab_size=64, **overrides)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    cls = AutoModel if model_type == "whisper" else cls
    torch.manual_seed(0)
    cls.from_config(config).save_pretrained(tmp_path / name, safe_serialization=True)
    capsys.readouterr()
    assert main(["compile", str(tmp_path / name), "-o", str(tmp_path / "out"), "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    first, *rest = err.strip().splitlines()
    assert first.startswith(f"tcc: error: model type '{model_type}' ") and what in first, err
    assert len(rest) == 1 and rest[0].startswith("  hint: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
