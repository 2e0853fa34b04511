"""Calibration data and the calibration loss.

text_feeds(program, text_path=None, n_samples=8, seq_len=None, seed=0, start=None)
    `n_samples` feeds {input name: array} shaped for the program's inputs: input_ids hold token
    windows of the program's sequence length cut from the text with the tokenizer in
    `program.tokenizer_dir` (each window wrapped in the tokenizer's special tokens, e.g. BERT's
    [CLS] ... [SEP]); attention_mask is all ones, any other integer input zeros. Windows do not
    overlap and are drawn at random (`seed`) from the first 4 * n_samples * batch windows of the
    slice of the text that starts `start` of the way into the file (at a line break). `start`
    defaults to 0.5 for the default text (text_path None: $TCC_CALIBRATION_TEXT or DEFAULT_TEXT) and
    for DEFAULT_TEXT, so calibration never sees the prefix the search scores, and to 0 for any other
    text. seq_len, when given, must be the program's. A text too short for n_samples * batch distinct
    windows gives windows spread evenly over it, overlapping, with a warning; one shorter than a
    window raises a UserError with the token count; a program without a tokenizer, one saying so.
id_feeds(program, path, n_samples=8, seed=0) / calibration_data(program, path, ...)
    The same feeds from token ids saved with numpy (.npy / .npz; for models without a tokenizer):
    windows of the sequence length cut from each array's rows, no special tokens added.
    calibration_data picks id_feeds for .npy / .npz paths and text_feeds otherwise.
DEFAULT_TEXT, HELD_OUT_TEXT, default_text()
    The calibration text shipped in the package (tcc/data/calibration.txt, ~6k tokens of public-domain
    and original English prose; sources in tcc/data/README.md) and a second, disjoint one the search
    holds out (tcc/data/held_out.txt). default_text() is what text_path=None means:
    $TCC_CALIBRATION_TEXT when set, else DEFAULT_TEXT. A missing file raises a UserError saying how
    to point at text.

CalibrationLoss(reference, feeds) / calibration_loss(program, feeds, reference=None)
    Causal LMs (task "causal-lm" or an output named "logits"): mean next-token cross-entropy (nats)
    over every position of every feed. Encoders: mean over samples of 1 - cosine(mean-pooled
    last_hidden_state (else the first output), the same from `reference`, the unmodified program),
    pooled over the attention mask. Lower is better; an unmodified encoder scores 0.

(The graph runner that taps and patches node values is tcc.ir.runner.GraphRunner.)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..ir.structure import is_causal_lm
from ..progress import console, status

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
HELD_OUT_TEXT = DEFAULT_TEXT.with_name("held_out.txt")


def default_text() -> Path:
    return Path(os.environ.get("TCC_CALIBRATION_TEXT") or DEFAULT_TEXT)


PASS_WINDOWS = 16  # a calibrating pass's windows of text when it has no feeds and samples=0


def samples_option():
    """The `samples` option of the calibrating passes (quantize, smooth, sparsify): what pass_feeds reads."""
    from ..pipeline import Option
    return Option(int, 0, "calibration windows: the first N of the compile's calibration feeds, else N windows of "
                  f"the calibration text (0: every feed, else {PASS_WINDOWS} windows)",
                  validator=lambda v: None if v >= 0 else "must be >= 0")


def pass_feeds(program, ctx, samples: int) -> list[dict[str, np.ndarray]]:
    """A calibrating pass's feeds for its `samples` option: the compile's calibration feeds (all of them when
    samples = 0, the default, else the first `samples`), or without feeds `samples` (0: PASS_WINDOWS) windows
    of the calibration text. So `--calibration-samples 256` reaches GPTQ without samples=256 in the pipeline."""
    if ctx.calibration:
        return ctx.calibration[:samples] if samples else list(ctx.calibration)
    return text_feeds(program, n_samples=samples or PASS_WINDOWS)


# -- feeds from text ---------------------------------------------------------------------------------

def _ids_spec(program, n_samples: int, what: str, hint: str):
    """The program's input_ids spec ([batch, seq]), checked with n_samples; UserError `what` ... otherwise."""
    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1 (got {n_samples})")
    spec = next((s for s in program.inputs if s.name == "input_ids"), None)
    if spec is None or len(spec.shape) != 2:
        raise UserError(f"{what} a program with input_ids [batch, seq]; this one takes "
                        f"{[s.name for s in program.inputs]}", hint)
    return spec


