"""A pass plugin installed with pip (examples/tcc-plugin-example, which .ci/setup installs): tcc
lists it, a pipeline runs it end to end, and the plugin's own tests pass."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_cli import tcc_cli

PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "tcc-plugin-example"


@pytest.fixture(scope="module", autouse=True)
def installed():
    try:
        importlib.metadata.distribution("tcc-plugin-example")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("tcc-plugin-example is not installed: run .ci/setup "
                    "(pip install -e examples/tcc-plugin-example --no-deps)")


def test_tcc_passes_lists_the_plugin():
    r = tcc_cli("passes")
    assert r.returncode == 0, r.stderr
    assert "round-fp16  [transform]  `round-fp16`: round every linear layer's weight" in r.stdout
    listed = json.loads(tcc_cli("passes", "--json").stdout)["round-fp16"]
    assert listed["kind"] == "transform" and listed["options"]["min_size"]["default"] == 0


def test_a_pipeline_runs_the_plugin(tiny_bert_dir, tmp_path):
    r = tcc_cli("compile", tiny_bert_dir, "--seq-len", 8, "-o", tmp_path / "art", "--pipeline", "round-fp16(min_size=1000)",
                "--no-latency", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    (rounded,) = [p for p in report["passes"] if p["name"] == "round-fp16"]
    assert rounded["details"]["weights_rounded"] == 12  # q, k, v, o, up, down in each of 2 layers
    assert 0 < rounded["drift"]["rel"] < 1e-3
    # the artifact stores what the pass left: the linear weights (q/k/v fused into one tensor per
    # layer by the backend) hold float16 values, the embedding tables (not linears) do not
    weights = load_file(str(tmp_path / "art" / "weights.safetensors"))
    f32 = {k: w for k, w in weights.items() if w.ndim == 2 and w.dtype == np.float32}
    fp16_valued = {k for k, w in f32.items() if np.array_equal(w, w.astype(np.float16).astype(np.float32))}
    assert fp16_valued == {k for k in f32 if "embeddings" not in k} and len(fp16_valued) == 8


def test_the_plugins_own_tests_pass():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
                       capture_output=True, text=True, cwd=PLUGIN, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 passed" in r.stdout
