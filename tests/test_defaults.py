"""Defaults that work on any machine, and a compile's terminal output that is tcc's own.

- targets: `x86` (the default) is the portable x86-64-v3 build, not this host's CPU; `native` is the
  host's; every target is listed by `tcc targets` and in `tcc compile --help`; the manifest names the
  CPU features the code uses and loading refuses an artifact whose features this CPU lacks.
- calibration: the default text ships inside the package; a calibrated compile works from an
  installed wheel, in a directory with no ../shared, without $TCC_CALIBRATION_TEXT.
- output: a compile prints tcc's progress lines only; what TVM and the other libraries print goes to
  the artifact's build.log; gathers are in TVM's "clip" mode, so an out-of-range token id that reaches
  the library past tcc's own check reads a valid row instead of crashing the process.
~60 s on 2 cores (two subprocess compiles of a tiny BERT, a wheel build).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_user_error, tcc_cli

from tcc.backends.tvm.targets import TARGETS, X86_EXTENSIONS, X86_LEVELS, get_target, host_cpu
from tcc.errors import UserError
from tcc.backends.tvm.targets import host_cpu_features

ROOT = Path(__file__).resolve().parents[1]
X86_HOST = os.uname().machine == "x86_64"

# Every line a compile prints (stderr progress, stdout summary) has one of these forms.
TCC_LINES = [r".+ \.\.\.$",                      # a step starts
             r".+: \d+\.\d s$",                   # ... and ends
             r"\[\d+/\d+\] \S+ \d",               # a pass's record
             r"wrote /",                          # the artifact
             r"\w+: max abs (error|change) vs ",  # the summary on stdout
             r"library for \S+ from the cache",
             r"(\d+(\.\d+)?× (smaller|larger)|the same size), .+\(report\.html\)$"]  # the report's summary line


def assert_tccs_own(text: str) -> None:
    for line in text.splitlines():
        assert not re.search(r"Warning|^\[\d\d:\d\d:\d\d\]|Traceback|it/s|%\|", line), f"library output: {line!r}"
        assert any(re.match(p, line) for p in TCC_LINES), f"not a tcc line: {line!r}"


# -- targets --------------------------------------------------------------------------------------------

def test_every_target_is_listed(capsys):
    from tcc.cli import main
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TARGETS)
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # a description each
    assert "the default" in lines[0] and lines[0].startswith("x86 ")
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in TARGETS:
        assert name in help_text
    assert "tcc targets" in help_text
    with pytest.raises(UserError, match="unknown target 'x86-64-v9'") as e:
        get_target("x86-64-v9")
    assert "native" in e.value.hint and "tcc targets" in e.value.hint


@pytest.mark.skipif(not X86_HOST, reason="an x86-64 host")
def test_default_target_is_portable_and_native_is_the_host():
    x86, native = get_target("x86"), get_target("native")
    assert x86.tvm["mcpu"] == "x86-64-v3" and x86.tvm["mcpu"] != host_cpu()
    assert x86.cflags == ("-march=x86-64-v3",) and x86.cpu_features == X86_LEVELS["x86-64-v3"]
    assert {"avx2", "fma"} <= set(x86.cpu_features) and not any("avx512" in f for f in x86.cpu_features)
    assert native.tvm["mcpu"] == host_cpu() and native.cflags == ("-march=native",)
    flags = host_cpu_features()
    assert set(native.cpu_features) <= flags and set(X86_LEVELS["x86-64-v2"]) <= set(native.cpu_features)
    assert get_target("x86_64").name == "x86" and get_target("host").name == "native"
    assert get_target("x86-64-v4").to_json()["cpu_features"][-5:] == list(X86_LEVELS["x86-64-v4"][-5:])


# -- one compile in a subprocess: its output, then its artifact --------------------------------------

@pytest.fixture(scope="module")
def compiled(tiny_bert_dir, tmp_path_factory):
    """`python -m tcc.cli compile` of the tiny BERT for the default target, the library built anew."""
    out = tmp_path_factory.mktemp("defaults") / "tiny-x86"
    r = tcc_cli("compile", tiny_bert_dir, "--seq-len", 8, "-o", out, "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


@pytest.mark.skipif(not X86_HOST, reason="an x86-64 host")
def test_compile_prints_tccs_lines_only(compiled):
    out, r = compiled
    assert_tccs_own(r.stderr + r.stdout)
    assert "compiling with TVM for x86" in r.stderr  # TVM did build it (not the cache)
    log = (out / "build.log").read_text()
    assert log.startswith("# what the libraries tcc called")
    assert "Fast mode segfaults" not in log  # the gathers are in clip mode: TVM has nothing to warn about
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["name"] == "x86" and m["target"]["tvm"]["mcpu"] == "x86-64-v3"
    assert m["target"]["cpu_features"] == list(X86_LEVELS["x86-64-v3"])
    assert "build.log" not in m["files"]  # a log, not part of what the artifact computes


@pytest.mark.skipif(not X86_HOST, reason="an x86-64 host")
def test_out_of_range_token_ids_read_a_valid_row(compiled, tiny_bert_dir):
    import tcc
    out, _ = compiled
    vocab = json.loads((tiny_bert_dir / "config.json").read_text())["vocab_size"]
    ids = np.arange(8, dtype=np.int64)[None] * 7
    feed = {"input_ids": ids, "attention_mask": np.ones((1, 8), np.int64), "token_type_ids": np.zeros((1, 8), np.int64)}
    with tcc.load(out) as art:
        feed = {s.name: feed[s.name] for s in art.inputs}
        bad = dict(feed, input_ids=ids.copy())
        bad["input_ids"][0, 3] = vocab + 10 ** 6
        with pytest.raises(UserError, match=f"outside the valid range \\[0, {vocab}\\)"):
            art(bad)  # tcc's own check
        # past that check, straight into the library: the id reads the last row (clip), no crash
        got = art._impl(bad)["last_hidden_state"]
        clipped = dict(feed, input_ids=ids.copy())
        clipped["input_ids"][0, 3] = vocab - 1
        want = art(clipped)["last_hidden_state"]
    assert np.isfinite(got).all() and np.array_equal(got, want)


@pytest.mark.skipif(not X86_HOST, reason="an x86-64 host")
def test_load_refuses_an_artifact_whose_cpu_features_this_cpu_lacks(compiled, tmp_path):
    import tcc
    out, _ = compiled
    with tcc.load(out) as art:  # the artifact as compiled loads here
        assert art.target["cpu_features"]
    lacking = sorted(set(X86_EXTENSIONS) - host_cpu_features())[:1] or ["avx10_2"]  # one this CPU lacks
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["target"]["cpu_features"] += lacking
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError) as e:
        tcc.load(copy)
    assert e.value.message.endswith(f"--target x86 and needs CPU features this CPU lacks: {lacking[0]}")
    assert "--target x86" in e.value.hint and "native" in e.value.hint
    ids = np.zeros((1, 8), np.int64)
    np.savez(tmp_path / "in.npz", input_ids=ids, attention_mask=ids + 1, token_type_ids=ids)
    r = tcc_cli("run", copy, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert_user_error(r, "--target x86", lacking[0])
    assert not (tmp_path / "out.npz").exists()


# -- the libraries' output goes to a log -----------------------------------------------------------------

LIBRARY_OUTPUT = r"""
import os, sys, warnings
from tcc import progress
log, debug = sys.argv[1], sys.argv[2] == "debug"
progress.show_library_output(debug)
with progress.library_output(log):
    os.write(2, b"[00:00:00] /project/include/tvm/topi/transform.h:1: Warning: native noise\n")
    warnings.warn("a library's warning")
    print("python noise", file=sys.stderr)
    progress.console.print("tcc progress line")
    with progress.library_output(log + ".inner"):
        os.write(2, b"inner noise\n")
        progress.console.print("tcc inner line")