def text_feeds(program, text_path=None, n_samples: int = 8, seq_len: int | None = None, seed: int = 0,
               start: float | None = None) -> list[dict[str, np.ndarray]]:
    from ..frontends.models import load_tokenizer
    path = Path(text_path) if text_path is not None else default_text()
    if not path.is_file():
        raise UserError(f"calibration text {path} not found",
                        "set TCC_CALIBRATION_TEXT to a UTF-8 text file, or give a calibration text file explicitly")
    batch, program_len = _ids_spec(program, n_samples, "calibration from text needs",
                                   "give calibration feeds instead of text").shape
    if seq_len is not None and seq_len != program_len:
        raise UserError(f"seq_len={seq_len} but the program takes sequences of {program_len} tokens",
                        f"leave seq_len unset or trace the model with --seq-len {seq_len}")
    if start is None:
        start = 0.5 if text_path is None or path.resolve() == DEFAULT_TEXT else 0.0
    if not program.tokenizer_dir:
        raise UserError("the model has no tokenizer to make calibration feeds from text",
                        "pass --tokenizer DIR (a folder with the model's tokenizer files), or calibration token "
                        "ids: --calibration ids.npy (or .npz)")
    tokenizer = load_tokenizer(program.tokenizer_dir)
    prefix, suffix = _special_tokens(tokenizer)
    body = program_len - len(prefix) - len(suffix)
    if body < 1:
        raise UserError(f"sequences of {program_len} tokens leave no room for text besides "
                        f"{len(prefix) + len(suffix)} special tokens")
    need = 4 * n_samples * batch  # a pool of windows to draw from
    with status(f"tokenizing calibration text {path.name}"):
        tokens = _tokens_from(tokenizer, path, start, need * body)
    available = len(tokens) // body
    count = n_samples * batch
    if available < count:
        if len(tokens) < body:
            raise UserError(f"calibration text {path} (from {start:.0%} of the file on) has {len(tokens)} tokens, fewer "
                            f"than {n_samples} x {batch} windows of {body}", "give a longer text or fewer samples")
        # too short for distinct windows, long enough for one: windows spread evenly over the text, overlapping
        stride = (len(tokens) - body) // max(count - 1, 1)
        console.print(f"tcc: warning: calibration text {path.name} (from {start:.0%} of the file on) has {len(tokens)} "
                      f"tokens, fewer than {count} windows of {body}: the windows overlap (one every {stride} tokens); "
                      "set TCC_CALIBRATION_TEXT to a longer text for distinct windows")
        rows = [prefix + tokens[i * stride:i * stride + body] + suffix for i in range(count)]
        return _row_feeds(program, np.asarray(rows, dtype=np.int64).reshape(n_samples, batch, program_len))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(min(available, need), size=count, replace=False).tolist())
    rows = [prefix + tokens[w * body:(w + 1) * body] + suffix for w in chosen]
    return _row_feeds(program, np.asarray(rows, dtype=np.int64).reshape(n_samples, batch, program_len))


def _row_feeds(program, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed per [batch, seq] block of token ids: input_ids, attention_mask all ones, any other
    integer input zeros."""
    feeds = []
    for ids in rows:
        feed = {}
        for spec in program.inputs:
            if spec.name == "input_ids":
                feed[spec.name] = ids.astype(spec.dtype)
            elif np.issubdtype(np.dtype(spec.dtype), np.integer) or spec.dtype == "bool":
                fill = 1 if spec.name == "attention_mask" else 0
                feed[spec.name] = np.full(spec.shape, fill, dtype=spec.dtype)
            else:
                raise UserError(f"cannot make input '{spec.name}' ({spec.dtype}) from text", "give calibration feeds")
        feeds.append(feed)
    return feeds


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text by default ([CLS] / [SEP], BOS...)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        return [], []
    return list(full[:at]), list(full[at + len(plain):])


def _tokens_from(tokenizer, path: Path, start: float, want: int) -> list[int]:
    """At least `want` token ids (when the text has them) from the slice starting `start` into the
    file, at the next line break; reads a growing piece of the file, not all of it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        if start > 0:
            f.seek(int(size * start) - 1)
            f.readline()  # on to the start of the next line (or stay, when already at one)
        chunk = max(4096, 8 * want)
        data = b""
        while True:
            more = f.read(chunk)
            data += more
            text = data.decode("utf-8", errors="ignore")
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) > want + 16 or not more:
                return ids[:want] if len(ids) > want + 16 else ids
            chunk = len(data)


# -- feeds from token ids -------------------------------------------------------------------------------

ID_SUFFIXES = (".npy", ".npz")


def is_token_ids(path) -> bool:
    """Whether a calibration path names token ids (.npy / .npz) rather than text."""
    return path is not None and Path(path).suffix.lower() in ID_SUFFIXES


