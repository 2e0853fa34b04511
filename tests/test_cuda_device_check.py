"""benchmarks/cuda_device_check.py without a GPU: the pack (what travels to the GPU machine, its size,
its sources byte for byte), the script run from the pack with its kernel outputs from the CPU replay
(the same cases, comparisons and verdicts as on the GPU), the nvcc build of the kernels' library as
the GPU run builds it, loaded with tvm_ffi from the pack and every launcher called with the GPU run's
real arguments (on tensors that claim to be on CUDA: each must pass its argument checks and fail only
at the launch), and the comparisons failing on a wrong output. The GPU run itself: docs/CUDA.md.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import tcc.ir.ops
from tcc.backends.kernels import quant_layout
from tcc.backends.kernels.cuda import layout

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "cuda_device_check.py"
HAVE_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def _script():
    spec = importlib.util.spec_from_file_location("cuda_device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cuda_device_check"] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A pack for this Python (its tvm_ffi copied from the installed one: no download)."""
    out = tmp_path_factory.mktemp("pack") / "cuda-check"
    proc = subprocess.run([sys.executable, str(SCRIPT), "pack", "--out", str(out), "--python", PY],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return out


def test_pack_holds_the_sources_and_fits(packed):
    mod = _script()
    info = json.loads((packed / "pack.json").read_text())
    files = [p for p in packed.rglob("*") if p.is_file() and p.name != "pack.json"]
    assert info["bytes"] == sum(p.stat().st_size for p in files) < 64 * 2**20
    for dest, src in mod.SOURCES.items():  # byte for byte what the repository holds
        assert (packed / dest).read_bytes() == (ROOT / src).read_bytes()
        assert info["sha256"][dest] == hashlib.sha256((ROOT / src).read_bytes()).hexdigest()
    from tcc.backends.kernels.build import NVCC_FLAGS
    assert info["nvcc_flags"] == NVCC_FLAGS and info["python"] == PY
    for f in ("site/tvm_ffi/__init__.py", "site/tvm_ffi/lib/libtvm_ffi.so", "site/tvm_ffi/include/tvm/ffi/function.h",
              "cuda_device_check.sh"):
        assert (packed / f).is_file(), f
    assert "cuda_device_check.py\" run --results" in (packed / "cuda_device_check.sh").read_text()


def test_pack_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    proc = subprocess.run([sys.executable, str(SCRIPT), "pack", "--out", str(tmp_path), "--python", PY],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "not a pack of this script" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_run_needs_a_pack(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--results", str(tmp_path / "r"), "--cpu-replay"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "is not a pack" in proc.stderr


def test_cpu_replay_and_preflight_from_the_pack(packed, tmp_path):
    """The script run from the pack (the GPU run's code path up to the launches): every case through
    the CPU replay meets its criterion; with nvcc, the kernels' library is built as on the GPU (for
    sm_90), loaded with the pack's tvm_ffi, and every launcher accepts its case's arguments."""
    cmd = [sys.executable, str(packed / "cuda_device_check.py"), "run", "--results", str(tmp_path), "--cpu-replay",
           "--quick"] + ([] if HAVE_NVCC else ["--no-build"])
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["correctness"]
    assert report["mode"] == "cpu-replay" and len(rows) == len(_script().cases(quick=True))
    assert {r["op"] for r in rows} == {"a8w8", "w4", "sp24"} and all(r["ok"] for r in rows)
    assert all(r["mismatches"] == 0 for r in rows if r["op"] == "a8w8")
    if HAVE_NVCC:
        assert len(report["preflight"]) == len(rows) and all(r["ok"] for r in report["preflight"])
        assert "built tcc_cuda_kernels_sm_90.so" in proc.stdout
    table = (tmp_path / "table.md").read_text()
    assert f"{len(rows)}/{len(rows)} cases pass" in table


def test_comparisons_fail_on_wrong_outputs():
    """A verdict that could not fail would prove nothing: one ulp off in W8A8, 2e-5 in int4, 3e-3 in
    2:4 each fail their case."""
    mod = _script()
    ref = types.SimpleNamespace(ops=tcc.ir.ops, quant_layout=quant_layout, layout=layout)
    for op, variant, group, bump in (("a8w8", "sym", 0, None), ("w4", "asym g16", 16, 2e-5), ("sp24", "-", 0, 3e-3)):
        c = mod.Case(op, "odd", "-", 5, 37, 64, variant, group)
        d = mod.build_case(c, ref)
        assert mod.compare(c, d["ref"].clone(), d)["ok"]
        got = d["ref"].clone()
        if bump is None:
            got.view(torch.int32)[2, 3] += 1
        else:
            got[2, 3] += bump * float(d["ref"].abs().max())
        row = mod.compare(c, got, d)
        assert not row["ok"] and (op != "a8w8" or row["mismatches"] == 1)


def test_targets_from_timings():
    mod = _script()
    rows = [{"case": "c", "impl": "tcc a8w8", "m": 128, "us": 10.0, "peak_bw_share": None},
            {"case": "c", "impl": "torch fp16 linear (cuBLAS)", "m": 128, "us": 12.0, "peak_bw_share": None},
            {"case": "g", "impl": "tcc w4", "m": 1, "us": 5.0, "peak_bw_share": 0.75}]
    t = mod.targets({"correctness": [{"ok": True}], "timings": rows})
    assert t["a8w8_vs_fp16_at_M128"] == [{"case": "c", "vs_fp16_cublas": 1.2}] and t["a8w8_ge_1.5x"] is False
    assert t["w4_gemv_ge_70pct"] is True and t["all_kernels_correct"] is True
    assert mod.peaks("NVIDIA H100 80GB HBM3")["matched"] == "H100" and mod.peaks("NVIDIA H200")["hbm_Bps"] == 4.8e12