print("after", file=sys.stderr)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_library_output_goes_to_the_log_and_tcc_keeps_the_terminal(tmp_path, debug):
    log = tmp_path / "build.log"
    r = subprocess.run([sys.executable, "-c", LIBRARY_OUTPUT, str(log), "debug" if debug else "-"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    noise = ["Warning: native noise", "a library's warning", "python noise", "inner noise"]
    if debug:  # tcc --debug: nothing redirected, no log
        assert all(n in r.stderr for n in noise) and not log.exists()
        return
    assert r.stderr.splitlines() == ["tcc progress line", "tcc inner line", "after"]
    text, inner = log.read_text(), Path(str(log) + ".inner").read_text()
    assert all(n in text for n in noise[:3]) and "tcc progress" not in text and "inner noise" not in text
    assert "inner noise" in inner and "tcc inner" not in inner


# -- the calibration text ships in the package ------------------------------------------------------------

def test_default_calibration_text_is_packaged(monkeypatch):
    from tcc.compress import calibration
    monkeypatch.delenv("TCC_CALIBRATION_TEXT", raising=False)
    assert calibration.default_text() == calibration.DEFAULT_TEXT
    assert calibration.DEFAULT_TEXT.parent == Path(calibration.__file__).parents[1] / "data"  # tcc/data
    readme = (calibration.DEFAULT_TEXT.parent / "README.md").read_text()
    for f in (calibration.DEFAULT_TEXT, calibration.HELD_OUT_TEXT):
        text = f.read_text(encoding="utf-8")
        assert f.name in readme and len(text) > 9000 and text.isascii()
    assert "public domain" in readme.lower() and "CC0" in readme
    assert "calibration.txt" in " ".join(compile_help().split())


def compile_help() -> str:
    import contextlib
    import io
    from tcc.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["compile", "--help"])
    return buf.getvalue()


@pytest.mark.skipif(not X86_HOST, reason="an x86-64 host")
def test_calibrated_compile_from_an_installed_wheel(tiny_bert_with_its_tokenizer, tmp_path):
    """tcc built as a wheel and installed into a fresh directory, run from a directory with no
    ../shared and no $TCC_CALIBRATION_TEXT: a W8A8 compile calibrates on the packaged text."""
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             "tests", "benchmarks", "docs", "examples"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("tcc-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere" / "work"
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "TCC_CALIBRATION_TEXT"}
    env["PYTHONPATH"] = str(site)
    code = ("import sys, tcc, tcc.cli; assert tcc.__file__.startswith(sys.argv[1]), tcc.__file__; "
            "sys.exit(tcc.cli.main(sys.argv[2:]))")
    r = subprocess.run([sys.executable, "-c", code, str(site), "compile", str(tiny_bert_with_its_tokenizer),
                        "--seq-len", "8", "-p", "quantize(acts=int8)", "-o", "art", "--no-latency"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tokenizing calibration text calibration.txt" in r.stderr
    assert_tccs_own(r.stderr + r.stdout)
    m = json.loads((work / "art" / "manifest.json").read_text())
    assert [p["pass"] for p in m["passes"]] == ["dce", "quantize"]
    assert not (work.parent / "shared").exists()
