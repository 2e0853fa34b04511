"""Structural passes and quantization (int8 weights, W8A8 with int8 embeddings, int4) composed in
one pipeline, compiled, match the transformed program; parameter bytes fall at every step."""
import numpy as np
import torch
import transformers

import tcc
from tcc.frontends.frontend import CausalLM


import pytest


@pytest.mark.parametrize("quantize", ["quantize-weights(bits=8,min_size=16)",
                                      "quantize(acts=int8,min_size=16,embeddings=true)",
                                      "quantize(weights=int4,group=16,min_size=16)"])
def test_drop_prune_quantize_compile(tmp_path, quantize):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    program = tcc.trace(CausalLM(model), example_inputs={"input_ids": torch.randint(0, 100, (1, 16))},
                        output_names=["logits"])
    art = tcc.compile(program, "x86", out=tmp_path / "a",
                      pipeline=f"drop-attention(layers=[1]),prune-heads(ratio=0.5),{quantize}")
    records = art.manifest["passes"]
    assert [r["pass"] for r in records] == ["dce", "drop-attention", "prune-heads", quantize.split("(")[0]]
    for r in records[1:]:
        assert r["param_bytes"]["after"] < r["param_bytes"]["before"], r["pass"]
    assert records[-1]["param_bytes"]["after"] < 0.3 * records[0]["param_bytes"]["before"]
    # the compiled library computes what the transformed program computes
    # (W8A8: a float difference upstream can move an activation across a rounding boundary, one
    # code step; measured 2.7e-3 here. Integer products themselves are exact.)
    assert art.manifest["run"]["verify"]["logits"]["max_rel_err"] < (1e-2 if "acts=int8" in quantize else 1e-4)
    # packed int4 pads output channels to tiles of 16 and stores zero codes: ~8 % on this tiny model
    assert art.manifest["sizes"]["weight_bytes"] <= records[-1]["param_bytes"]["after"] * 1.1
    ids = np.random.default_rng(3).integers(0, 100, (1, 16))
    out = tcc.load(tmp_path / "a")({"input_ids": ids})["logits"]
    assert out.shape == (1, 16, 100) and np.isfinite(out).all()
