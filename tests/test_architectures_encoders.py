"""Encoders and vision towers users bring: XLM-RoBERTa, ELECTRA, ModernBERT, ViT, DeiT and CLIP's
text and vision towers, each a tiny random-init Hugging Face folder (hidden 64, 4 heads of 16,
3 layers; text seq 8, images 32x32 in 8x8 patches) traced from the folder (the task comes from the
config: image-feature-extraction for ViT/DeiT/CLIP vision, pixel_values input).

Per architecture:
* structure recovery finds 3 blocks of 4 heads, the q/k/v (or fused qkv) and MLP projections of
  each block by weight name, the norms and the activation (ModernBERT: fused Wqkv, GeGLU;
  CLIP: quick_gelu; ELECTRA: the embedding projection is not block 0's MLP);
* the x86 artifact matches transformers' eager model within 1e-4 relative (max abs error / max
  |reference|) on fresh inputs: text encoders on a feed with 3 padding tokens and one without,
  CLIP text with its EOS token at two positions (the pooled output gathers there), images N(0, 1);
* drop-attention(count=1), prune-heads(ratio=0.5) apply (block 1 loses its attention, the others
  keep 2 of 4 heads); the result is compiled for arm64 and run under qemu (x86 when the aarch64
  tools are missing) and matches its Program within 1e-4 relative;
* on the vision towers, prune-tokens (ToMe merging, 11 of 17 or 18 tokens in the last layer) after
  them applies and its x86 artifact matches its Program within 1e-4 relative.
Measured (x86, fp32): the Program equals transformers exactly; the artifact is within 1.5e-7 (XLM-R)
to 5.3e-7 (CLIP vision) relative. Without the bool-mask fix in the lowering (a padded query in
ModernBERT's local layer keeps no key: 0 in torch, the mean of v with an additive mask) it was 3e-3.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

import tcc
from conftest import fresh_feeds, missing_arm64_tools
from tcc.frontends import models
from tcc.errors import UserError
from tcc.pipeline import PassContext, Pipeline

REL = 1e-4
SEQ = 8
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=128)
IMAGE = dict(image_size=32, patch_size=8)
TEXT = dict(vocab_size=100, max_position_embeddings=64)
EOS = 99  # CLIP text's EOS: the pooled output is the hidden state at its first occurrence
STRUCTURAL = "drop-attention(count=1),prune-heads(ratio=0.5)"

# arch -> (model_type, config overrides, expected: task, norm placement, activation, embeddings,
# fused qkv / gated MLP, pipeline extra)
ARCHS = {
    "xlm-roberta": ("xlm-roberta", TEXT, dict(norm="post", act="gelu", emb=["token", "segment", "position"])),
    # embedding_size 32 != hidden 64: a projection makes the residual stream
    "electra": ("electra", dict(TEXT, embedding_size=32), dict(norm="post", act="gelu", emb=["token", "segment", "position"])),
    # layers 0 and 2 global, layer 1 local (a 4-token window: +-2 positions of 8), RoPE, GeGLU
    "modernbert": ("modernbert", dict(TEXT, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
                   dict(norm="pre", act="gelu", emb=["token"], fused=True, gated=True)),
    "vit": ("vit", IMAGE, dict(norm="pre", act="gelu", emb=[], tokens="prune-tokens(schedule=[1,1,0.6],method=merge)")),
    # CLS and distillation tokens protected
    "deit": ("deit", IMAGE, dict(norm="pre", act="gelu", emb=[], tokens="prune-tokens(schedule=[1,1,0.6],method=merge,protect=2)")),
    "clip_vision_model": ("clip_vision_model", IMAGE, dict(norm="pre", act="quick_gelu", emb=["position"], pooled=True,
                                                          tokens="prune-tokens(schedule=[1,1,0.6],method=merge)")),
    # causal: padding after the text cannot change it
    "clip_text_model": ("clip_text_model", dict(vocab_size=100, max_position_embeddings=16, eos_token_id=EOS,
                                                bos_token_id=98, pad_token_id=1),
                        dict(norm="pre", act="quick_gelu", emb=["token", "position"], pooled=True, causal=True)),
}
IMAGE_ARCHS = ("vit", "deit", "clip_vision_model")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> (folder, eager transformers model, traced Program), made once per module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model_type, overrides, _ = ARCHS[arch]
            config = AutoConfig.for_model(model_type, **TINY, **overrides)
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp("models") / arch
            AutoModel.from_config(config).eval().save_pretrained(folder, safe_serialization=True)
            hf, _, _ = models.load_hf(folder)
            cache[arch] = folder, hf, tcc.trace(folder, seq_len=SEQ)
        return cache[arch]
    return get


def feeds_for(arch: str, program) -> list[dict[str, np.ndarray]]:
    if arch in IMAGE_ARCHS:
        return [program.example_inputs(seed=7), program.example_inputs(seed=8)]
    feeds = fresh_feeds(program, pad=3)
    if arch == "clip_text_model":  # EOS at position 4 before the padding, and last in the full feed
        for f, at in zip(feeds, (4, SEQ - 1)):
            f["input_ids"] = np.minimum(f["input_ids"], EOS - 1)
            f["input_ids"][:, at] = EOS
    return feeds


def transformers_outputs(hf, feed: dict, names: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = hf(**{k: torch.from_numpy(v) for k, v in feed.items()})
    return {n: getattr(out, n).numpy() for n in names}


def rel_error(got: dict, want: dict) -> float:
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k])) / np.max(np.abs(want[k]))) for k in want)


@pytest.mark.parametrize("arch", ARCHS)
def test_structure_recovered(built, arch):
    _, hf, prog = built(arch)
    exp = ARCHS[arch][2]
    info = prog.info
    assert prog.task == ("image-feature-extraction" if arch in IMAGE_ARCHS else "feature-extraction")
    assert [s.name for s in prog.inputs] == (["pixel_values"] if arch in IMAGE_ARCHS else ["input_ids", "attention_mask"])
    assert [s.name for s in prog.outputs] == ["last_hidden_state"] + (["pooler_output"] if exp.get("pooled") else [])
    assert len(info.blocks) == 3
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size) == (4, 4, 16, 64)
    assert info.norm_placement == exp["norm"]
    assert [e.kind for e in info.embeddings] == exp["emb"]
    params = dict(prog.gm.named_parameters())
    for b in info.blocks:
        a, m = b.attention, b.mlp
        assert a is not None and m is not None and a.residual_add and m.residual_add
        assert (a.qkv is not None) == bool(exp.get("fused"))
        for lin in (a.qkv,) if a.qkv else (a.q, a.k, a.v):
            assert f".{b.index}." in lin.weight and lin.weight in params
        assert f".{b.index}." in a.o.weight and f".{b.index}." in m.down.weight
        assert (m.gate_up is not None) == bool(exp.get("gated")) and m.act == exp["act"]
        assert len(a.q_heads) == len(a.k_heads) == len(a.o_heads) == 4
        if b.index:
            assert b.input == info.blocks[b.index - 1].output
        if exp["norm"] == "pre" and b.index:  # ModernBERT's block 0 reads the embedding norm
            assert f".{b.index}." in a.norm.weight and f".{b.index}." in m.norm.weight
    if arch == "electra":
        assert info.blocks[0].mlp.up.weight == "model.encoder.layer.0.intermediate.dense.weight"


@pytest.fixture(scope="module")
def x86_artifacts(built, tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            _, _, prog = built(arch)
            out = tmp_path_factory.mktemp("artifacts") / f"{arch}-x86"
            tcc.compile(prog, "x86", out=out, latency=False).close()
            cache[arch] = out
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_x86_matches_transformers(built, x86_artifacts, arch):
    _, hf, prog = built(arch)
    feeds = feeds_for(arch, prog)
    names = [s.name for s in prog.outputs]
    with tcc.load(x86_artifacts(arch)) as art:
        for feed in feeds:
            want = transformers_outputs(hf, feed, names)
            assert rel_error(prog(feed), want) <= REL
            assert rel_error(art(feed), want) <= REL
    if arch in IMAGE_ARCHS or ARCHS[arch][2].get("causal"):
        return
    padded, full = feeds
    kept = padded["attention_mask"][0].astype(bool)
    got = transformers_outputs(hf, padded, ["last_hidden_state"])["last_hidden_state"]
    ref = transformers_outputs(hf, {**padded, "attention_mask": full["attention_mask"]}, ["last_hidden_state"])
    # the padding changes the real tokens' outputs, so a mask baked in at trace time would fail
    assert np.max(np.abs(got[0, kept] - ref["last_hidden_state"][0, kept])) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_structural_passes_compile_and_run(built, arch, tmp_path):
    """The structural pipeline applies; its result runs compiled (arm64 under qemu) and matches its Program."""
    _, _, prog = built(arch)
    pruned, ctx = run_pipeline(prog, STRUCTURAL)
    info = pruned.info
    assert len(info.blocks) == 3 and info.blocks[1].attention is None
    assert [len(b.attention.q_heads) for b in info.blocks if b.attention] == [2, 2]
    assert [r["pass"] for r in ctx.records if r["pass"] != "dce"] == ["drop-attention", "prune-heads"]
    assert pruned.param_bytes() < prog.param_bytes()
    check_compiled(prog, pruned, STRUCTURAL, "x86" if missing_arm64_tools() else "arm64", feeds_for(arch, prog)[:1], tmp_path)


@pytest.mark.parametrize("arch", [a for a in ARCHS if "tokens" in ARCHS[a][2]])
def test_prune_tokens_on_vision_towers(built, arch, tmp_path):
    """prune-tokens (ToMe merging) after the structural passes: later layers run on fewer tokens, the
    token-level output is restored to full length; compiled for x86, and for arm64 (under qemu) for ViT:
    the token ranking and ToMe's matching lower without TVM's sort, which the aarch64 runtime lacks."""
    _, _, prog = built(arch)
    pipeline = STRUCTURAL + "," + ARCHS[arch][2]["tokens"]
    pruned, ctx = run_pipeline(prog, pipeline)
    rec = ctx.records[-1]
    assert rec["pass"] == "prune-tokens" and rec["details"]["tokens"][-1] < rec["details"]["seq_len"]
    assert [s.shape for s in pruned.outputs] == [s.shape for s in prog.outputs]
    check_compiled(prog, pruned, pipeline, "x86", feeds_for(arch, prog)[:1], tmp_path)
    if arch == "vit" and not missing_arm64_tools():
        check_compiled(prog, pruned, pipeline, "arm64", feeds_for(arch, prog)[:1], tmp_path)


def run_pipeline(prog, pipeline: str):
    ctx = PassContext(calibration=[prog.example_inputs(seed=s) for s in range(3)])
    return Pipeline.parse(pipeline).run(prog, ctx), ctx


def check_compiled(prog, pruned, pipeline: str, target: str, feeds: list[dict], tmp_path) -> None:
    """`prog` compiled with `pipeline` for `target` (arm64 runs under qemu) matches `pruned` in PyTorch."""
    out = tmp_path / target
    calibration = [prog.example_inputs(seed=s) for s in range(3)]
    tcc.compile(prog, target, out=out, pipeline=pipeline, calibration=calibration, verify=False, latency=False).close()
    with tcc.load(out) as art:
        for feed in feeds:
            assert rel_error(art(feed), pruned(feed)) <= REL


def test_modernbert_prune_tokens_refuses_rope(built):
    """RoPE's cos/sin are per-token tensors inside the layers: prune-tokens says so."""
    _, _, prog = built("modernbert")
    with pytest.raises(UserError, match="not supported|rotary|sequence length"):
        Pipeline.parse("prune-tokens(schedule=[1,1,0.6],method=merge)").run(prog, PassContext(calibration=[prog.example_inputs()]))


def test_full_clip_folder_and_wrong_task_refused(built, tmp_path):
    config = AutoConfig.for_model("clip", text_config=dict(**TINY, vocab_size=100, max_position_embeddings=16),
                                  vision_config=dict(**TINY, **IMAGE), projection_dim=32)
    AutoModel.from_config(config).save_pretrained(tmp_path / "clip", safe_serialization=True)
    with pytest.raises(UserError, match="two-tower") as e:
        tcc.trace(tmp_path / "clip")
    assert "CLIPVisionModel" in e.value.hint
    vit_folder, _, _ = built("vit")
    with pytest.raises(UserError, match="does not fit") as e:
        tcc.trace(vit_folder, task="feature-extraction")
    assert "image-feature-extraction" in e.value.hint
    with pytest.raises(UserError, match="--max-seq-len"):
        tcc.trace(vit_folder, max_seq_len=16)
