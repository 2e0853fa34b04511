"""Accuracy of a compiled (or any) model on real text: perplexity for causal LMs, cosine similarity of
sentence embeddings for encoders.

`run` is anything called as `run(feeds) -> {output name: array}` with batch-1 inputs of the
artifact's fixed sequence length: a `tcc.load(dir)` artifact, a Program, an ORT session. When `run`
has `.inputs` (TensorSpecs), only the inputs it takes are fed.

perplexity(run, tokenizer_dir, text_path, seq_len, max_tokens, stride=None)
    The first `max_tokens` tokens of the text (only as much of the file as that needs is read and
    tokenized; the tokenizer's default special tokens, as in the Hugging Face recipe), scored with
    the standard sliding window: windows of exactly `seq_len` tokens start every `stride` tokens
    (default seq_len // 2, a last window is aligned to the end), and each window scores only the
    tokens no earlier window scored, each predicted from all the window's tokens before it. With
    stride < seq_len every token but the first is scored exactly once; with stride == seq_len (no
    overlap) a window's first token has no context and is not scored, as in the HF recipe. log-softmax in float64. Feeds {"input_ids": [1, seq_len]},
    reads output "logits" [1, seq_len, vocab].
    -> {"metric": "perplexity", "value", "nll" (mean, nats), "tokens" (scored), "windows",
        "seq_len", "stride"}

perplexity_cached(new_session, ids, seq_len, chunk, stride=None)
    The same windows and scored tokens over token ids, each window through a fresh generation
    session (prefill its unscored context in chunks, then one decode step per scored token):
    perplexity through the artifact's KV cache (`tcc eval --kv-cache`).

cosine(run, reference, tokenizer_dir, text_path, seq_len, max_samples)
    The first `max_samples` non-empty lines of the text that are not wikitext headings (" = T = "),
    each tokenized, cut or padded to `seq_len` with its attention_mask; both callables embed it
    (output "last_hidden_state", else the first output), embeddings are mean-pooled over the mask,
    and the cosine of the two pooled vectors is averaged in float64.
    -> {"metric": "cosine", "value" (mean), "min", "samples", "seq_len"}

evaluate_artifact(artifact_dir, text_path, max_tokens=4096, stride=None, max_samples=64, compare_source=True,
                  tokenizer=None)
    What `tcc eval` runs: loads the artifact (tcc.runtime.load) and its tokenizer (`tokenizer`, tcc eval
    --tokenizer DIR, else the manifest's "tokenizer"); a causal-lm artifact gets `perplexity` at its compiled sequence length and, with
    `compare_source`, the perplexity of the source model re-traced at the same shapes on the same
    windows ("source_value", "ratio" = value / source_value); with `kv_cache`, the artifact's perplexity comes
    from `perplexity_cached` instead (every scored token through its prefill/decode and KV cache,
    windows of `window` tokens, default its context); a feature-extraction artifact gets
    `cosine` against that re-traced source model. Adds "artifact", "model" and "seconds".

A text with fewer tokens than one window (or no usable line) raises a UserError saying how many
tokens (lines) it has.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError
from .progress import track

Run = Callable[[dict], dict]
_HEADING = re.compile(r"^\s*=.*=\s*$")


# -- shared helpers ---------------------------------------------------------------------------------

def load_tokenizer(tokenizer_dir):
    """AutoTokenizer from a Hugging Face folder, a .gguf file or a folder holding only a .gguf."""
    from transformers import AutoTokenizer
    if tokenizer_dir is None:
        raise UserError("no tokenizer for this model", "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    path = Path(tokenizer_dir)
    if not path.exists():
        raise UserError(f"tokenizer folder {path} not found", "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    kwargs = {}
    if path.is_file() and path.suffix == ".gguf":
        path, kwargs = path.parent, {"gguf_file": path.name}
    elif not any(path.glob("tokenizer*")) and sorted(path.glob("*.gguf")):
        kwargs = {"gguf_file": sorted(path.glob("*.gguf"))[0].name}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    if not tok("a b", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one from a config
        raise UserError(f"{path} has no tokenizer files (its tokenizer has no vocabulary)",
                        "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    return tok


def attach_tokenizer(program, tokenizer_dir) -> None:
    """Give `program` the tokenizer in `tokenizer_dir` (--tokenizer DIR) after checking that it loads
    and that its ids fit the program's vocabulary."""
    spec = next((s for s in program.inputs if s.name == "input_ids"), None)
    if spec is None:
        raise UserError(f"--tokenizer: the program takes {[s.name for s in program.inputs]}, not token ids")
    tok = load_tokenizer(tokenizer_dir)
    vocab = spec.range[1] if spec.range else program.info and program.info.vocab_size
    if vocab and len(tok) > vocab:
        raise UserError(f"the tokenizer in {tokenizer_dir} has {len(tok)} tokens, more than the model's vocabulary "
                        f"of {vocab}", "pass the tokenizer the model was trained with")
    program.tokenizer_dir = str(tokenizer_dir)


