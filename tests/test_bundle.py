"""Bundles (backends/tvm/bundle.py): an artifact plus its native runtime and C API, run as a user
deploys it: copied to a fresh directory, run with an empty environment (x86-64) or under qemu-aarch64
with only the aarch64 system libraries as its root (arm64), and compared with tcc.load.

One tiny random-init LLaMA (hidden 64, 2 layers, vocab 128; tests/test_generation.py), compiled with
prefill chunks of 8 and a context of 40 for each arch: its `main` (logits [1, 8, 128]) is what
tcc-run and the example C program (examples/c-api/run_model.c) run, its prefill/decode what
tcc-generate runs. Tolerances: tcc-run's outputs equal tcc.load's within 1e-6 (the same library on
the same inputs: measured 0.0); generated ids equal `tcc generate`'s greedy ids exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tcc
from tcc.errors import UserError

TOL = 1e-6
SYSROOT = "/usr/aarch64-linux-gnu"
PROMPT = [5, 17, 99, 3, 64, 12, 7, 88, 41, 2, 33]  # 11 ids: one full prefill chunk of 8 and a padded one
# what a bundle's libraries and binaries may need from the system: the C and C++ runtimes only
SYSTEM_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libstdc++.so.6",
               "libgcc_s.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}


def _tiny_llama(tmp_path_factory) -> Path:
    from test_generation import _tiny_folder
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    _tiny_folder(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _tiny_llama(tmp_path_factory)


def _compile_and_bundle(llama_dir, tmp_path_factory, target: str):
    from tcc.backends.tvm.bundle import make_bundle
    root = tmp_path_factory.mktemp(f"bundle-{target}")
    tcc.compile(str(llama_dir), target, out=root / "artifact", seq_len=8, max_context=40, verify=False).close()
    info = make_bundle(root / "artifact", root / "bundle")
    deployed = root / "deployed" / "bundle"  # copied elsewhere: rpaths must not name the build directory
    shutil.copytree(root / "bundle", deployed, symlinks=True)
    return root / "artifact", deployed, info


@pytest.fixture(scope="module")
def x86(llama_dir, tmp_path_factory):
    return _compile_and_bundle(llama_dir, tmp_path_factory, "x86")


def _inputs(tmp_path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    ids = np.array([PROMPT[:8]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    return {"input_ids": ids}, [f"input_ids={tmp_path / 'ids.npy'}"]


def _run(cmd: list[str], cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, cwd=cwd, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}: {r.stderr}")
    return r


def _python_greedy(artifact: Path, n: int) -> list[int]:
    with tcc.load(artifact) as art:
        return art.generate(PROMPT, max_new_tokens=n, stop_at_eos=False)["token_ids"]


def _needed(path: Path) -> set[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line}


def test_layout_and_self_contained(x86):
    _, bundle, info = x86
    for f in ("lib/model.so", "lib/libtcc.so", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "lib/libscipy_openblas.so",
              "include/tcc.h", "bin/tcc-run", "bin/tcc-generate", "lib/pkgconfig/tcc.pc", "weights.safetensors",
              "manifest.json", "README.md", "tcc-bundle.spec"):
        assert (bundle / f).is_file(), f
    assert os.access(bundle / "bin" / "tcc-run", os.X_OK)
    meta = json.loads((bundle / "tcc-bundle.json").read_text())
    assert meta["arch"] == "x86_64" and meta["runtime_bytes"] == info["runtime_bytes"] > 1_000_000
    ours = {p.name for p in (bundle / "lib").glob("*.so")}
    for binary in [*(bundle / "lib").glob("*.so"), *(bundle / "bin").iterdir()]:
        assert _needed(binary) <= ours | SYSTEM_LIBS, binary  # nothing from Python's site-packages


def test_tcc_run_matches_tcc_load(x86, tmp_path):
    artifact, bundle, _ = x86
    feeds, args = _inputs(tmp_path)
    r = _run([str(bundle / "bin" / "tcc-run"), *args, "-o", str(tmp_path)])
    assert "logits: float32 [1, 8, 128]" in r.stdout
    with tcc.load(artifact) as art:
        want = art(feeds)["logits"]
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == want.shape and np.abs(got - want).max() <= TOL


def test_tcc_generate_matches_tcc_generate(x86):
    artifact, bundle, _ = x86
    r = _run([str(bundle / "bin" / "tcc-generate"), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "20",
              "--no-stop"])
    assert [int(t) for t in r.stdout.strip().split(",")] == _python_greedy(artifact, 20)
    # seeded sampling: reproducible, and bounded by top-k 1 (= greedy)
    cmd = [str(bundle / "bin" / "tcc-generate"), "--ids", "1,2,3", "--max-new-tokens", "8", "--no-stop"]
    a, b = (_run(cmd + ["--temperature", "1.0", "--seed", "4"]).stdout for _ in range(2))
    assert a == b
    assert _run(cmd + ["--temperature", "1.0", "--top-k", "1", "--seed", "9"]).stdout == _run(cmd).stdout


def test_tcc_generate_speculates_with_the_verify_entries(x86):
    """tcc-generate --speculate lookup: prompt lookup's proposals checked by tcc_verify and rewound (the
    bundle carries the artifact's verify and verify4 entries) give plain greedy decoding's ids, in fewer
    model calls; a prompt that repeats itself makes lookup propose."""
    artifact, bundle, _ = x86
    spec = (bundle / "tcc-bundle.spec").read_text()
    assert "input verify/input_ids" in spec and "input verify4/input_ids" in spec and "draft_" not in spec
    prompt = PROMPT + PROMPT[:6]  # the second copy's start is a 3-gram match
    cmd = [str(bundle / "bin" / "tcc-generate"), "--ids", ",".join(map(str, prompt)), "--max-new-tokens", "24",
           "--no-stop", "--timing"]
    plain, fast = _run(cmd), _run(cmd + ["--speculate", "lookup"])
    with tcc.load(artifact) as art:
        want = art.generate(prompt, max_new_tokens=24, stop_at_eos=False)["token_ids"]
    assert [int(t) for t in plain.stdout.strip().split(",")] == want
    assert fast.stdout == plain.stdout
    calls, verifies, accepted, proposed = map(int, re.search(
        r"speculate lookup: (\d+) model calls \((\d+) verify\), (\d+) of (\d+) proposed", fast.stderr).groups())
    assert verifies >= 1 and proposed >= accepted and calls < 24  # plain greedy: 23 decode calls
    r = _run(cmd + ["--speculate", "lookup", "--temperature", "0.5"], check=False)
    assert r.returncode == 2 and "greedily" in r.stderr


def test_example_program_links_against_the_bundle(x86, tmp_path):
    """examples/c-api/run_model.c built with pkg-config against the deployed bundle."""
    artifact, bundle, _ = x86
    src = Path(__file__).resolve().parents[1] / "examples" / "c-api" / "run_model.c"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "tcc"], capture_output=True, text=True, check=True,
                           env={**os.environ, "PKG_CONFIG_PATH": str(bundle / "lib" / "pkgconfig")}).stdout.split()
    subprocess.run(["gcc", "-Wall", "-Werror", "-O2", str(src), *flags, "-lm", "-o", str(tmp_path / "app")], check=True)
    out = _run([str(tmp_path / "app"), str(bundle)]).stdout.split()
    ids = np.array([[(i * 7 + 3) % 50 for i in range(8)]], dtype=np.int64)  # the example's fixed input
    with tcc.load(artifact) as art:
        want = art({"input_ids": ids})["logits"]
    assert out[0] == "logits" and abs(float(out[2]) - want.sum(dtype=np.float64)) <= 1e-5 * np.abs(want).sum()
    assert np.abs(np.array(out[4:8], dtype=np.float64) - want.reshape(-1)[:4]).max() <= TOL
    lines = _run([str(tmp_path / "app"), str(bundle), ",".join(map(str, PROMPT)), "12"]).stdout.splitlines()
    assert [int(t) for t in lines[0].split(",")] == _python_greedy(artifact, 12)
    assert lines[1].startswith("decode(128): status 3: token id 128") and "vocabulary of 128" in lines[1]


def test_bad_input_is_an_error_code_and_message(x86, tmp_path):
    _, bundle, _ = x86
    run = str(bundle / "bin" / "tcc-run")
    np.save(tmp_path / "short.npy", np.zeros((1, 7), np.int64))
    r = _run([run, f"input_ids={tmp_path / 'short.npy'}"], check=False)
    assert r.returncode == 2 and "TCC_ERROR_INVALID_ARGUMENT" in r.stderr and "shape [1, 7]" in r.stderr
    np.save(tmp_path / "big.npy", np.full((1, 8), 500, np.int64))
    r = _run([run, f"input_ids={tmp_path / 'big.npy'}"], check=False)
    assert r.returncode == 2 and "outside [0, 128)" in r.stderr
    r = _run([str(bundle / "bin" / "tcc-generate"), "--ids", "5,128"], check=False)
    assert r.returncode == 2 and "outside the vocabulary of 128" in r.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt, symlinks=True)
    with open(corrupt / "weights.safetensors", "r+b") as f:  # one flipped byte in the data
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = _run([str(corrupt / "bin" / "tcc-run"), "--describe"], check=False)
    assert r.returncode == 2 and "TCC_ERROR_CORRUPT" in r.stderr and "sha256" in r.stderr


def test_refuses_a_directory_tcc_did_not_write(x86, tmp_path):
    from tcc.backends.tvm.bundle import make_bundle
    artifact, _, _ = x86
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write"):
        make_bundle(artifact, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written bundle left
    again = make_bundle(artifact, tmp_path / "b")  # a bundle tcc wrote is replaced
    assert make_bundle(artifact, tmp_path / "b")["bundle"] == again["bundle"]


@pytest.mark.arm64
def test_arm64_bundle_under_qemu(llama_dir, tmp_path_factory, tmp_path):
    """The arm64 bundle, deployed elsewhere, under qemu-aarch64 whose only root is the aarch64 system
    libraries: tcc-run equals tcc.load (the artifact under tcc's own qemu driver), tcc-generate equals
    `tcc generate`'s greedy ids, with and without --speculate lookup."""
    from conftest import missing_arm64_tools
    if missing_arm64_tools():
        pytest.skip(f"arm64 needs {', '.join(missing_arm64_tools())}")
    artifact, bundle, info = _compile_and_bundle(llama_dir, tmp_path_factory, "arm64")
    assert info["arch"] == "aarch64"
    cpu = json.loads((artifact / "manifest.json").read_text())["target"].get("qemu_cpu", "cortex-a72")
    qemu = ["qemu-aarch64", "-cpu", cpu, "-L", SYSROOT]
    feeds, args = _inputs(tmp_path)
    _run([*qemu, str(bundle / "bin" / "tcc-run"), *args, "-o", str(tmp_path)])
    with tcc.load(artifact) as art:
        want = art(feeds)["logits"]
    assert np.abs(np.load(tmp_path / "logits.npy") - want).max() <= TOL
    r = _run([*qemu, str(bundle / "bin" / "tcc-generate"), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
              "12", "--no-stop"])
    assert [int(t) for t in r.stdout.strip().split(",")] == _python_greedy(artifact, 12)
    # prompt-lookup speculation through the arm64 verify entries: the same ids (a repeating prompt makes it propose)
    prompt = ",".join(map(str, PROMPT + PROMPT[:6]))
    plain, fast = (_run([*qemu, str(bundle / "bin" / "tcc-generate"), "--ids", prompt, "--max-new-tokens", "12",
                         "--no-stop", "--timing", *extra]) for extra in ([], ["--speculate", "lookup"]))
    assert fast.stdout == plain.stdout and re.search(r"\(([1-9]\d*) verify\)", fast.stderr), fast.stderr