def id_feeds(program, path, n_samples: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`n_samples` feeds of token ids saved with numpy (.npy: one integer array, .npz: several): the
    last axis of every array is a token stream (a 1-D array is one stream, an [N, T] array N of
    them); non-overlapping windows of the program's sequence length are cut from each stream (no
    special tokens added) and `n_samples` x batch of them drawn at random (`seed`). Files are read
    without pickle. Ids outside the vocabulary, non-integer arrays or too few windows: UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration token ids {path} not found", "give an .npy or .npz file of integer token ids")
    spec = _ids_spec(program, n_samples, "calibration token ids need", "give calibration feeds instead")
    batch, length = spec.shape
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = {path.name: np.load(path, allow_pickle=False)}
    except Exception as e:
        raise UserError(f"cannot read {path} as token ids: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "save integer arrays with numpy.save / numpy.savez")
    windows = []
    for name, a in arrays.items():
        if not np.issubdtype(a.dtype, np.integer) or a.ndim < 1:
            raise UserError(f"{path}: array '{name}' holds {a.dtype} {list(a.shape)}, not token ids",
                            "save integer token ids (e.g. int64), one stream per row")
        streams = a.reshape(-1, a.shape[-1])
        n = streams.shape[1] // length
        windows.extend(streams[:, :n * length].reshape(-1, length))
    lo, hi = spec.range or (0, None)
    bad = next((w for w in windows if w.min() < lo or (hi is not None and w.max() >= hi)), None)
    if bad is not None:
        raise UserError(f"{path} holds token id {bad.min() if bad.min() < lo else bad.max()}, outside the model's "
                        f"vocabulary [{lo}, {hi})", "give the ids of this model's tokenizer")
    if len(windows) < n_samples * batch:
        raise UserError(f"{path} has {len(windows)} windows of {length} tokens, fewer than {n_samples} x {batch}",
                        "give more token ids, or fewer --calibration-samples")
    chosen = np.random.default_rng(seed).choice(len(windows), size=n_samples * batch, replace=False)
    rows = np.stack([windows[i] for i in sorted(chosen.tolist())]).astype(np.int64)
    return _row_feeds(program, rows.reshape(n_samples, batch, length))


def calibration_data(program, path=None, n_samples: int = 8, seed: int = 0, start: float | None = None):
    """Calibration feeds from `path`: token ids (.npy / .npz, id_feeds) or text (text_feeds; None is
    the default text)."""
    if is_token_ids(path):
        return id_feeds(program, path, n_samples=n_samples, seed=seed)
    return text_feeds(program, path, n_samples=n_samples, seed=seed, start=start)


# -- the calibration loss -------------------------------------------------------------------------------

class CalibrationLoss:
    """loss(outputs_per_feed) for one fixed list of feeds; see the module docstring.

    `terms(i, outputs)` is feed i's (sum, count), so callers can score one feed at a time and
    `combine` the terms, without keeping every feed's logits."""

    def __init__(self, reference, feeds: list[dict]):
        self.feeds = feeds
        self.causal = is_causal_lm(reference)
        self.names = [s.name for s in reference.outputs]
        self.kind = ("next-token cross-entropy (nats)" if self.causal
                     else "1 - cosine of mean-pooled hidden states vs the unmodified program")
        self.reference = None if self.causal else [self._pooled(i, reference(f)) for i, f in enumerate(feeds)]

    def _output(self, outputs) -> torch.Tensor:
        if isinstance(outputs, dict):
            key = "logits" if self.causal else "last_hidden_state"
            value = outputs[key] if key in outputs else next(iter(outputs.values()))
        else:  # a sequence in the program's output order
            key = "logits" if self.causal else "last_hidden_state"
            value = outputs[self.names.index(key)] if key in self.names else outputs[0]
        return torch.as_tensor(value)

    def _pooled(self, i: int, outputs) -> torch.Tensor:
        hidden = self._output(outputs).to(torch.float64)
        mask = self.feeds[i].get("attention_mask")
        mask = torch.ones(hidden.shape[:-1], dtype=torch.float64) if mask is None else torch.as_tensor(mask).to(torch.float64)
        return (hidden * mask[..., None]).sum(-2) / mask.sum(-1, keepdim=True).clamp_min(1e-9)

    def terms(self, i: int, outputs) -> tuple[float, int]:
        if self.causal:
            logits = self._output(outputs).to(torch.float32)
            ids = torch.as_tensor(self.feeds[i]["input_ids"]).to(torch.int64)
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            return float(nll.to(torch.float64).sum()), nll.numel()
        pooled, ref = self._pooled(i, outputs), self.reference[i]
        cos = (pooled * ref).sum(-1) / (pooled.norm(dim=-1) * ref.norm(dim=-1)).clamp_min(1e-30)
        return float((1 - cos).sum()), cos.numel()

    @staticmethod
    def combine(terms: list[tuple[float, int]]) -> float:
        total, count = sum(t[0] for t in terms), sum(t[1] for t in terms)
        return total / max(count, 1)

    def __call__(self, outputs_per_feed: list) -> float:
        return self.combine([self.terms(i, o) for i, o in enumerate(outputs_per_feed)])


def calibration_loss(program, feeds: list[dict], reference=None) -> float:
    """The loss of `program` on `feeds`; `reference` (default: the program) anchors encoder losses."""
    loss = CalibrationLoss(reference if reference is not None else program, feeds)
    return loss([program(f) for f in feeds])