def _read_text(text_path) -> Path:
    path = Path(text_path)
    if not path.is_file():
        raise UserError(f"text file {path} not found", "give a UTF-8 text file, e.g. wikitext-2 valid.txt")
    return path


def _feeds_for(run: Run, feeds: dict) -> dict:
    specs = getattr(run, "inputs", None)
    if not specs:
        return feeds
    names = {s.name for s in specs}
    return {k: v for k, v in feeds.items() if k in names}


def _output(out: dict, name: str) -> np.ndarray:
    return np.asarray(out[name] if name in out else next(iter(out.values())))


# -- perplexity -------------------------------------------------------------------------------------

def tokenize_prefix(tokenizer, text_path, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` token ids of the file, reading no more of it than needed.

    Reads a growing prefix of the file until it tokenizes to more than `max_tokens` + 16 tokens
    (the margin keeps a word cut at the end of the prefix from changing the kept tokens)."""
    path = _read_text(text_path)
    size = path.stat().st_size
    chars = max(4096, 8 * max_tokens)
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(chars)
        while True:
            ids = tokenizer(text, verbose=False)["input_ids"]
            if len(ids) > max_tokens + 16 or f.tell() >= size:
                break
            more = f.read(len(text))
            if not more:
                break
            text += more
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """[(begin, first scored position)] of the fixed-length windows over `n_tokens` tokens."""
    out, scored_to = [], 1  # token 0 has no context: never scored
    begin = 0
    while True:
        begin = min(begin, n_tokens - seq_len)
        out.append((begin, max(scored_to, begin + 1)))  # a window's first token has no context in it
        scored_to = begin + seq_len
        if scored_to >= n_tokens:
            return out
        begin += stride


def perplexity(run: Run, tokenizer_dir, text_path, seq_len: int, max_tokens: int, stride: int | None = None) -> dict:
    stride = stride or seq_len // 2
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise UserError(f"perplexity needs seq_len >= 2 and 1 <= stride <= seq_len (got seq_len={seq_len}, stride={stride})")
    if max_tokens < seq_len:
        raise UserError(f"max_tokens={max_tokens} is less than one window of {seq_len} tokens",
                        f"raise --max-tokens to at least {seq_len}")
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenize_prefix(tokenizer, text_path, max_tokens)
    if len(ids) < seq_len:
        raise UserError(f"{text_path} has only {len(ids)} tokens, fewer than one window of {seq_len}",
                        "give a longer text or compile with a smaller --seq-len")
    nll, count = 0.0, 0
    spans = windows(len(ids), seq_len, stride)
    for begin, first in track(spans, f"perplexity ({len(spans)} windows of {seq_len})"):
        window = ids[begin:begin + seq_len]
        logits = _output(run(_feeds_for(run, {"input_ids": window[None, :]})), "logits")
        if logits.shape[-2] != seq_len:
            raise UserError(f"the model returned logits for {logits.shape[-2]} positions, expected {seq_len}",
                            "evaluate with the sequence length the artifact was compiled for")
        pos = np.arange(first, begin + seq_len)  # absolute positions scored in this window
        nll += _nll(logits.reshape(-1, logits.shape[-1])[pos - begin - 1], ids[pos])
        count += len(pos)
    mean = nll / count
    return {"metric": "perplexity", "value": float(np.exp(mean)), "nll": mean, "tokens": count,
            "windows": len(spans), "seq_len": seq_len, "stride": stride}


def _nll(rows: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of `targets` under the logits `rows` [n, V] (log-softmax in float64)."""
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    logp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return -float(logp[np.arange(len(targets)), targets].sum())


def perplexity_cached(new_session: Callable, ids: np.ndarray, seq_len: int, chunk: int,
                      stride: int | None = None) -> dict:
    """`perplexity`'s windows and scored tokens, each window run through a fresh generation session
    (`new_session()`: prefill(ids [chunk], pos, last) / decode(token, pos), e.g. Loaded.session): the
    window's unscored context is prefilled in chunks and every scored token is predicted by one decode
    step over the KV cache (teacher-forced), so the cache's format (kv_cache int8) is what is measured.
    Positions restart at 0 in every window, as `main` sees them."""
    from .generation import teacher_forced
    stride = stride or seq_len // 2
    if seq_len < 2 or not 1 <= stride <= seq_len or len(ids) < seq_len:
        raise UserError(f"cached perplexity needs 2 <= seq_len <= {len(ids)} tokens and 1 <= stride <= seq_len "
                        f"(got seq_len={seq_len}, stride={stride})")
    nll, count = 0.0, 0
    spans = windows(len(ids), seq_len, stride)
    for begin, first in track(spans, f"perplexity through the KV cache ({len(spans)} windows of {seq_len})"):
        got = teacher_forced(new_session(), [int(t) for t in ids[begin:begin + seq_len - 1]], chunk, first - begin)
        pos = np.arange(first, begin + seq_len)
        nll += _nll(np.stack([got[p - begin - 1] for p in pos]), ids[pos])
        count += len(pos)
    mean = nll / count
    return {"metric": "perplexity", "value": float(np.exp(mean)), "nll": mean, "tokens": count,
            "windows": len(spans), "seq_len": seq_len, "stride": stride, "through": "prefill/decode (KV cache)"}


# -- cosine similarity of embeddings ------------------------------------------------------------------

def sentences(text_path, max_samples: int) -> list[str]:
    """The first `max_samples` non-empty, non-heading lines of the text file."""
    out = []
    with open(_read_text(text_path), encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not _HEADING.match(line):
                out.append(line)
                if len(out) >= max_samples:
                    break
    return out


def _pooled(run: Run, feeds: dict) -> np.ndarray:
    hidden = _output(run(_feeds_for(run, feeds)), "last_hidden_state").astype(np.float64)
    mask = feeds["attention_mask"].astype(np.float64)[..., None]
    return ((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9))[0]


def cosine(run: Run, reference: Run, tokenizer_dir, text_path, seq_len: int, max_samples: int) -> dict:
    lines = sentences(text_path, max_samples)
    if not lines:
        raise UserError(f"{text_path} has no non-empty, non-heading line to embed", "give a text file with sentences")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    sims = []
    for line in track(lines, f"cosine ({len(lines)} sentences of {seq_len} tokens)"):
        enc = tokenizer(line, max_length=seq_len, truncation=True, padding="max_length", return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        a, b = _pooled(run, feeds), _pooled(reference, feeds)
        sims.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return {"metric": "cosine", "value": float(np.mean(sims)), "min": float(np.min(sims)), "samples": len(sims),
            "seq_len": seq_len}


# -- what `tcc eval` runs ---------------------------------------------------------------------------

def evaluate_artifact(artifact_dir, text_path, *, max_tokens: int = 4096, stride: int | None = None,
                      max_samples: int = 64, compare_source: bool = True, tokenizer=None,
                      kv_cache: bool = False, window: int | None = None) -> dict:
    from .runtime import load
    t0 = time.perf_counter()
    _read_text(text_path)
    with load(artifact_dir) as art:
        source = art.manifest.get("source") or {}
        tokenizer_dir = tokenizer or art.manifest.get("tokenizer")
        batch, seq_len = art.inputs[0].shape[:2]
        if batch != 1:
            raise UserError(f"tcc eval runs batch-1 artifacts; this one takes batch {batch}", "compile with --batch 1")
        if window is not None and not kv_cache:
            raise UserError("--window sets the windows of --kv-cache scoring", "add --kv-cache, or leave --window out")
        if art.task == "causal-lm":
            if kv_cache:  # every scored token through prefill/decode: what the artifact's KV cache gives
                art.session()  # a UserError for an artifact without generation, before the text is read
                context = art.manifest["generation"]["max_context"]
                seq_len = window or context
                if seq_len > context:
                    raise UserError(f"--window {seq_len} is longer than the artifact's KV cache of {context} positions",
                                    f"give --window {context} or less")
                ids = tokenize_prefix(load_tokenizer(tokenizer_dir), text_path, max_tokens)
                result = perplexity_cached(art.session, ids, seq_len, art.manifest["generation"]["prefill_len"], stride)
            else:
                result = perplexity(art, tokenizer_dir, text_path, seq_len, max_tokens, stride)
            if compare_source:
                ref = perplexity(_source_program(source, art.task, seq_len), tokenizer_dir, text_path, seq_len,
                                 max_tokens, stride)
                result.update(source_value=ref["value"], ratio=result["value"] / ref["value"])
        elif art.task == "feature-extraction":
            result = cosine(art, _source_program(source, art.task, seq_len), tokenizer_dir, text_path, seq_len,
                            max_samples)
        else:
            raise UserError(f"tcc eval measures causal-lm and feature-extraction artifacts, this one is {art.task!r}",
                            "run the artifact on your own data with `tcc run`")
    result.update(artifact=str(artifact_dir), model=source.get("path") or source.get("class"),
                  seconds=round(time.perf_counter() - t0, 1))
    return result


def _source_program(source: dict, task: str, seq_len: int):
    """The artifact's source model, traced again at its shapes (the uncompressed reference)."""
    if source.get("kind") != "huggingface" or not source.get("path"):
        raise UserError(f"the artifact's source is {source.get('kind', 'unknown')!r}, not a model path tcc can load again",
                        "compile from a model folder, .gguf or alias to compare against the source")
    from .frontend import trace
    return trace(source["path"], task=task, seq_len=seq_len)
