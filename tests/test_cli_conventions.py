"""The CLI reads like its neighbours (issue 16, items 3 and 4): --version, global flags after the
command, `tcc targets`, help that shows defaults, `tcc passes` with each option's values, presets
(named pipelines) for --preset and inside -p, and `tcc info ARTIFACT` (text and --json)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json

import pytest

from tcc.cli import _text, build_parser, main
from tcc.errors import UserError
from tcc.pipeline import Pass, Pipeline, register

# The presets as docs/PIPELINES.md documents them, spelled out here (not read from tcc.pipeline.presets)
SPELLED_OUT = {
    "q8": "quantize(weights=int8,embeddings=true)",
    "w8a8": "quantize(weights=int8,acts=int8,method=smoothquant,embeddings=true)",
    "q4": "quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)",
    "q4_1": "quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)",
    "q4-fast": "quantize(weights=int4,group=128,sym=false,method=gptq,embeddings=true)",
    "q4_0": "quantize(weights=int4,group=32,sym=true,embeddings=true)",
    "w4a8": "quantize(weights=int4,group=128,sym=false,method=gptq,acts=int8,embeddings=true)",
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _said(capsys) -> str:
    """What tcc printed, both streams (errors go to stderr)."""
    out = capsys.readouterr()
    return out.out + out.err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tcc {importlib.metadata.version('tcc')}"


@pytest.mark.parametrize("command", ["compile", "run", "eval", "generate", "bench", "analyze", "passes", "targets",
                                     "presets", "info"])
def test_global_flags_before_or_after_the_command(command):
    parser = build_parser()
    rest = {"run": ["A", "-i", "x.npz", "-o", "y.npz"], "eval": ["A", "--text", "t"], "generate": ["A", "--prompt", "p"],
            "bench": ["A"], "analyze": ["M"], "info": ["A"]}.get(command, [])
    for argv in ([command, *rest, "--debug", "-q"], ["--debug", "-q", command, *rest], ["--debug", command, *rest, "-q"]):
        a = parser.parse_args(argv)
        assert (a.debug, a.quiet) == (True, True), argv
    a = parser.parse_args([command, *rest])
    assert (a.debug, a.quiet) == (False, False)


def test_debug_after_the_command_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nothing")
    assert main(["info", missing]) == 2  # one line and a hint
    assert "not found" in _said(capsys)
    with pytest.raises(UserError, match="not found"):  # --debug re-raises: the traceback
        main(["info", missing, "--debug"])


def test_targets_lists_every_target(capsys):
    from tcc.backends.tvm.targets import ALIASES, TARGETS, get_target
    assert main(["targets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(TARGETS)
    assert all(f"also: {', '.join(a for a, n in ALIASES.items() if n == name)}" in line
               for name, line in zip(TARGETS, lines) if name in ALIASES.values())
    assert {"x86", "native", "x86-64-v2", "x86-64-v3", "arm64", "sm80", "sm90"} <= set(TARGETS)
    assert get_target("cuda").name == "sm80" and ALIASES["cuda"] == "sm80"
    target_help = next(_text(a.help) for a in _subparsers()["compile"]._actions if "--target" in a.option_strings)
    assert all(name in target_help for name in TARGETS) and "cuda (= sm80)" in target_help


def test_help_names_inputs_targets_presets_and_defaults():
    from tcc.frontends import models; from tcc.pipeline import presets
    from tcc.backends.tvm.targets import TARGETS
    top = build_parser().format_help()
    for word in [".gguf", ".onnx", "Hugging Face", *models.ALIASES, *TARGETS, *presets.names()]:
        assert word in top, word
    for name, parser in _subparsers().items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"tcc {name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):  # the help says the default
                assert "default" in action.help or f"(default: {action.default})" in text, (name, action.dest)
    assert "(default: 20)" in _subparsers()["bench"].format_help()
    assert "(default: 64)" in _subparsers()["generate"].format_help()
    assert "(default: 4096)" in _subparsers()["eval"].format_help()


def test_passes_lists_the_values_an_option_takes(capsys):
    from tcc.pipeline import all_passes
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "weights: str [int8 | int4] = 'int8'" in out
    assert "method: str [rtn | gptq | awq | smoothquant]" in out
    assert main(["passes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for name, cls in all_passes().items():
        for key, opt in cls.options.items():
            assert listed[name]["options"][key]["choices"] == (list(opt.choices) if opt.choices else None)


@pytest.mark.parametrize("name", sorted(SPELLED_OUT))
def test_a_preset_is_its_pipeline(name):
    assert Pipeline.parse(name) == Pipeline.parse(SPELLED_OUT[name])
    assert Pipeline.parse(name).canonical() == Pipeline.parse(SPELLED_OUT[name]).canonical()
    # inside a pipeline, among passes
    assert Pipeline.parse(f"drop-blocks(count=2),{name}") == Pipeline.parse(f"drop-blocks(count=2),{SPELLED_OUT[name]}")


def test_every_preset_is_documented_and_listed(capsys):
    from pathlib import Path

    from tcc.pipeline import presets
    assert set(presets.names()) == set(SPELLED_OUT)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "PIPELINES.md").read_text()
    assert main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for name, p in presets.PRESETS.items():
        assert f"`{name}`" in docs and p.pipeline in docs, name
        assert listed[name]["pipeline"] == p.pipeline and listed[name]["aliases"] == list(p.aliases)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(p.pipeline in out for p in presets.PRESETS.values())


def test_preset_errors(capsys):
    assert main(["compile", "minilm", "--preset", "q9"]) == 2
    out = _said(capsys)
    assert "unknown preset 'q9'" in out and all(n in out for n in ("q8", "w8a8", "q4", "q4-fast"))
    assert main(["compile", "minilm", "--preset", "q8", "-p", "dce"]) == 2
    assert "not both" in _said(capsys)
    with pytest.raises(UserError, match="preset 'q4' takes no options") as e:
        Pipeline.parse("dce,q4(group=64)")
    assert SPELLED_OUT["q4"] in e.value.hint
    with pytest.raises(UserError, match="unknown pass 'q9'") as e:
        Pipeline.parse("q9")
    assert "q8" in e.value.hint


def test_a_pass_cannot_take_a_presets_name():
    class Q4(Pass):
        """A pass that would shadow the preset."""
        name = "q4"

    with pytest.raises(ValueError, match="preset"):
        register(Q4)


def test_compile_with_a_preset_and_info(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "art"
    monkeypatch.delenv("TCC_NO_LATENCY", raising=False)  # info shows what the compile measured
    assert main(["compile", str(tiny_bert_dir), "--preset", "q8", "--seq-len", "8", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == Pipeline.parse("dce," + SPELLED_OUT["q8"]).canonical()
    report = json.loads((out / "report.json").read_text())

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pipeline"]["preset"] == "q8"
    assert [p["name"] for p in info["pipeline"]["passes"]] == ["dce", "quantize"]
    assert info["model"]["task"] == "feature-extraction" and info["target"]["name"] == "x86"
    sizes = manifest["sizes"]
    # the weight formats from the safetensors header add up to the stored bytes; int8 holds most of them
    weights = info["formats"]["weights"]
    assert sum(weights.values()) == sizes["weight_bytes"]
    assert max(weights, key=weights.get) == "int8"
    assert info["sizes"]["ratio"] == pytest.approx(sizes["weight_bytes"] / sizes["source_param_bytes"], rel=1e-5)
    assert info["measured"]["accuracy"] == report["final"]["accuracy"]
    assert info["measured"]["latency"] == report["run"]["latency"]

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    drift = max(v["max_rel_err"] for v in report["final"]["accuracy"]["vs_source"].values())
    for expected in ("(preset q8)", "feature-extraction", "x86", "int8", f"{drift:.2e}",
                     f"{sizes['weight_bytes'] / 1e6:.2f} MB", f"{info['sizes']['ratio']:.3f}x"):
        assert expected in text, expected


def test_time_limit_and_its_old_name(capsys):
    """The search's time limit is --time-limit ("budget" is the accuracy budget); --budget still works."""
    parser = build_parser()
    assert parser.parse_args(["compile", "m", "--time-limit", "20m"]).budget == "20m"
    assert "warning" not in capsys.readouterr().err
    assert parser.parse_args(["compile", "m", "--budget", "90s"]).budget == "90s"
    assert "--budget is now --time-limit" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_no_error():
    """`tcc passes | head -1`: exit 0 and nothing on stderr, not a BrokenPipeError."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "tcc.cli", "passes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before tcc writes (it takes seconds to start)
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_heal_max_seconds_and_its_old_name(capsys):
    """heal's time limit is max_seconds; `budget`, its old name, still works and says so."""
    new = Pipeline.parse("heal(steps=5,max_seconds=30)")
    assert "warning" not in _said(capsys)
    old = Pipeline.parse("heal(steps=5,budget=30)")
    assert "option 'budget' is now 'max_seconds'" in _said(capsys)
    assert old == new and old.canonical() == new.canonical() and "max_seconds=30.0" in new.canonical()
    with pytest.raises(UserError, match="both 'max_seconds' and 'budget'"):
        Pipeline.parse("heal(budget=30,max_seconds=30)")


