"""The `tcc` command, run as a subprocess: happy paths print what they promise, and every bad input
exits 2 with one `tcc: error:` line naming the problem, no traceback, and nothing left behind (no
artifact directory, no hidden temp sibling, no half-written output file). The other exit codes are
real too: 3 for a missed accuracy budget, 1 for a bug (a pass that crashes), 130 for Ctrl-C.

Model inputs are small on purpose: a random-init BERT saved as a Hugging Face folder (conftest
`tiny_bert_dir`) compiles in seconds; MiniLM's real folder is used where the brief asks for it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ERROR_LINE = re.compile(r"^tcc( \w+)?: (internal )?error: ")


def tcc_cli(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tcc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_user_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2, no traceback, exactly one error line, and it contains every one of `words`."""
    line = assert_error(r, 2, *words)
    assert "internal error" not in line, line
    return line


def assert_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit code `code`, no traceback, exactly one error line, and it contains every one of `words`."""
    out = r.stdout + r.stderr
    assert r.returncode == code, f"exit code {r.returncode}:\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in r.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, f"expected one error line:\n{r.stderr}"
    for w in words:
        assert w.lower() in errors[0].lower(), f"{w!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture
def work(tmp_path) -> Path:
    """An empty directory for outputs; a test ends by checking what is left in it."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def compile_fails(model, work: Path, *args, env=None) -> subprocess.CompletedProcess:
    """`tcc compile MODEL -o WORK/out --seq-len 8 ARGS` (a later --seq-len in ARGS wins), checking
    that nothing is left in `work`."""
    r = tcc_cli("compile", model, "-o", work / "out", "--seq-len", 8, *args, env=env)
    assert sorted(os.listdir(work)) == [], f"left behind: {os.listdir(work)}"
    return r


# -- compile: bad models ---------------------------------------------------------------------------

def test_missing_model_path(work, tmp_path):
    assert_user_error(compile_fails(tmp_path / "no-such-model", work), "not found", "no-such-model")


def test_mistakes_are_answered_before_the_slow_imports(tmp_path):
    """A mistyped model path, and --help, answer without importing TVM, ONNX or transformers (each takes
    seconds to import: a missing path took 8.7 s to report before)."""
    code = ("import sys\nfrom tcc.cli import main\n"
            f"assert main(['compile', {str(tmp_path / 'nope')!r}]) == 2\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('tvm', 'onnx', 'transformers') if m in sys.modules), file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr


def test_folder_with_config_but_no_weights(work, tmp_path, tiny_bert_dir):
    model = tmp_path / "config-only"
    model.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", model)
    assert_user_error(compile_fails(model, work), "no weights", "config-only")


def test_pickled_weights_are_refused_never_unpickled(work, tmp_path, tiny_bert_dir):
    class Trap:  # unpickling this file creates `marker`
        def __reduce__(self):
            return open, (str(marker), "w")

    model, marker = tmp_path / "pickle-only", tmp_path / "UNPICKLED"
    model.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    assert_user_error(compile_fails(model, work), "pytorch_model.bin", "never unpickles")
    assert not marker.exists()


def test_truncated_safetensors(work, tmp_path, minilm_dir):
    model = tmp_path / "minilm-truncated"
    model.mkdir()
    for f in minilm_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, model)
    with open(minilm_dir / "model.safetensors", "rb") as src:
        (model / "model.safetensors").write_bytes(src.read(1 << 20))  # the first MB of ~90
    assert_user_error(compile_fails(model, work), "cannot load the model", "minilm-truncated")


def test_corrupt_config_json(work, tmp_path, tiny_bert_dir):
    model = tmp_path / "bad-config"
    shutil.copytree(tiny_bert_dir, model)
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    assert_user_error(compile_fails(model, work), "config.json")


# -- compile: bad options ----------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--target", "sparc"], ["unknown target 'sparc'"]),
    (["--task", "translation"], ["--task", "invalid choice"]),
    (["--pipeline", "quantize-weights(bits=8"], ["pipeline text", "column 24"]),
    (["--pipeline", "frobnicate"], ["unknown pass 'frobnicate'"]),
    (["--pipeline", "quantize-weights(bitz=8)"], ["quantize-weights", "no option 'bitz'"]),
    (["--pipeline", "quantize-weights(bits=4)"], ["option 'bits'", "got 4"]),
    (["--frobnicate"], ["unrecognized arguments", "--frobnicate"]),
    (["--seq-len", "0"], ["seq-len", "positive"]),
], ids=["target", "task", "pipeline-syntax", "pass", "pass-option", "option-value", "flag", "seq-len"])
def test_bad_compile_options(work, tiny_bert_dir, args, words):
    assert_user_error(compile_fails(tiny_bert_dir, work, *args), *words)


def test_seq_len_beyond_the_models_positions(work, tiny_bert_dir):
    assert_user_error(compile_fails(tiny_bert_dir, work, "--seq-len", 100), "100", "maximum of 64")


