"""What keeps a compile's bookkeeping cheap (issue 15, item 3) without changing a number:
dense_a8w8's integer dot products (tcc.ir.ops._int_dot: int8 x int8 -> int32 on CPUs with VNNI, else
float32 GEMMs over column blocks whose sums stay exact) equal the float64 sums they replace, bit for bit;
each case runs both paths, whatever this CPU has."""
from __future__ import annotations

import pytest
import torch

from tcc.ir import ops


@pytest.mark.parametrize("vnni", [True, False])
@pytest.mark.parametrize("m,k,n,asym,static", [(1, 576, 96, False, False), (5, 577, 9, True, False),
                                               (33, 256, 64, True, True), (8, 130, 40, False, True),
                                               (4, 2048, 16, True, False)])
def test_dense_a8w8_integer_sums_equal_the_float64_ones(m, k, n, asym, static, vnni, monkeypatch):
    monkeypatch.setattr(ops, "_fast_int_mm", lambda: vnni)
    torch.manual_seed(k)
    x = torch.randn(m, k) * 3
    x[0, :7] = 40.0  # an outlier row: codes reach the ends of the range
    qw = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    qw[0] = 127
    w_scale = torch.rand(n) * 0.01
    x_scale = torch.tensor([0.05]) if static else None
    x_zero = torch.tensor([17.0]) if static and asym else None
    q, s, z = ops.quantize_rows(x, x_scale, x_zero, asym)
    want = (q - z).to(torch.float64) @ qw.to(torch.float64).T  # the op's definition
    assert torch.equal(ops._int_dot(q, z, qw, asym), want)
    y = torch.ops.tcc.dense_a8w8(x, qw, w_scale, None, x_scale, x_zero, asym)
    assert torch.equal(y, (want * s.to(torch.float64) * w_scale.to(torch.float64)[None, :]).to(torch.float32))


def test_fractional_zero_points_take_the_float64_path():
    q = torch.tensor([[3.5, 10.5]])
    z = torch.tensor([[0.5]])
    qw = torch.tensor([[2, -3]], dtype=torch.int8)
    assert ops._int_dot(q, z, qw, True).item() == 3.0 * 2 + 10.0 * -3


