"""quantize's embedding_format=int4 (issue 15 item 6): int4 embedding tables on the body's int4 grid,
tcc::embedding_w4, and a tied LM head reading the same codes through dense_w4 (W4A8 or weight-only).

Tiny random-init LLaMA decoders (tests/test_quantize.py `tiny`: hidden 64, 2 layers, vocab 1024, 32
tokens), tied and untied. Checks: the op against the dequantized table (exact); the quantized program
against the fp32 PyTorch program (relative RMS error of the logits, bounds about 1.5x measured); the
stored bytes to the byte; the x86 artifact (tcc_embedding_w4_f32 reading the LM head's packed codes)
against the quantized program (max abs error <= 1e-5 on logits of magnitude ~1, measured 3.6e-7) with
its weight bytes within the packing's padding of the program's (the table is stored once).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcc
from tcc.compress.quantization import Grid, rtn
from tcc.errors import UserError
from tcc.ir.graph import module_path
from tcc.pipeline import Pipeline

from test_quantize import W4, W8, A8W8, count, quantize, tiny

EMB4 = torch.ops.tcc.embedding_w4.default
TABLE = "model.model.embed_tokens.weight"  # traced, the tied table is read as model.lm_head.weight
V, D = 1024, 64
LINEARS = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # per layer q, o; k, v; gate, up, down
OTHER = 5 * 64 * 4 + 8 * 4  # 5 norms, rotary inv_freq
W4A8_SYM = "quantize(weights=int4,group=32,acts=int8,min_size=0,embeddings=true,embedding_format=int4)"
W4_FLOAT_ZERO = ("quantize(weights=int4,group=32,sym=false,zero=float,min_size=0,embeddings=true,"
                 "embedding_format=int4)")


@pytest.fixture(scope="module")
def tied():
    return tiny("llama", tie_word_embeddings=True, vocab_size=V)


@pytest.mark.parametrize("sym,float_zero", [(True, False), (False, False), (False, True)])
def test_embedding_w4_op_is_the_dequantized_table(sym, float_zero):
    torch.manual_seed(0)
    q = rtn(torch.randn(50, 64), Grid("int4", sym, float_zero), 16)
    ids = torch.tensor([[3, 7, 49], [0, 1, 3]])
    out = torch.ops.tcc.embedding_w4(ids, q.packed(), q.scale, q.zero, 16)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64)
    assert torch.equal(out, q.dequantize()[ids])


def test_tied_table_and_lm_head_share_int4_codes(tied):
    q, record, err = quantize(tied, W4A8_SYM)
    assert count(q, EMB4) == 1 and count(q, W4) == 15 and count(q, W8) + count(q, A8W8) == 0
    emb = next(n for n in q.gm.graph.nodes if n.target is EMB4)
    head = next(n for n in q.gm.graph.nodes if n.target is W4 and module_path(n) == "model.lm_head")
    target = lambda a: a.target if a is not None else None  # noqa: E731
    assert [target(a) for a in emb.args[1:4]] == [target(a) for a in head.args[1:4]]  # one int4 table
    assert emb.args[4] == head.args[4] == 32 and head.args[6] == "int8"
    assert TABLE not in q.named_tensors() and "model.lm_head.weight" not in q.named_tensors()
    # codes 0.5 byte, f16 scales per 32: the table too (no zero points: sym)
    assert q.param_bytes() == (LINEARS + V * D) // 2 + 2 * (LINEARS + V * D) // 32 + OTHER
    assert err < 0.25  # measured 0.163 (int8 table and head: 0.12)
    notes = {n["format"]: n for n in record["details"]["quantized"] if n["shape"] == [V, D]}
    assert notes["embedding_w4"]["bytes_after"] == V * D // 2 + 2 * V * D // 32 and notes["embedding_w4"]["group"] == 32
    assert notes["w4"]["shares"] == notes["embedding_w4"]["weight"] and notes["w4"]["bytes_after"] == 0

    qz, _, err = quantize(tied, W4_FLOAT_ZERO)  # Q4_1's grid: float32 zero points per group
    assert count(qz, EMB4) == 1 and count(qz, W4) == 15
    assert qz.param_bytes() == (LINEARS + V * D) // 2 + 6 * (LINEARS + V * D) // 32 + OTHER
    assert err < 0.15  # measured 0.094


def test_untied_table_is_int4_and_head_keeps_its_own_codes():
    program = tiny("llama", tie_word_embeddings=False, vocab_size=V)
    q, _, err = quantize(program, W4A8_SYM)
    emb = next(n for n in q.gm.graph.nodes if n.target is EMB4)
    head = next(n for n in q.gm.graph.nodes if n.target is W4 and module_path(n) == "model.lm_head")
    assert emb.args[1].target != head.args[1].target and count(q, W4) == 15
    assert q.param_bytes() == (LINEARS + 2 * V * D) // 2 + 2 * (LINEARS + 2 * V * D) // 32 + OTHER
    assert err < 0.2  # measured 0.127


@pytest.mark.parametrize("text", [W4A8_SYM, W4_FLOAT_ZERO])
def test_compiled_int4_table_matches_and_is_stored_once(tmp_path, tied, text):
    q = Pipeline.parse(text).run(tied.clone())
    art = tcc.compile(q, "x86", out=tmp_path / "a", latency=False, baseline=False, evaluate=False, cache=False)
    try:
        for seed in range(2):
            feeds = q.example_inputs(seed)
            want, got = q(feeds), art(feeds)
            assert np.abs(got["logits"] - want["logits"]).max() <= 1e-5
        # W4A8's packing stores zero points (uint8 8 per group when sym, 1 byte per 32 weights), and the
        # artifact keeps fewer small float tensors (measured -1024 / +1024 bytes); a second copy of the
        # table would add its V D / 2 = 32768 bytes of codes
        stored, program = art.manifest["sizes"]["weight_bytes"], q.param_bytes()
        assert abs(stored - program) <= (LINEARS + V * D) // 32 + 4096
    finally:
        art.close()


def test_int4_tables_need_int4_weights_and_embeddings():
    for text in ("quantize(embeddings=true,embedding_format=int4)",
                 "quantize(weights=int4,embeddings=false,embedding_format=int4)"):
        with pytest.raises(UserError, match="embedding_format"):
            Pipeline.parse(text)
