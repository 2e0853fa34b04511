"""round-fp16, installed as a plugin: found through tcc's entry-point group, and what it does to a
small traced program's weights and outputs."""
from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

import tcc
from tcc.pipeline import PassContext, Pipeline, get_pass


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        self.small = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))), self.small(x)


@pytest.fixture
def program():
    torch.manual_seed(0)
    return tcc.trace(TwoLayers(), example_inputs={"x": torch.randn(4, 16)})


def test_registered_through_the_entry_point():
    (ep,) = [e for e in importlib.metadata.entry_points(group="tcc.passes") if e.name == "round-fp16"]
    assert ep.value == "tcc_plugin_example.round_fp16:RoundFp16"
    assert get_pass("round-fp16").__module__ == "tcc_plugin_example.round_fp16"


def test_weights_become_float16_values_and_outputs_drift_a_little(program):
    before = {k: v.detach().clone() for k, v in program.gm.named_parameters()}
    ctx = PassContext(calibration=[program.example_inputs(seed=s) for s in range(2)])
    out = Pipeline.parse("round-fp16(min_size=100)").run(program, ctx)
    params = dict(out.gm.named_parameters())
    for name, w in params.items():
        if name.endswith("weight") and w.numel() >= 100:
            assert torch.equal(w, w.half().float()), name
            change = (w - before[name]).abs().max().item()
            assert 0 < change <= before[name].abs().max().item() * 2 ** -11, name  # half an fp16 ulp
        else:  # biases and the 32-element `small` weight stay as they were
            assert torch.equal(w, before[name]), name
    record = ctx.records[0]
    assert record["details"]["weights_rounded"] == 2
    assert 0 < record["drift"]["rel"] < 1e-3  # fp16 weights move these outputs by ~1e-4 relative


def test_outputs_match_the_rounded_weights(program):
    """The rounded program computes exactly what its float16-valued weights give in float32."""
    feed = program.example_inputs(seed=3)
    out = Pipeline.parse("round-fp16").run(program, PassContext(calibration=[feed]))
    p = dict(out.gm.named_parameters())
    x = torch.from_numpy(feed["x"])
    h = torch.relu(x @ p["up.weight"].T + p["up.bias"])
    want = h @ p["down.weight"].T + p["down.bias"]
    np.testing.assert_allclose(out(feed)["output"], want.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_bad_option_is_a_user_error():
    with pytest.raises(tcc.UserError, match="min_size"):
        Pipeline.parse("round-fp16(min_size=-1)")