@pytest.fixture(scope="module")
def output_is_a_file(tmp_path_factory, tiny_bert_dir):
    """`tcc compile -o FILE`, run once: (result, the folder holding FILE)."""
    work = tmp_path_factory.mktemp("output-is-a-file")
    (work / "taken").write_text("mine")
    return tcc_cli("compile", tiny_bert_dir, "-o", work / "taken", "--seq-len", 8), work


def test_output_path_is_a_file(output_is_a_file):
    r, work = output_is_a_file
    assert_user_error(r, "not a directory")
    assert os.listdir(work) == ["taken"] and (work / "taken").read_text() == "mine"


def test_bad_output_path_fails_before_loading_the_model(output_is_a_file):
    r, _ = output_is_a_file
    assert "loading" not in r.stderr and "tracing" not in r.stderr, r.stderr


def test_arm64_without_cross_compiler_names_the_debian_package(work, tmp_path, tiny_bert_dir):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = compile_fails(tiny_bert_dir, work, "--target", "arm64", env={**os.environ, "PATH": str(empty)})
    assert_user_error(r, "aarch64-linux-gnu-gcc")
    assert "gcc-aarch64-linux-gnu" in r.stderr  # the hint: apt-get install gcc-aarch64-linux-gnu


# -- compile, passes, analyze: happy paths -------------------------------------------------------------

