"""`rotate` (issue 18): the rotated decoder computes the same function (float rounding), 4-bit
quantization of it loses less, post-norm encoders are refused, and the online Walsh-Hadamard
transform matches its matrix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_quantize import feeds, inject_outliers, quantize, tiny
from tcc.errors import UserError
from tcc.pipeline import PassContext, Pipeline
from tcc.compress.rotation import fwht, random_orthogonal, walsh_hadamard

# SmolLM2's proportions, small: hidden 576 = 64 * 9 -> 72 = 8 * 9 (a Hadamard part and an odd orthogonal
# factor), 3 query heads on 1 KV head, intermediate 8/3 of hidden, tied embeddings
SMOL = dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1, intermediate_size=192,
            tie_word_embeddings=True)


def rotated(program, text="rotate"):
    ctx = PassContext(calibration=feeds(program, 1, seed=0))
    return Pipeline.parse(text).run(program.clone(), ctx), ctx.records[-1]["details"]


@pytest.mark.parametrize("config", [{}, SMOL], ids=["llama", "smollm2-shaped"])
def test_rotation_is_exact_in_fp32(config):
    program = tiny("llama", **config)
    out, notes = rotated(program)
    for f in feeds(program, 2, seed=3):
        want, got = program(f)["logits"], out(f)["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    info = out.info
    norms = [p.norm for b in info.blocks for p in (b.attention, b.mlp)] + [info.final_norm]
    assert all(bool((out.named_tensors()[n.weight] == 1).all()) for n in norms)  # folded
    hidden, vocab = info.hidden_size, info.vocab_size
    assert notes["lm_head_untied_bytes"] == (vocab * hidden * 4 if config.get("tie_word_embeddings") else 0)
    assert not info.lm_head_tied
    # the embedding table is rotated: no longer the original
    assert not torch.equal(out.named_tensors()[info.embeddings[0].weight],
                           program.named_tensors()[program.info.embeddings[0].weight])
    assert notes["heads_rotated"] == (2 if not config else 0)  # head dim 16; 24 is no power of two
    blocks = {o["block"] for o in notes["online"]}
    assert blocks == ({128} if not config else {64})  # largest power of two dividing K=128 / K=192


def test_heads_and_online_only_is_exact_and_keeps_the_stream():
    """residual=false: the value/output heads and the down projections' inputs rotate, the stream, the
    norms and the tied head stay as they are."""
    program = tiny("llama", tie_word_embeddings=True)
    out, notes = rotated(program, "rotate(residual=false)")
    f = feeds(program, 1, seed=3)[0]
    want = program(f)["logits"]
    np.testing.assert_allclose(out(f)["logits"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert notes["heads_rotated"] == 2 and len(notes["online"]) == 2 and notes["lm_head_untied_bytes"] == 0
    assert out.info.lm_head_tied
    w = program.named_tensors()
    assert all(torch.equal(t, w[k]) for k, t in out.named_tensors().items() if "layernorm" in k or "embed" in k)


def test_rotation_lowers_int4_error_with_outliers():
    """Activation outlier channels (x20) make int4 round-to-nearest lose accuracy; rotated first, the
    same quantizer loses far less. GPTQ composes with it."""
    program = inject_outliers(tiny("llama"), 20.0)
    errors = {}
    for text in ("quantize(weights=int4,group=32,min_size=0)", "rotate,quantize(weights=int4,group=32,min_size=0)",
                 "quantize(weights=int4,group=32,min_size=0,method=gptq)",
                 "rotate,quantize(weights=int4,group=32,min_size=0,method=gptq)",
                 "rotate,quantize(weights=int4,group=32,min_size=0,acts=int8)"):
        errors[text] = quantize(program, text)[2]
    e = list(errors.values())
    # measured: rtn 0.176, rotate+rtn 0.136, gptq 0.166, rotate+gptq 0.123, rotate+W4A8 0.136
    assert e[1] < 0.85 * e[0], errors
    assert e[3] < 0.85 * e[2], errors
    assert e[4] < 1.2 * e[1], errors


def test_post_norm_encoder_is_refused():
    with pytest.raises(UserError, match="post-norm"):
        rotated(tiny("bert"))


def test_layer_norm_decoder_is_refused():
    with pytest.raises(UserError, match="layer_norm"):
        rotated(tiny("gpt2"))


def test_walsh_hadamard_and_orthogonal_factors():
    h = walsh_hadamard(8)
    assert torch.allclose(h @ h, torch.eye(8, dtype=h.dtype), atol=1e-12)
    q = random_orthogonal(72, seed=1)
    assert torch.allclose(q @ q.T, torch.eye(72, dtype=q.dtype), atol=1e-12)
    assert not torch.allclose(q, random_orthogonal(72, seed=2))
    x = torch.randn(2, 3, 96, dtype=torch.float64)
    want = (x.reshape(2, 3, 3, 32) @ walsh_hadamard(32)).reshape(2, 3, 96)
    assert torch.allclose(fwht(x, 32), want, atol=1e-12)
    with pytest.raises(ValueError):
        fwht(x, 64)  # does not divide 96


def test_search_tries_rotate_before_int4_and_compiles_it(tmp_path):
    """The accuracy-budget search's int4-rotate scheme runs rotate then quantize, and the chosen pipeline
    compiles to an x86 artifact (the online Hadamard lowers; tcc.compile checks it against its Program)."""
    from tcc.search import search
    program = tiny("llama")
    r = search(program, "x86", max_drop=0.9, objective="size", work_dir=tmp_path / "s", out=tmp_path / "art",
               quantization=("int4-rotate",), structure=(), measure=0, eval_samples=2, calibration_samples=2)
    assert r.chosen["pipeline"].startswith("dce,rotate,quantize(") or r.chosen["pipeline"].startswith("rotate,quantize(")
    import tcc
    art = tcc.load(tmp_path / "art")
    f = feeds(program, 1, seed=4)[0]
    got, want = art(f)["logits"], program(f)["logits"]  # tcc.compile checked the artifact against its Program
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.3  # int4 g32 on random weights: ~0.13
