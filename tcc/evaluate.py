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
from .frontends.models import load_tokenizer  # noqa: F401  (moved to tcc.frontends.models; read from here too)
from .progress import track

Run = Callable[[dict], dict]
_HEADING = re.compile(r"^\s*=.*=\s*$")


# -- shared helpers ---------------------------------------------------------------------------------

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


def embeddings(run: Run, tokenizer_dir, text_path, seq_len: int, max_samples: int) -> np.ndarray:
    """The mean-pooled embeddings [samples, hidden] (float64) `cosine` compares: the first
    `max_samples` sentences of the text, each cut or padded to `seq_len` tokens."""
    lines = sentences(text_path, max_samples)
    if not lines:
        raise UserError(f"{text_path} has no non-empty, non-heading line to embed", "give a text file with sentences")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = []
    for line in track(lines, f"embeddings ({len(lines)} sentences of {seq_len} tokens)"):
        enc = tokenizer(line, max_length=seq_len, truncation=True, padding="max_length", return_tensors="np")
        out.append(_pooled(run, {"input_ids": enc["input_ids"].astype(np.int64),
                                 "attention_mask": enc["attention_mask"].astype(np.int64)}))
    return np.stack(out)


def cosine(run: Run, reference: Run | np.ndarray, tokenizer_dir, text_path, seq_len: int, max_samples: int) -> dict:
    """`reference` may be its `embeddings` already (computed while the reference model was at hand)."""
    a = embeddings(run, tokenizer_dir, text_path, seq_len, max_samples)
    b = reference if isinstance(reference, np.ndarray) else embeddings(reference, tokenizer_dir, text_path, seq_len,
                                                                       max_samples)
    sims = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
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
    from .frontends.frontend import trace
    return trace(source["path"], task=task, seq_len=seq_len)


# -- task accuracy in the compile report --------------------------------------------------------------

HELD_OUT_TOKENS = 1024  # the report's perplexity scores at most this many tokens of the held-out text,
HELD_OUT_WINDOWS = 8    # in at most this many windows (one call per window on each side),
HELD_OUT_FLOP = 6e11    # and no more windows than about this many multiply-adds x 2 (at least 2 windows: a
                        # 1B model at 128 tokens, 3.2e11 a window; issue 15: a few forward passes, not minutes)
HELD_OUT_SAMPLES = 16   # encoders: sentences embedded
HELD_OUT_FEEDS = 4      # other models: inputs compared (fewer when the outputs are large)
_KEPT_BYTES = 256e6     # the source's outputs kept for that comparison, at most


