"""Running artifacts: `tcc.load(dir)` -> a callable taking numpy inputs by name.

The backend that built an artifact (manifest "backend", tcc.pipeline.backend's registry) runs it: for tvm,
x86-64 artifacts on an x86-64 host run in-process on TVM's Relax VM; arm64 artifacts run under
qemu-aarch64 with the aarch64 TVM runtime, so their output is checked here; cuda artifacts load
(manifest, inputs, outputs) but calling one is a UserError: tcc has no GPU runtime and this host no
GPU (docs/CUDA.md says how to run one on a GPU host) (backends/tvm/session.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .artifact import read_manifest, verify_files
from .pipeline.backend import get_backend
from .errors import UserError
from .ir.program import TensorSpec


class Loaded:
    """A loaded artifact. `loaded(feeds) -> {output name: array}`."""

    def __init__(self, dir: Path, verify: bool = True):
        self.dir = Path(dir)
        self.manifest = read_manifest(self.dir)
        if verify:
            verify_files(self.dir, self.manifest)
        self.inputs = [TensorSpec.from_json(s) for s in self.manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in self.manifest["outputs"]]
        self.target = self.manifest["target"]
        self.task = self.manifest.get("task")
        # the backend that built it runs it (tcc.pipeline.backend: a registry, not names)
        self._impl = get_backend(self.manifest.get("backend") or "tvm").session(self.dir, self.manifest)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(feeds) - {s.name for s in self.inputs})
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if unknown or missing:
            raise UserError(f"inputs do not match the artifact: missing {missing}, unknown {unknown}",
                            f"the artifact takes {[s.to_json() for s in self.inputs]}")
        return self._impl({s.name: s.check(feeds[s.name]) for s in self.inputs})

    # -- generation (causal LMs compiled with prefill/decode entry points) ------------------------
    def session(self) -> "GenerationSession":
        """A fresh KV cache and the artifact's prefill/decode; UserError for an artifact without them."""
        gen = self.manifest.get("generation")
        if not gen:
            raise UserError(f"the artifact {self.dir} was compiled without generation support (no prefill/decode)",
                            "compile a causal LM for a CPU target without --no-generate")
        if not hasattr(self._impl, "function"):
            raise UserError(f"generation is not supported for {self.target['name']} artifacts in this tcc",
                            "compile for --target x86 to generate here")
        return GenerationSession(self._impl, gen)

    def tokenizer(self):
        """The artifact's tokenizer, loaded once per Loaded (about 1 s for a 49k-token vocabulary; generate()
        asks for it on every call)."""
        if getattr(self, "_tokenizer", None) is None:
            from .evaluate import load_tokenizer
            gen = self.manifest.get("generation") or {}
            stored = gen.get("tokenizer")
            self._tokenizer = load_tokenizer(self.dir / stored if stored else self.manifest.get("tokenizer"))
        return self._tokenizer

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream=None, stop_at_eos: bool = True,
                 speculate: str = "off") -> dict:
        """Generate up to `max_new_tokens` after `prompt` (text, tokenized with the artifact's tokenizer, or
        token ids). Greedy by default; temperature > 0 samples (top_k, top_p, seed). `stream(token_id,
        text_so_far)` is called per new token (text None, and "text" None, for an artifact without a
        tokenizer: its output is the token ids). Returns {"text", "token_ids", "prompt_tokens",
        "prefill_tokens_per_s", "decode_tokens_per_s", ...}. `speculate`: "lookup" (prompt lookup) or
        "draft" (the artifact's draft program, tcc compile --draft; the verify rows it leaves empty get
        prompt lookup's tokens) or "auto" (draft where the artifact has one whose parameter bytes are at most
        speculative.AUTO_DRAFT_COST of the target's, else lookup) proposes tokens that the target
        checks in one `verify` call each (tcc.speculative: greedy output identical, sampling keeps the
        target's distribution); the result then has "speculative" (acceptance rate, tokens per target
        call)."""
        from .generation import rates
        from .speculative import summary
        session = self.session()
        loop = self._speculative_loop(session, speculate)
        gen = self.manifest["generation"]
        tok = None
        if isinstance(prompt, str):
            if not gen.get("tokenizer"):
                raise UserError(f"the artifact {self.dir} has no tokenizer (its model had none): give the prompt as "
                                "token ids", "tcc generate ARTIFACT --prompt-ids 1,2,3 (Python: generate([1, 2, 3]))")
            tok = self.tokenizer()
            ids = tok(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        stats: dict = {}
        new: list[int] = []
        stop = set(gen.get("eos_token_ids") or []) if stop_at_eos else None
        for token in loop(ids, max_new_tokens, gen["max_context"],
                          gen["prefill_len"], temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop=stop, stats=stats):
            new.append(token)
            if stream is not None:
                stream(token, None if tok is None else tok.decode(new, skip_special_tokens=True))
        if tok is None and gen.get("tokenizer"):
            tok = self.tokenizer()
        text = tok.decode(new, skip_special_tokens=True) if tok is not None else None
        return {"text": text, "token_ids": new, "prompt_tokens": len(ids), **rates(stats),
                "prefill_seconds": round(stats.get("prefill_seconds", 0.0), 4),
                "decode_seconds": round(stats.get("decode_seconds", 0.0), 4),
                **({"speculative": {"mode": speculate, **summary(stats)}} if speculate != "off" else {})}

    def _speculative_loop(self, session, speculate: str):
        """decode_loop over `session`, or (speculate "lookup" / "draft") tcc.speculative's loop."""
        from .generation import decode_loop
        from .speculative import (CONFIDENCE, SPECULATE, VERIFY_GUARD, LookupDraft, ModelDraft, draft_pays,
                                  short_proposal, speculative_loop, verify_difference)
        if speculate not in SPECULATE:
            raise UserError(f"--speculate {speculate!r} is not a speculation mode", f"choose one of: {', '.join(SPECULATE)}")
        if speculate == "off":
            return lambda *a, **kw: decode_loop(session.prefill, session.decode, *a, **kw)
        if not session.verify_len:
            raise UserError(f"the artifact {self.dir} has no verify entry (compiled before speculative decoding)",
                            "compile it again with this tcc, or generate without --speculate")
        gen = self.manifest["generation"]
        if speculate == "auto":  # the draft program where it is cheap enough (with prompt lookup's fill)
            speculate = "draft" if draft_pays(self.manifest) else "lookup"
        if speculate == "lookup":  # free proposals: every round proposes as many as verify takes
            draft, how = LookupDraft(weak=short_proposal(session)), {"adapt": False}
        else:
            if "draft" not in gen:
                raise UserError(f"the artifact {self.dir} has no draft program", "compile it with --draft PIPELINE, "
                                "or speculate with --speculate lookup (prompt lookup needs no draft)")
            draft = ModelDraft(GenerationSession(self._impl, {**gen["draft"], "functions": gen["functions"]},
                                                 prefix="draft_"), confidence=CONFIDENCE)
            how = {"fill": True}
        how["guard"] = VERIFY_GUARD * (verify_difference(self.manifest) or 0.0)  # 0: rows exact (or not measured)
        return lambda *a, **kw: speculative_loop(session, draft, *a, **how, **kw)

    def close(self):
        if hasattr(self._impl, "close"):
            self._impl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GenerationSession:
    """One sequence's KV cache and the calls that fill it: prefill(ids [chunk], pos, last) and
    decode(token, pos) each return the logits [V] of one position. Positions must continue where the
    last call ended (a prefill may also start earlier, re-filling the cache from there): decode
    before a prefill, or out of order, is a UserError."""

    def __init__(self, impl, gen: dict, prefix: str = ""):
        self.gen = gen
        self.max_context, self.chunk = gen["max_context"], gen["prefill_len"]
        fns = gen["functions"]
        self.caches = impl.new_state(gen["caches"])
        self._prefill = impl.function(f"{prefix}prefill", fns[f"{prefix}prefill"], self.caches)
        self._decode = impl.function(f"{prefix}decode", fns[f"{prefix}decode"], self.caches)
        # speculative decoding's entry (tcc.speculative): absent from artifacts built before it
        self.verify_len = gen.get("verify_len", 0) if f"{prefix}verify" in fns else 0
        self._verify = impl.function(f"{prefix}verify", fns[f"{prefix}verify"], self.caches) if self.verify_len else None
        # the shorter verify entries (verify{n}, tcc.generation.VERIFY_SHORT): a proposal runs the shortest that holds it
        self.verify_lens = [n for n in gen.get("verify_lens", []) if n < self.verify_len and f"{prefix}verify{n}" in fns] \
            + ([self.verify_len] if self.verify_len else [])
        self._verifies = {n: impl.function(f"{prefix}verify{n}", fns[f"{prefix}verify{n}"], self.caches)
                          for n in self.verify_lens[:-1]}
        if self.verify_len:
            self._verifies[self.verify_len] = self._verify
        self.next_pos = 0  # rows of the cache filled so far

    def verify(self, ids, pos: int, entry: int | None = None):
        """Speculative decoding's check: up to verify_len tokens at positions pos.. (pos at most the
        next position), padded to the shortest verify entry that holds them (`entry`: that entry's
        length, one of verify_lens); returns the logits of every real row [len(ids), V] (row i is the
        distribution of the token after ids[i]). The cache then holds pos + len(ids) positions;
        rollback() keeps the accepted ones."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = self.verify_len
        if not n:
            raise UserError("this artifact has no verify entry (compiled before speculative decoding)",
                            "compile it again with this tcc")
        if not 1 <= ids.size <= n:
            raise UserError(f"verify takes 1 to {n} tokens, got {ids.size}", "propose fewer tokens")
        if not 0 < pos <= self.next_pos:
            raise UserError(f"verify at position {pos}, but the cache holds {self.next_pos} positions",
                            "prefill the prompt first and verify where it (or the accepted tokens) ended")
        if entry is None:
            entry = next((e for e in self.verify_lens if e >= ids.size), n)
        elif entry not in self._verifies or ids.size > entry:
            raise UserError(f"no verify entry of {entry} rows for {ids.size} tokens", f"choose one of {self.verify_lens}")
        if pos + entry > self.max_context:
            raise UserError(f"a verify chunk of {entry} positions at {pos} runs past the context of {self.max_context}",
                            "decode one token at a time near the end of the context")
        block = np.zeros((1, entry), dtype=np.int64)
        block[0, :ids.size] = ids
        out = self._verifies[entry]([block, np.array([pos]), np.arange(entry, dtype=np.int64)])
        self.next_pos = pos + ids.size
        return out[0, :ids.size]

    def rollback(self, length: int) -> None:
        """Keep the first `length` positions of the cache (speculative decoding drops the rejected
        tokens' rows this way: the next call writes over them)."""
        if not 0 <= length <= self.next_pos:
            raise UserError(f"cannot roll the cache back to {length} positions: it holds {self.next_pos}",
                            "roll back to a length the cache holds")
        self.next_pos = length

    def prefill(self, ids, pos: int, last: int):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] != self.chunk:
            raise UserError(f"prefill takes chunks of {self.chunk} tokens, got {ids.shape[1]}", "pad the last chunk")
        if not 0 <= pos <= self.next_pos:  # pos < next_pos re-fills the cache from pos on
            raise UserError(f"prefill at position {pos}, but the cache holds {self.next_pos} positions",
                            "prefill the prompt from its start, chunk after chunk")
        if pos + last >= self.max_context or not 0 <= last < self.chunk:
            raise UserError(f"tokens up to position {pos + last} do not fit the context of {self.max_context}",
                            "shorten the prompt or recompile with a larger --max-context")
        if pos + self.chunk > self.max_context:
            raise UserError(f"a prefill chunk of {self.chunk} positions at {pos} runs past the context of "
                            f"{self.max_context}", f"start the last chunk at {self.max_context - self.chunk} or "
                            "earlier, repeating tokens already prefilled (tcc.generation.prefill_chunks does)")
        out = self._prefill([ids, np.array([pos]), np.array([last])])
        self.next_pos = pos + last + 1
        return out[0, 0]

    def decode(self, token: int, pos: int):
        if self.next_pos == 0:
            raise UserError("decode called before prefill: the KV cache is empty", "prefill the prompt first")
        if pos != self.next_pos:
            raise UserError(f"decode at position {pos}, but the next position is {self.next_pos}",
                            "decode one token after another")
        if pos >= self.max_context:
            raise UserError(f"position {pos} is past the context of {self.max_context}",
                            "recompile with a larger --max-context")
        out = self._decode([np.array([[token]], dtype=np.int64), np.array([pos]), np.array([0])])
        self.next_pos = pos + 1
        return out[0, 0]


def load(dir, verify: bool = True) -> Loaded:
    return Loaded(Path(dir), verify=verify)