@pytest.mark.parametrize("zero", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_dequantize_w4_is_its_definition_bit_for_bit(zero, scale_dtype):
    """dense_w4's reference dequantizes in place on one float32 copy (tcc.ir.ops.dequantize_w4); its
    values are the op's definition w[n, k] = (code - zero[n, k // group]) * scale[n, k // group]
    (zero None = 8), computed here element by element in float32 from the nibbles."""
    torch.manual_seed(1)
    n, k, group = 24, 96, 32
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale = (torch.rand(n, k // group) * 0.02 + 1e-3).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, k // group), dtype=torch.uint8) if zero else None
    codes = torch.empty(n, k, dtype=torch.float32)
    codes[:, 0::2], codes[:, 1::2] = (qw % 16).float(), (qw // 16).float()  # low nibble first
    g = torch.arange(k) // group
    z = zeros.float()[:, g] if zero else torch.full((n, k), 8.0)
    want = (codes - z) * scale.float()[:, g]
    assert torch.equal(ops.dequantize_w4(qw, scale, zeros, group), want)
    x = torch.randn(3, k)
    assert torch.equal(torch.ops.tcc.dense_w4(x, qw, scale, zeros, group), torch.nn.functional.linear(x, want))


def test_big_models_check_each_pass_on_fewer_feeds_and_skip_the_baseline(tmp_path, monkeypatch):
    """Bounded bookkeeping for big models (issue 15, item 3), with the bounds shrunk to a tiny
    decoder's size: the pass manager checks each pass on as many calibration feeds as fit
    compiler.CHECK_FLOP of forward passes (all 4 for a small model), the record and the report say
    how many, and a source above compiler.BASELINE_MAX_BYTES gets no speed-up baseline build: the
    report says why and the artifact is still timed."""
    import json
    import tcc
    from tcc import compiler
    from tcc.pipeline import estimate_flops
    from test_tokenizerless import save_decoder
    save_decoder(tmp_path / "m", "qwen2")
    program = tcc.trace(str(tmp_path / "m"), seq_len=8)
    assert compiler._check_feeds(program, 4) == 4
    monkeypatch.setattr(compiler, "CHECK_FLOP", 2.5 * estimate_flops(program.gm))
    assert compiler._check_feeds(program, 4) == 2
    monkeypatch.setattr(compiler, "BASELINE_MAX_BYTES", program.param_bytes() - 1)
    feeds = [program.example_inputs(seed=10 + i) for i in range(4)]
    tcc.compile(program, out=tmp_path / "art", pipeline="quantize(acts=int8)", calibration=feeds, latency=True,
                evaluate=False, generate=False, cache=False).close()
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    quantize = next(p for p in report["passes"] if p["name"] == "quantize")
    assert quantize["drift"]["feeds"] == 2 and quantize["drift"]["rel"] > 0
    assert "(2 feeds)" in (tmp_path / "art" / "report.md").read_text()
    latency = report["run"]["latency"]
    assert latency["baseline"]["skipped"].startswith("not built: the source model's")
    assert latency["engine"] == "tcc" and latency["median_ms"] > 0


def test_the_smoothquant_alpha_search_runs_on_fewer_feeds_for_big_models(tmp_path, monkeypatch):
    """the smoothquant alpha search (tcc.compress.smoothing; 7 forward passes per feed) takes as many calibration feeds as fit
    SEARCH_FLOP (all 8 for a small model; its record's alpha_search.feeds says how many)."""
    import tcc
    from tcc.compress import smoothing as q
    from tcc.pipeline import estimate_flops
    from test_tokenizerless import save_decoder
    save_decoder(tmp_path / "m", "qwen2")
    program = tcc.trace(str(tmp_path / "m"), seq_len=8)
    feeds = [program.example_inputs(seed=i) for i in range(8)]
    assert q._search_feeds(program, feeds, 8, 7) == feeds
    monkeypatch.setattr(q, "SEARCH_FLOP", 3.5 * 7 * estimate_flops(program.gm))
    assert q._search_feeds(program, feeds, 8, 7) == feeds[:3]
    monkeypatch.setattr(q, "SEARCH_FLOP", 1.0)
    assert q._search_feeds(program, feeds, 8, 7) == feeds[:1]


@pytest.mark.parametrize("max_seq_len", [None, 16])
def test_tracing_takes_output_specs_from_the_graph(tmp_path, monkeypatch, max_seq_len):
    """Tracing does not run the model to learn its outputs (a forward pass of a 1B model, 10-14 s of its
    trace on 2 cores): the graph's fake values give the specs a run gives (dtype, example shape, the
    dynamic range), and the source's sha256, read beside loading and tracing, is the checkpoint's."""
    import numpy as np
    from tcc import cache
    from tcc.frontends import frontend, models
    from test_tokenizerless import save_decoder
    save_decoder(tmp_path / "m", "qwen2")
    with cache.use(False):
        fast = frontend.trace(str(tmp_path / "m"), seq_len=8, max_seq_len=max_seq_len)
        assert frontend._graph_outputs(fast.gm) is not None  # the specs came from the graph
        monkeypatch.setattr(frontend, "_graph_outputs", lambda gm: None)  # the fallback: run it once
        ran = frontend.trace(str(tmp_path / "m"), seq_len=8, max_seq_len=max_seq_len)
    assert fast.outputs == ran.outputs and fast.inputs == ran.inputs
    assert (fast.outputs[0].max_shape is not None) == (max_seq_len is not None)
    got = fast(fast.example_inputs())["logits"]
    assert got.shape == fast.outputs[0].shape and got.dtype == np.dtype(fast.outputs[0].dtype)
    assert fast.source["sha256"] == ran.source["sha256"] == models.model_hash((tmp_path / "m").resolve())


def test_distinct_rows_keep_the_order_rows_first_occur_in(monkeypatch):
    """structure._distinct_rows (recover()'s per-head feature layout, deduplicated in torch) is the
    ordered set of rows Python's dict gives, on random repeats, a real head layout, and rows whose
    one-number keys collide (the exact fallback)."""
    from tcc.ir.structure import _distinct_rows

    def by_dict(rows):
        return [list(r) for r in dict.fromkeys(tuple(r) for r in rows.to(torch.int64).tolist())]

    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        n, d, kinds = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
        base = torch.randint(0, 4, (kinds, d), generator=g).double()
        rows = base[torch.randint(0, kinds, (n,), generator=g)]
        assert _distinct_rows(rows) == by_dict(rows)
    heads = torch.arange(512, dtype=torch.float64).expand(1, 16, 512).reshape(1, 16, 8, 64).transpose(1, 2)
    assert _distinct_rows(heads.reshape(-1, 64)) == [list(range(h * 64, h * 64 + 64)) for h in range(8)]
    rows = torch.tensor([[1.0, 2.0], [2.0, 1.0], [1.0, 2.0], [3.0, 3.0]])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.ones(2, dtype=torch.int64))  # every key collides
    assert _distinct_rows(rows) == by_dict(rows) == [[1, 2], [2, 1], [3, 3]]
