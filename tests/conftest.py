"""Shared fixtures: real models compiled once per session and target, and a tiny HF folder.

Each real-model fixture traces the model (tcc.trace), compiles that Program (tcc.compile) into a
session temp directory, and keeps only what the tests need: the artifact directory, fresh inputs
(seeds the compiler's own check does not use; encoder inputs carry padding zeros in the attention
mask) and the Program's PyTorch outputs on them. The Program itself is dropped, so SmolLM2 (~540 MB
of fp32 weights) is not held for the whole session. Compiles run with the lowest useful sequence
lengths (16 on x86, 8 on arm64, where the artifact runs under qemu).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # .ci/run's worker processes share the cores: one compute thread each (torch's, OpenBLAS's, and TVM's pool
    # where a test does not ask for more), inherited by the `tcc` subprocesses, instead of two pools per core
    # spinning against each other (measured on the 2-core EPYC, warm cache: 44 min in one process, 38 with two
    # workers of two threads, 18.5 with two workers of one thread; docs/BENCHMARKS.md "Test suite")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the report's baseline timing and held-out accuracy cost a build and seconds per compile: the suite turns
# them off (TCC_NO_LATENCY / TCC_NO_EVAL) and the tests of the report turn them on (latency=True, evaluate=True)
os.environ.setdefault("TCC_NO_LATENCY", "1")
os.environ.setdefault("TCC_NO_EVAL", "1")
# wikitext-2 beside the project. The suite's accuracy thresholds were measured calibrating on the
# second half of its valid.txt, so that is the tests' default calibration text; test_defaults.py
# checks tcc's own default (the text shipped in the package) with the variable unset.
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
if (WIKITEXT / "valid.txt").is_file():
    os.environ.setdefault("TCC_CALIBRATION_TEXT", str(WIKITEXT / "valid.txt"))

ARM64_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
FRESH_SEED = 7  # tcc.compile checks itself on seeds 0 and 1
# Causal LMs read real text: on random ids SmolLM2's top two logits come within 7e-4 of each other,
# too close for an argmax comparison; on this text the closest pair is 0.068 apart.
TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889."


@dataclasses.dataclass
class Compiled:
    dir: Path                                  # the artifact directory
    feeds: list[dict[str, np.ndarray]]         # fresh inputs
    want: list[dict[str, np.ndarray]]          # the Program's outputs on them, in PyTorch
    source_param_bytes: int = 0


def fresh_feeds(program, pad: int) -> list[dict[str, np.ndarray]]:
    """Inputs unlike the compiler's own: for an encoder one feed whose last `pad` tokens are padding
    (mask 0, id 0) and one without; for a decoder one feed, TEXT's tokens when it has a tokenizer."""
    feed = program.example_inputs(seed=FRESH_SEED)
    if "attention_mask" not in feed:
        if program.tokenizer_dir:
            from transformers import AutoTokenizer
            (batch, seq), = [s.shape for s in program.inputs]
            ids = AutoTokenizer.from_pretrained(program.tokenizer_dir)(TEXT)["input_ids"][:seq]
            assert len(ids) == seq, f"TEXT is {len(ids)} tokens, shorter than seq_len {seq}"
            feed = {"input_ids": np.array([ids] * batch, dtype=np.int64)}
        return [feed]
    padded = {k: v.copy() for k, v in feed.items()}
    padded["attention_mask"][:, -pad:] = 0
    padded["input_ids"][:, -pad:] = 0
    return [padded, feed]


def missing_arm64_tools() -> list[str]:
    return [t for t in ARM64_TOOLS if shutil.which(t) is None]


def _compile(factory, name: str, model: str, target: str, seq_len: int, pipeline: str = "",
             verify: bool = True, pad: int = 5) -> Compiled:
    import tcc
    program = tcc.trace(model, seq_len=seq_len)
    feeds = fresh_feeds(program, pad)
    want = [program(f) for f in feeds]
    out = factory.mktemp("artifacts") / name
    tcc.compile(program, target, out=out, pipeline=pipeline, verify=verify).close()
    return Compiled(out, feeds, want, program.param_bytes())


def _need_arm64() -> None:
    missing = missing_arm64_tools()
    if missing:
        pytest.skip(f"arm64 needs {', '.join(missing)} (apt-get install g++-aarch64-linux-gnu qemu-user)")


@pytest.fixture(scope="session")
def minilm_x86(tmp_path_factory) -> Compiled:
    return _compile(tmp_path_factory, "minilm-x86", "minilm", "x86", seq_len=16)


@pytest.fixture(scope="session")
def minilm_q8_x86(tmp_path_factory) -> Compiled:
    return _compile(tmp_path_factory, "minilm-q8-x86", "minilm", "x86", seq_len=16, pipeline="quantize-weights(bits=8)")


@pytest.fixture(scope="session")
def smollm2_x86(tmp_path_factory) -> Compiled:
    return _compile(tmp_path_factory, "smollm2-x86", "smollm2", "x86", seq_len=16)


@pytest.fixture(scope="session")
def minilm_arm64(tmp_path_factory) -> Compiled:
    _need_arm64()
    return _compile(tmp_path_factory, "minilm-arm64", "minilm", "arm64", seq_len=8, verify=False, pad=3)


@pytest.fixture(scope="session")
def smollm2_arm64(tmp_path_factory) -> Compiled:
    # verify=False: the test runs the artifact once under qemu (~20 s for SmolLM2), not twice
    _need_arm64()
    return _compile(tmp_path_factory, "smollm2-arm64", "smollm2", "arm64", seq_len=8, verify=False)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from tcc.frontends import models
    return models.resolve("minilm")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A random-init BERT (hidden 64, 2 layers) saved as a Hugging Face folder with safetensors:
    a real model path for CLI compiles that take seconds."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=64)
    out = tmp_path_factory.mktemp("models") / "tiny-bert"
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_bert_with_its_tokenizer(tmp_path_factory, minilm_dir) -> Path:
    """A random-init BERT (hidden 32, 1 layer) with MiniLM's WordPiece tokenizer and vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=32)
    out = tmp_path_factory.mktemp("models") / "tiny-bert-wordpiece"
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