def test_compile_json_prints_parseable_summary(work, tiny_bert_dir, tmp_path):
    r = tcc_cli("compile", tiny_bert_dir, "-o", work / "art", "--seq-len", 8, "--json", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["artifact"] == str((work / "art").resolve())
    assert summary["target"] == "x86" and summary["pipeline"] == "dce"
    assert summary["verify"]["last_hidden_state"]["max_abs_err"] <= 1e-4
    assert os.listdir(work) == ["art"]  # the staging directory was renamed, not copied
    assert sorted(os.listdir(work / "art")) == ["build.log", "manifest.json", "model.so", "report.html", "report.json",
                                                "report.md", "weights.safetensors"]
    assert (tmp_path / "r.json").read_text() == (work / "art" / "report.json").read_text()  # --report: a copy
    assert json.loads((tmp_path / "r.json").read_text())["final"]["exit_status"] == 0


# -- exit codes other than 0 and 2 ---------------------------------------------------------------------

def test_exit_3_when_the_accuracy_budget_is_missed(work, tiny_bert_dir, tmp_path):
    r = compile_fails(tiny_bert_dir, work, "--pipeline", "quantize-weights(bits=8)", "--max-drift", "1e-6",
                      "--report", tmp_path / "report.json")
    assert_error(r, 3, "last_hidden_state", "more than --max-drift 1e-06", "no artifact")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["exit_status"] == 3 and not report["final"]["max_drift"]["met"]
    assert report["final"]["max_drift"]["drift"] > 1e-6


BUGGY_PASS = """
import sys
from tcc.cli import main
from tcc.pipeline import Pass, register

@register
class Crash(Pass):
    \"\"\"A pass with a bug.\"\"\"
    name = "crash"

    def run(self, program, ctx):
        return program.gm.no_such_attribute

sys.exit(main(sys.argv[1:]))
"""


def test_exit_1_when_a_pass_crashes(work, tiny_bert_dir, tmp_path):
    args = ["compile", tiny_bert_dir, "-o", work / "out", "--seq-len", 8, "--pipeline", "crash", "--report", tmp_path / "r.json"]
    r = subprocess.run([sys.executable, "-c", BUGGY_PASS, *map(str, args)], capture_output=True, text=True)
    assert_error(r, 1, "internal error", "AttributeError", "no_such_attribute")
    assert "--debug" in r.stderr  # the hint: run again with --debug for the traceback
    assert os.listdir(work) == []
    assert json.loads((tmp_path / "r.json").read_text())["final"]["exit_status"] == 1


def test_exit_130_when_interrupted(work, tiny_bert_dir):
    # SIGINT back to its default in the child: a shell without job control starts background jobs (pytest run
    # with `&`) with SIGINT ignored, children inherit that, and an ignored Ctrl-C is no interrupt to test
    proc = subprocess.Popen([sys.executable, "-m", "tcc.cli", "compile", str(tiny_bert_dir), "-o", str(work / "out"),
                             "--seq-len", "8", "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".out.tmp-") for p in work.iterdir()):  # it is compiling (staging)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "tcc: interrupted" in err and "Traceback" not in err
    assert os.listdir(work) == []  # the staged artifact was removed


def test_passes_lists_builtin_passes_with_options():
    r = tcc_cli("passes")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines() if line and not line.startswith(" ")]
    assert {"dce", "fold-constants", "quantize-weights"} <= set(names)
    for option in ("bits: int [8] = 8", "min_size: int = 4096", "skip: list[str] = []", "size_limit: int"):
        assert option in r.stdout
    listed = json.loads(tcc_cli("passes", "--json").stdout)
    assert listed["quantize-weights"]["kind"] == "transform"
    assert listed["quantize-weights"]["options"]["bits"] == {"type": "int", "default": 8,
                                                             "help": "weight bit width (8; int4 is quantize(weights=int4))",
                                                             "choices": [8]}


@pytest.mark.slow
def test_analyze_minilm_shows_blocks_and_heads():
    r = tcc_cli("analyze", "minilm")
    assert r.returncode == 0, r.stderr
    assert "6 blocks" in r.stdout and "12 heads" in r.stdout
    assert len(re.findall(r"^block \d ", r.stdout, re.M)) == 6


# -- run ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_artifact(tiny_bert_dir, tmp_path_factory) -> Path:
    import tcc
    out = tmp_path_factory.mktemp("cli") / "tiny-bert-x86"
    tcc.compile(str(tiny_bert_dir), "x86", out=out, seq_len=8, verify=False).close()
    return out


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def run_fails(artifact, inputs, work: Path) -> subprocess.CompletedProcess:
    r = tcc_cli("run", artifact, "--inputs", inputs, "-o", work / "out.npz")
    assert os.listdir(work) == [], f"left behind: {os.listdir(work)}"
    return r


@pytest.mark.slow
def test_run_writes_outputs_matching_pytorch(minilm_x86, work):
    feed, want = minilm_x86.feeds[0], minilm_x86.want[0]  # the padded one
    r = tcc_cli("run", minilm_x86.dir, "--inputs", npz(work / "in.npz", **feed), "-o", work / "out.npz")
    assert r.returncode == 0, r.stderr
    assert "last_hidden_state: float32 [1, 16, 384]" in r.stdout
    assert sorted(os.listdir(work)) == ["in.npz", "out.npz"]
    with np.load(work / "out.npz") as out:
        assert out.files == ["last_hidden_state"]
        assert np.max(np.abs(out["last_hidden_state"] - want["last_hidden_state"])) <= 1e-4


@pytest.mark.slow
def test_run_wrong_input_names(minilm_x86, tmp_path, work):
    ids = np.zeros((1, 16), np.int64)
    r = run_fails(minilm_x86.dir, npz(tmp_path / "in.npz", ids=ids, mask=ids), work)
    assert_user_error(r, "missing ['input_ids', 'attention_mask']", "unknown ['ids', 'mask']")


@pytest.mark.slow
def test_run_wrong_shapes(minilm_x86, tmp_path, work):
    ids = np.zeros((1, 8), np.int64)
    r = run_fails(minilm_x86.dir, npz(tmp_path / "in.npz", input_ids=ids, attention_mask=ids + 1), work)
    assert_user_error(r, "input_ids", "[1, 8]", "[1, 16]")


@pytest.mark.slow
def test_run_wrong_dtype(minilm_x86, tmp_path, work):
    ids = np.full((1, 16), 1.5, np.float32)
    r = run_fails(minilm_x86.dir, npz(tmp_path / "in.npz", input_ids=ids, attention_mask=np.ones((1, 16), np.int64)), work)
    assert_user_error(r, "input_ids", "float32", "int64")


@pytest.mark.slow
@pytest.mark.parametrize("token", [-1, 10**9])
def test_run_token_ids_outside_the_vocabulary(minilm_x86, tmp_path, work, token):
    ids = np.full((1, 16), token, np.int64)
    r = run_fails(minilm_x86.dir, npz(tmp_path / "in.npz", input_ids=ids, attention_mask=np.ones_like(ids)), work)
    assert_user_error(r, "input_ids", "30522")


def test_run_missing_inputs_file(tiny_artifact, tmp_path, work):
    assert_user_error(run_fails(tiny_artifact, tmp_path / "absent.npz", work), "absent.npz", "not found")


def test_run_inputs_file_not_npz(tiny_artifact, tmp_path, work):
    (tmp_path / "in.npz").write_text("input_ids,attention_mask\n1,1\n")
    assert_user_error(run_fails(tiny_artifact, tmp_path / "in.npz", work), "cannot read", "in.npz")


def test_run_on_a_folder_that_is_not_an_artifact(tiny_bert_dir, tmp_path, work):
    inputs = npz(tmp_path / "in.npz", input_ids=np.zeros((1, 8), np.int64))
    assert_user_error(run_fails(tiny_bert_dir, inputs, work), "not a tcc artifact")
    assert_user_error(run_fails(tmp_path / "nowhere", inputs, work), "nowhere", "not found")


def test_interrupts_inside_a_tvm_build_are_deferred_not_lost():
    """SIGINT within deferred_interrupts (what build_library runs TVM in) becomes KeyboardInterrupt
    when the block ends: TVM's FFI would otherwise swallow it and the build would go on."""
    from tcc.errors import deferred_interrupts
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached_end = True
    assert reached_end