class HeldOut:
    """The compile report's task accuracy: the compressed model against its source on the held-out
    text shipped with tcc (calibration.HELD_OUT_TEXT, which no calibrated pass reads: they read
    calibration.txt or the user's text). Two halves, so that the source's side runs before the passes
    and no copy of the source weights is kept: `HeldOut(source_program)` scores the source and keeps
    only small results; `.compare(run)` scores the artifact (or the compressed Program, `run`) and
    returns the report's `final.task_accuracy` section ({metric, definition, text, source, compressed,
    change, ...}). Bounded for big models: HELD_OUT_* above.

      causal LMs with a tokenizer   perplexity over non-overlapping windows of the compiled length
                                    (HELD_OUT_WINDOWS, fewer for big models: HELD_OUT_FLOP)
      encoders with a tokenizer     cosine of mean-pooled embeddings, per sentence
      anything else                 top-1 agreement (argmax over the last axis of the first output)
                                    and output cosine, on text windows when the model reads token
                                    ids and has a tokenizer, else on random inputs (said so)
    A measurement that cannot be made (text shorter than one window) leaves {metric: null, note}."""

    def __init__(self, program):
        from .compress.calibration import HELD_OUT_TEXT
        self.text = HELD_OUT_TEXT
        ids = next((s for s in program.inputs if s.name == "input_ids"), None)
        self.batch = int(program.inputs[0].shape[0])
        self.seq_len = int(ids.shape[1]) if ids is not None and len(ids.shape) == 2 else None
        self.tokenizer_dir = program.tokenizer_dir if ids is not None else None
        self.note = None
        source = _batch1(program, self.batch)
        try:
            if program.task == "causal-lm" and self.tokenizer_dir:
                self.metric = "perplexity"
                params = sum(t.numel() for t in program.named_tensors().values())
                n = int(max(2, min(HELD_OUT_WINDOWS, HELD_OUT_FLOP // max(2 * params * self.seq_len, 1))))
                self.max_tokens = max(self.seq_len, min(HELD_OUT_TOKENS, n * self.seq_len))
                self.source = self._perplexity(source)
            elif program.task == "feature-extraction" and self.tokenizer_dir:
                self.metric = "cosine"
                self.source = embeddings(source, self.tokenizer_dir, self.text, self.seq_len, HELD_OUT_SAMPLES)
            else:
                self.metric = "agreement"
                self.feeds = self._feeds(program)
                self.source = [self._first(source(f)) for f in self.feeds]
        except UserError as e:
            self.metric, self.source, self.note = None, None, f"not measured: {e.message}"

    def _perplexity(self, run) -> dict:
        return perplexity(run, self.tokenizer_dir, self.text, self.seq_len, self.max_tokens, stride=self.seq_len)

    def _feeds(self, program) -> list[dict]:
        """Text windows of the held-out text when the model reads token ids and has a tokenizer, else
        random inputs (seeds the verification and calibration do not use)."""
        example = program(program.example_inputs(seed=1))
        out_bytes = max(np.asarray(next(iter(example.values()))).nbytes, 1)
        n = int(min(HELD_OUT_FEEDS, max(1, _KEPT_BYTES // out_bytes)))
        if self.tokenizer_dir:
            from .compress.calibration import text_feeds
            self.inputs = "text"
            return [{k: v[:1] for k, v in f.items()} for f in
                    text_feeds(program, self.text, n_samples=n, start=0.0)]
        self.inputs = "random"
        return [{k: v[:1] for k, v in program.example_inputs(seed=100 + i).items()} for i in range(n)]

    @staticmethod
    def _first(out: dict) -> np.ndarray:
        return np.asarray(next(iter(out.values())), np.float32)

    def compare(self, run, measured_with: str) -> dict:
        """The report's section: `run` (the artifact, or the compressed Program in PyTorch: `measured_with`)
        scored as the source was."""
        text = f"tcc/data/{self.text.name} (shipped with tcc; not the calibration text)"
        if self.metric is None:
            return {"metric": None, "note": self.note, "text": text}
        run = _batch1(run, self.batch)
        out = {"metric": self.metric, "measured_with": measured_with, "text": text}
        if self.metric == "perplexity":
            got = self._perplexity(run)
            out.update(source=self.source["value"], compressed=got["value"], change=got["value"] / self.source["value"] - 1,
                       tokens=got["tokens"], windows=got["windows"], seq_len=self.seq_len,
                       definition=f"perplexity: exp of the mean negative log-likelihood of the next token, over "
                                  f"{got['tokens']} tokens of the held-out text in {got['windows']} non-overlapping "
                                  f"windows of {self.seq_len} tokens (a window's first token is not scored); lower "
                                  "is better; change = compressed / source - 1")
        elif self.metric == "cosine":
            got = cosine(run, self.source, self.tokenizer_dir, self.text, self.seq_len, HELD_OUT_SAMPLES)
            out.update(source=1.0, compressed=got["value"], change=got["value"] - 1, min=got["min"],
                       samples=got["samples"], seq_len=self.seq_len,
                       definition=f"embedding cosine: the cosine similarity of the compressed and the source model's "
                                  f"sentence embeddings (last_hidden_state mean-pooled over the attention mask), mean "
                                  f"over {got['samples']} sentences of the held-out text of up to {self.seq_len} "
                                  "tokens; 1 = the same direction; change = cosine - 1")
        else:
            got = [self._first(run(f)) for f in self.feeds]
            top1 = float(np.mean(np.concatenate([(g.argmax(-1) == s.argmax(-1)).ravel()
                                                 for g, s in zip(got, self.source)])))
            cos = float(np.mean([_cos(g, s) for g, s in zip(got, self.source)]))
            inputs = ("windows of the held-out text" if self.inputs == "text" else
                      "random inputs (the model has no tokenizer or takes no token ids)")
            out.update(source=1.0, compressed=top1, change=top1 - 1, output_cosine=cos, feeds=len(got), inputs=self.inputs,
                       definition=f"top-1 agreement: the fraction of rows of the first output (argmax over its last "
                                  f"axis) where the compressed model picks what the source picks, over {len(got)} "
                                  f"{inputs}; output cosine: cosine similarity of the flattened outputs, mean over "
                                  "the inputs; change = agreement - 1")
        return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _batch1(run: Run, batch: int) -> Run:
    """`run` for batch-1 feeds when it takes `batch` rows: the feed repeated, the first row returned."""
    if batch == 1:
        return run

    def call(feeds: dict) -> dict:
        out = run({k: np.repeat(v, batch, axis=0) for k, v in feeds.items()})
        return {k: np.asarray(v)[:1] for k, v in out.items()}
    call.inputs = getattr(run, "inputs", None)
    return call