def test_quantize_avg_bits_and_its_old_name(capsys):
    """quantize's mixed-precision target is avg_bits (bits per weight); `budget`, its old name, still works."""
    new = Pipeline.parse("quantize(weights=int4,avg_bits=4.9)")
    assert "warning" not in _said(capsys)
    old = Pipeline.parse("quantize(weights=int4,budget=4.9)")
    assert "option 'budget' is now 'avg_bits'" in _said(capsys)
    assert old == new and "avg_bits=4.9" in new.canonical()


def test_every_json_output_is_documented():
    from pathlib import Path
    docs = (Path(__file__).resolve().parent.parent / "docs" / "PIPELINES.md").read_text()
    table = docs[docs.index("### JSON output"):docs.index("## Exit codes")]
    with_json = [n for n, p in _subparsers().items() if any("--json" in a.option_strings for a in p._actions)]
    assert len(with_json) >= 8
    for name in with_json:
        assert f"| `tcc {name}` |" in table, name


def test_info_on_a_causal_lm_with_generation(tmp_path, capsys):
    """A tiny Llama with prefill/decode and the q4_0 preset: info names the entry points, the KV
    cache and the generation check the compile made, as manifest and report hold them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tcc
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama", safe_serialization=True)
    out = tmp_path / "art"
    tcc.compile(str(tmp_path / "llama"), "x86", out=out, pipeline="q4_0", seq_len=8, max_context=16,
                latency=False).close()
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["task"] == "causal-lm" and info["pipeline"]["preset"] == "q4_0"
    f = info["formats"]
    assert (f["functions"], f["kv_cache"], f["max_context"]) == (["decode", "prefill", "verify", "verify4"], "fp32", 16)
    assert f["cache_bytes"] == manifest["generation"]["cache_bytes"]
    assert sum(f["weights"].values()) == manifest["sizes"]["weight_bytes"]
    assert info["measured"]["generation"] == report["final"]["generation"]
    assert info["measured"]["latency"] is None and "--no-latency" in info["measured"]["latency_reason"]
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    agreement = report["final"]["generation"]["agreement"]
    assert f"top-1 agreement with the source model {agreement['rate']:.3f}" in text
    assert "functions decode, prefill, verify, verify4; KV cache fp32, 16 positions" in text and "(preset q4_0)" in text


def _completions(line: str, tmp_path) -> list[str]:
    """What the shell gets when the user presses tab after `line` (argcomplete's protocol: the request
    in _ARGCOMPLETE / COMP_LINE / COMP_POINT, the answer in a file), from a fresh `tcc` process."""
    import os
    import subprocess
    import sys
    out = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_STDOUT_FILENAME=str(out))
    subprocess.run([sys.executable, "-m", "tcc.cli"], env=env, check=True, timeout=120, capture_output=True)
    return [w.strip() for w in out.read_text().split("\v")]


def test_shell_completion_of_commands_flags_and_choices(tmp_path, capsys):
    from tcc.pipeline import presets
    assert main(["completion", "bash"]) == 0
    assert "complete" in capsys.readouterr().out  # the bash code to eval
    assert _completions("tcc comp", tmp_path) == ["compile", "completion"]
    assert _completions("tcc compile minilm --tar", tmp_path) == ["--target"]
    assert _completions("tcc compile minilm --preset ", tmp_path) == presets.names()
    assert set(_completions("tcc compile minilm --target ", tmp_path)) >= {"x86", "native", "arm64", "cuda"}


def test_w4a8_preset_on_a_causal_lm(tmp_path):
    """`--preset w4a8` on a tiny Llama: int4 codes and int8 activations run the W4A8 kernels in prefill and
    decode; the artifact's logits match the quantized Program in PyTorch within the int8 activation
    rounding's reach (a code that rounds the other way), and a verify row equals the decode step."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import tcc
    from tcc.pipeline import presets
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama", safe_serialization=True)
    out = tmp_path / "art"
    rng = np.random.default_rng(0)  # no tokenizer: GPTQ's calibration as token ids
    calibration = [{"input_ids": rng.integers(0, 128, (1, 8)).astype(np.int64)} for _ in range(8)]
    tcc.compile(str(tmp_path / "llama"), "x86", out=out, pipeline="w4a8", seq_len=8, max_context=32,
                calibration=calibration, latency=False).close()
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert presets.matching(manifest["pipeline"]) == "w4a8", manifest["pipeline"]
    fidelity = report["final"]["accuracy"]["vs_program"]["logits"]
    assert fidelity["max_rel_err"] < 1e-2, fidelity  # 2.5e-7 on Zen 5: every activation code the same
    assert report["final"]["generation"]["verify_vs_decode"] == 0.0
    assert report["final"]["size"]["ratio"] < 0.3, report["final"]["size"]
    kernels = (out / "model.so").read_bytes()
    assert b"tcc_dense_w4a8" in kernels
