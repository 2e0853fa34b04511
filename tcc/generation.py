"""Generation: a causal LM's Program with a KV cache (prefill / decode), and the decoding loop.

`kv_cached(program, max_context) -> Generation` rewrites a dynamic-length causal-LM Program (traced
with a symbolic sequence length, tcc.trace(max_seq_len=...)) after its passes, so whatever they did
carries over: a dropped attention layer has no attention core and so no cache, pruned heads and
KV groups shrink their layer's cache, quantized projections stay quantized.

  match    the sequence length is input_ids' symbolic dim 1. Position indices are the aranges of
           that length (rotary angles, learned position embeddings, masks), or the cumsum of an
           all-ones mask like input_ids (OPT's learned positions); attention cores are
           ModelInfo's SDPA nodes, their k and v walked back through repeat_kv (unsqueeze ->
           expand -> reshape) to the [B, Hkv, L, D] tensors the projections and rotary made, or
           eager chains q @ k^T -> scale [-> c tanh(. / c)] [+ mask] -> softmax -> @ v (Gemma-2's
           soft-capped scores). Which keys each core lets a query see is computed from its mask at
           the full context length: plain causal, or causal within the last w keys (a sliding
           window: Gemma-2/3's local layers); any other mask (biases, bidirectional) refuses.
  rewrite  new inputs: pos int64 [1] (the absolute position of the first token), last int64 [1]
           (the row whose logits are returned) and per attention layer k/v caches [B, Hkv, C, D].
           Every position arange (or cumsum) becomes arange + pos; every core becomes tcc::sdpa_kv(q, k, v,
           k_cache, v_cache, pos, scale, window, softcap), which writes rows pos..pos+L-1 of the
           caches and attends causally over rows 0..pos+L-1, the last `window` of them where the
           layer slides (the model's own mask becomes dead and is removed); the LM
           head reads only row `last` of its input, so logits are [B, 1, V].
           kv_cache="int8" stores each cache as int8 codes [B, Hkv, C, D] plus one float32 scale per
           KV head and position [B, Hkv, C], written and read by tcc::sdpa_kv_int8 instead.
  verify   the compiler checks the built artifact against the source Program's own full forward
           (not through this rewrite) on check_ids, teacher-forced: teacher_forced, source_logits,
           compare_logits (docs/GENERATION.md).

The artifact (tcc.compiler) builds this graph twice: `prefill` at a fixed chunk of `prefill_len`
tokens (a prompt is fed in chunks; the last one is padded at the end: later positions never see the
padding, and decode overwrites its cache rows) and `decode` at one token.

Decoding (`decode_loop`) is runtime-agnostic: it takes `step(ids, pos, last) -> logits [V]` and
streams token ids; greedy by default, or temperature / top-k / top-p sampling from a seeded numpy
generator.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UserError
from .ir.program import Program, TensorSpec, copy_sharing_weights
from .ir.structure import ancestors, op_name, sdpa_operands

aten = torch.ops.aten
DEFAULT_MAX_CONTEXT = 2048
# what a compile checks generation on: the tokens of this text, then the calibration text's first
# tokens, CHECK_TOKENS in all (ids 1..12, then seeded random ids, without a tokenizer)
CHECK_PROMPT = "The history of the city goes back to the Roman era, when"
CHECK_TOKENS = 64
# how the KV cache stores keys and values: fp32, or int8 codes with one float32 scale per KV head and
# position (tcc::sdpa_kv_int8): (D + 4) / (4 D) of the fp32 cache's bytes for head dim D
KV_CACHES = ("fp32", "int8")
# the rows of the `verify` entry (speculative decoding: the token before the drafts, and up to
# VERIFY_LEN - 1 drafted tokens checked in one call)
VERIFY_LEN = 8
# shorter verify entries (`verify{n}`), for proposals they hold: a verify's cost grows with its rows
# (the small-M kernels are FMA-bound past ~4 rows at fp32: 8 rows cost ~1.55 decode steps, 4 about one)
VERIFY_SHORT = (4,)


def check_prompt(tokenizer, vocab: int) -> list[int]:
    """The prompt a compile checks generation on: CHECK_PROMPT's tokens, or ids 1..12 (within the
    vocabulary) when there is no tokenizer or it gives no ids (a check tcc adds never fails a build
    for want of a prompt)."""
    ids = list(tokenizer(CHECK_PROMPT)["input_ids"]) if tokenizer is not None else []
    return ids or [(1 + i) % vocab for i in range(12)]


def check_ids(tokenizer, vocab: int, n: int) -> list[int]:
    """The n token ids a compile checks generation on, teacher-forced: check_prompt, then the first
    tokens of the calibration text (tcc.compress.calibration.default_text), then (a short text, or no
    tokenizer) seeded random ids within the vocabulary."""
    ids = check_prompt(tokenizer, vocab)[:n]
    if tokenizer is not None and len(ids) < n:
        from .compress.calibration import _tokens_from, default_text
        ids += [t for t in _tokens_from(tokenizer, default_text(), 0.0, n - len(ids)) if t < vocab][:n - len(ids)]
    rng = np.random.default_rng(0)
    return ids + [int(t) for t in rng.integers(1, max(vocab, 2), n - len(ids))]


def check_split(n: int, chunk: int, context: int) -> int:
    """How many of a check's n ids go through prefill (the rest through decode): past the first
    chunk boundary where n allows it, leaving at least a quarter of them to decode, and no more
    padded chunks than the context holds (the kernel writes a whole chunk's cache rows)."""
    p = min(chunk + max(1, chunk // 4), n - max(1, n // 4))
    return max(1, p if -(-p // chunk) * chunk <= context else min(p, chunk))


@dataclasses.dataclass
class Generation:
    program: Program            # inputs input_ids [B, L], pos, last, caches...; output logits [B, 1, V]
    max_context: int
    caches: list[TensorSpec]    # the cache inputs, in input order (zeros at the start of a sequence)
    layers: list[int]           # block index of each layer's caches (k, v; int8: k codes, k scales, v codes, v scales)
    kv_cache: str = "fp32"      # KV_CACHES

    def manifest(self, prefill_len: int) -> dict:
        return {"max_context": self.max_context, "prefill_len": prefill_len, "cache_layers": self.layers,
                "kv_cache": self.kv_cache,
                "caches": [c.to_json() for c in self.caches],
                "cache_bytes": int(sum(np.prod(c.shape) * np.dtype(c.dtype).itemsize for c in self.caches))}


def default_max_context(config_max: int | None) -> int:
    return min(DEFAULT_MAX_CONTEXT, config_max or DEFAULT_MAX_CONTEXT)


# -- match ------------------------------------------------------------------------------------------

def _seq_symbol(program: Program):
    ids = next((n for n in program.gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids"), None)
    spec = next((s for s in program.inputs if s.name == "input_ids"), None)
    if program.task != "causal-lm" or ids is None or spec is None:
        raise UserError("generation needs a causal LM (task causal-lm, input input_ids)",
                        "compile without generation (--no-generate)")
    if 1 not in spec.dynamic_dims:
        raise UserError("generation needs a program traced with a dynamic sequence length",
                        "trace with tcc.trace(model, max_seq_len=N), or compile the model path with tcc compile")
    return ids, ids.meta["val"].shape[1]


def _position_aranges(gm, seq) -> list:
    """aten.arange(L) / arange(0, L) whose length is the sequence length: the positions."""
    out = []
    for n in gm.graph.nodes:
        if op_name(n) != "aten.arange":
            continue
        val = n.meta.get("val")
        if val is None or val.dim() != 1 or not isinstance(val.shape[0], torch.SymInt):
            continue
        start = n.args[0] if len(n.args) >= 2 else 0
        if str(val.shape[0].node.expr) == str(seq.node.expr) and start == 0:
            out.append(n)
    return out


def _position_cumsums(gm, ids) -> list:
    """cumsum(ones_like(input_ids), 1): positions counted along an all-ones mask (OPT's learned
    positions, cumsum * mask - 1 + offset)."""
    return [n for n in gm.graph.nodes if op_name(n) == "aten.cumsum" and n.args[1] in (1, -1)
            and op_name(n.args[0]) == "aten.ones_like" and n.args[0].args[0] is ids]


def _unrepeat(x):
    """repeat_kv's reshape(expand(unsqueeze(kv, 2), [B, Hkv, n, L, D]), [B, Hkv n, L, D]) -> kv."""
    if op_name(x) in ("aten.reshape", "aten.view", "aten._unsafe_view"):
        e = x.args[0]
        if op_name(e) == "aten.expand" and op_name(e.args[0]) == "aten.unsqueeze" and e.args[0].args[1] == 2:
            return e.args[0].args[0]
    return x


@dataclasses.dataclass
class Core:
    """An attention core as tcc::sdpa_kv computes it: q [B, H, L, D], k/v [B, Hkv, L, D] (before any
    repeat for grouped heads), the scale, the soft cap (0: none) and what decides which keys a query
    sees: `mask` (a node: bool, True = seen, or additive float) and/or `causal`."""
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    softcap: float = 0.0
    mask: torch.fx.Node | None = None
    causal: bool = False
    window: int = 0  # filled in by _windows


def _sdpa_core(n) -> Core:
    """An SDPA node (aten or tcc::sdpa)."""
    q, k, v, mask, scale, causal = sdpa_operands(n)  # scale: SDPA's default when the node leaves it out
    return Core(q, _unrepeat(k), _unrepeat(v), float(scale), mask=mask, causal=bool(causal))


def _eager_core(att, by_name) -> Core | None:
    """An eager chain softmax(c * tanh(a * (q @ k^T)) + mask) @ v (tanh and the mask optional): the
    scalar factors before a tanh (a) and after it (c) give scale = a c and softcap = c. None when the
    chain holds anything else."""
    scores, pv = by_name[att.scores], by_name[att.core]
    if op_name(scores) != "aten.matmul" or scores.args[0].meta["val"].dim() != 4:
        return None
    kt = scores.args[1]
    dims = sorted(d % 4 for d in kt.args[1:3]) if op_name(kt) == "aten.transpose" else None
    if dims != [2, 3]:
        return None
    x, before, after, tanh, mask = by_name[att.softmax].args[0], 1.0, 1.0, False, None
    while x is not scores:
        op, a = op_name(x), x.args
        if op in ("aten.to", "aten._to_copy", "aten.clone", "aten.contiguous", "aten.alias"):
            x = a[0]
        elif op in ("aten.mul", "aten.div") and isinstance(a[0], torch.fx.Node) and isinstance(a[1], (int, float)):
            f = a[1] if op == "aten.mul" else 1.0 / a[1]
            before, after = (before * f, after) if tanh else (before, after * f)
            x = a[0]
        elif op == "aten.tanh" and not tanh:
            tanh, x = True, a[0]
        elif op == "aten.add" and mask is None and not tanh and len(a) == 2 and all(isinstance(t, torch.fx.Node) for t in a):
            on_path = [scores in ancestors(t) for t in a]
            if on_path.count(True) != 1:
                return None
            x, mask = (a[0], a[1]) if on_path[0] else (a[1], a[0])
        else:
            return None
    scale = before * after
    return Core(scores.args[0], _unrepeat(kt.args[0]), _unrepeat(pv.args[1]), scale,
                softcap=after if tanh else 0.0, mask=mask)


def _windows(gm, cores: list[Core], batch: int, context: int) -> str | None:
    """Fill each core's sliding window from what its mask and causal flag let a query see at the
    length `context`, the longest the cache holds: plain causal -> 0; causal within the last w keys
    (w < context) -> w. The masks are computed from the graph alone (their nodes' ancestors, run on
    input ids of that length: they must not depend on the ids' values). Returns why not, else None."""
    masks = list(dict.fromkeys(c.mask for c in cores if c.mask is not None))
    values = {}
    if masks:
        g = torch.fx.Graph()
        env = {}
        need = set().union(*(ancestors(m) for m in masks))
        for n in gm.graph.nodes:
            if n in need:
                env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[m] for m in masks))
        sub = torch.fx.GraphModule(gm, g)
        names = [n.target for n in g.nodes if n.op == "placeholder"]
        if names != ["input_ids"]:
            return f"the attention masks read {names}, not only input_ids"
        runs = []
        with torch.no_grad():
            for fill in (0, 1):
                try:
                    runs.append(sub(torch.full((batch, context), fill, dtype=torch.int64)))
                except Exception as e:
                    return f"the attention masks cannot be computed at length {context}: {type(e).__name__}: {e}"
        if not all(torch.equal(a, b) for a, b in zip(*runs)):
            return "the attention masks depend on the token ids"
        values = dict(zip(masks, runs[0]))
    i = torch.arange(context)[:, None]
    j = torch.arange(context)[None, :]
    for c in cores:
        seen = torch.ones(context, context, dtype=torch.bool)
        if c.mask is not None:
            m = values[c.mask]
            m = m.reshape(-1, *m.shape[-2:]) if m.dim() >= 2 else m.reshape(1, 1, -1)
            if m.shape[-2] not in (1, context) or m.shape[-1] not in (1, context):
                return f"{c.mask.name} has shape {list(m.shape)} at length {context}, not [.., {context}, {context}]"
            if m.dtype != torch.bool:
                hidden = m <= torch.finfo(m.dtype).min / 2
                if not bool(((m == 0) | hidden).all()):
                    return f"{c.mask.name} adds biases to the attention scores (not only a mask)"
                m = ~hidden
            m = m.expand(m.shape[0], context, context)
            if not bool((m == m[:1]).all()):
                return f"{c.mask.name} differs between batch rows or heads"
            seen = seen & m[0]
        if c.causal:
            seen = seen & (j <= i)
        w = int(seen.sum(-1).max())
        if not torch.equal(seen, (j <= i) & (i - j < w)):
            return "an attention core is neither causal nor causal within a sliding window"
        c.window = 0 if w >= context else w
    return None


# -- rewrite ----------------------------------------------------------------------------------------

def kv_cached(program: Program, max_context: int, kv_cache: str = "fp32") -> Generation:
    """The Program with a KV cache (see the module doc). The input program is not changed.
    kv_cache "int8": each layer's cache is int8 codes [B, Hkv, C, D] and float32 scales [B, Hkv, C]
    for k and for v, and its core tcc::sdpa_kv_int8 (quantizes the new rows, reads codes * scale)."""
    from .ir.graph import remove_dead
    from .ir.structure import nodes_by_name

    check_kv_cache(kv_cache)
    ids, seq = _seq_symbol(program)
    spec = next(s for s in program.inputs if s.name == "input_ids")
    if max_context < 2 or max_context > spec.max_shape[1]:
        raise UserError(f"--max-context {max_context} must be between 2 and the traced maximum length "
                        f"{spec.max_shape[1]}", "trace with a larger max_seq_len or ask for a smaller context")
    info = program.info
    if info is None or not info.blocks or info.lm_head is None:
        raise UserError("generation needs the model's attention blocks and LM head, which tcc could not recover",
                        "run `tcc analyze MODEL --structure` to see what was found")
    gm = copy_sharing_weights(program.gm)  # the rewrite below changes the graph, never a weight
    g = gm.graph
    by_name = nodes_by_name(gm)
    cores = {}  # block index -> its attention core, matched before the graph changes
    for i, block in enumerate(info.blocks):
        att = block.attention
        if att is None:
            continue
        core = by_name[att.core]
        c = (_sdpa_core(core) if att.kind == "sdpa" and op_name(core) in ("aten.scaled_dot_product_attention", "tcc.sdpa")
             else _eager_core(att, by_name) if att.kind == "eager" else None)
        if c is None:
            raise UserError(f"attention of block {i} ({att.core}) is neither an SDPA node nor a plain q @ k^T -> "
                            "softmax -> @ v chain; tcc cannot give it a KV cache", "compile without generation (--no-generate)")
        cores[i] = c
    why = _windows(gm, list(cores.values()), int(spec.shape[0]), max_context)
    if why:
        raise UserError(f"generation cannot use a KV cache for this model: {why}", "compile without generation (--no-generate)")
    last_placeholder = [n for n in g.nodes if n.op == "placeholder"][-1]

    def placeholder(name, after):
        with g.inserting_after(after):
            return g.placeholder(name)

    pos = placeholder("pos", last_placeholder)
    last = placeholder("last", pos)
    after = last
    for a in _position_aranges(gm, seq) + _position_cumsums(gm, by_name[ids.name]):
        with g.inserting_after(a):
            shifted = g.call_function(aten.add.Tensor, (a, pos))
        a.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)

    batch = int(spec.shape[0])
    caches, layers = [], []
    for i, block in enumerate(info.blocks):
        att = block.attention
        if att is None:
            continue
        core, c = by_name[att.core], cores[i]
        kv = []
        for part, t in (("k", c.k), ("v", c.v)):
            _, heads, _, dim = t.meta["val"].shape
            shape = (batch, int(heads), max_context, int(dim))
            tensors = [("", shape, "float32")] if kv_cache == "fp32" else [("", shape, "int8"), ("_scale", shape[:3], "float32")]
            for suffix, shape_t, dtype in tensors:
                caches.append(TensorSpec(f"cache_{part}{suffix}.{i}", dtype, shape_t))
                after = placeholder(f"cache_{part}{suffix}_{i}", after)
                after.meta["val"] = torch.empty(shape_t, dtype=getattr(torch, dtype))
                kv.append(after)
        layers.append(i)
        op = torch.ops.tcc.sdpa_kv.default if kv_cache == "fp32" else torch.ops.tcc.sdpa_kv_int8.default
        with g.inserting_before(core):
            new = g.call_function(op, (c.q, c.k, c.v, *kv, pos, c.scale, c.window, c.softcap))
        core.replace_all_uses_with(new)
        g.erase_node(core)

    head = by_name[info.lm_head.node]
    x = head.args[0]
    with g.inserting_before(head):
        row = g.call_function(aten.index_select.default, (x, 1, last))
    head.replace_input_with(x, row)
    g._codegen = torch.fx.graph.CodeGen()  # plain positional inputs (export's pytree spec has one fewer)
    remove_dead(gm)
    g.lint()
    gm.recompile()

    vocab = program.outputs[0].shape[-1]
    inputs = [dataclasses.replace(spec), TensorSpec("pos", "int64", (1,), (0, max_context)),
              TensorSpec("last", "int64", (1,), (0, max_context))] + caches
    outputs = [TensorSpec("logits", "float32", (batch, 1, vocab))]
    gen = dataclasses.replace(program, gm=gm, inputs=inputs, outputs=outputs, info=copy.deepcopy(info),
                              annotations=copy.deepcopy(program.annotations))
    return Generation(gen, max_context, caches, layers, kv_cache)


def check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise UserError(f"--kv-cache {kv_cache!r} is not a KV-cache format", f"choose one of: {', '.join(KV_CACHES)}")


def verify_program(program: Program, length: int) -> Program:
    """The KV-cache Program as speculative decoding's `verify` entry: a chunk of `length` tokens at
    `pos` whose logits come back for EVERY row ([B, length, V]): `last` becomes an int64 [length]
    input (the runtime feeds 0..length-1), so the LM head's index_select keeps all rows."""
    prog = at_length(program, length)
    inputs = [dataclasses.replace(s, shape=(length,)) if s.name == "last" else s for s in prog.inputs]
    outputs = [dataclasses.replace(s, shape=(s.shape[0], length, s.shape[-1])) for s in prog.outputs]
    return dataclasses.replace(prog, inputs=inputs, outputs=outputs)


def add_verify(gen: Generation, functions: dict, manifest: dict) -> None:
    """Add speculative decoding's `verify` entry (verify_program, VERIFY_LEN rows or the context if
    shorter) to a generation artifact's `functions`, and its length to the generation `manifest`; and
    the shorter entries `verify{n}` (n in VERIFY_SHORT, below that length), listed in `verify_lens`."""
    length = min(VERIFY_LEN, gen.max_context)
    functions["verify"] = verify_program(gen.program, length)
    manifest["verify_len"] = length
    short = [n for n in VERIFY_SHORT if n < length]
    for n in short:
        functions[f"verify{n}"] = verify_program(gen.program, n)
    manifest["verify_lens"] = short + [length]


def at_length(program: Program, length: int) -> Program:
    """A shallow copy of a dynamic-length Program whose input_ids spec is static at `length` (what
    the backend exports at that length)."""
    inputs = [dataclasses.replace(s, shape=(s.shape[0], length), min_shape=None, max_shape=None)
              if s.name == "input_ids" else s for s in program.inputs]
    return dataclasses.replace(program, inputs=inputs)


# -- running ----------------------------------------------------------------------------------------

def prefill_chunks(prefill: Callable, prompt: list[int], chunk: int,
                   max_context: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Feed `prompt` through `prefill(ids [chunk], pos, last)` in chunks (the last one padded at its
    end); yields (position, logits) of each chunk's last token. A chunk whose padding would run past
    `max_context` starts earlier instead, re-filling cache rows it shares with the chunk before from
    the same prompt tokens (the same values: exact under causal attention)."""
    for start in range(0, len(prompt), chunk):
        stop = min(start + chunk, len(prompt))
        if max_context is not None and start + chunk > max_context:
            start = max(0, min(start, max_context - chunk))
        ids = np.zeros(chunk, dtype=np.int64)
        ids[:stop - start] = prompt[start:stop]
        yield stop - 1, prefill(ids, start, stop - start - 1)


def prefill_prompt(prefill: Callable, prompt: list[int], chunk: int, max_context: int | None = None) -> np.ndarray:
    """The logits of the prompt's last token after prefill_chunks."""
    logits = None
    for _, logits in prefill_chunks(prefill, prompt, chunk, max_context):
        pass
    return logits


def sample(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    """Greedy (temperature 0) or sampled next token from a [V] row of logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    return int(rng.choice(logits.size, p=probabilities(logits, temperature, top_k, top_p)))


def probabilities(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution `sample` draws from (temperature > 0): softmax(logits / T), cut to the top_k
    tokens and to the smallest set reaching top_p, renormalised (float64 [V])."""
    z = logits.astype(np.float64) / temperature
    if top_k and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        cut = order[np.searchsorted(cum, top_p) + 1:]  # keep the smallest prefix reaching top_p
        p[cut] = 0.0
        p /= p.sum()
    return p


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}", "0 is greedy decoding")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {top_k}", "0 keeps every token")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}", "1 keeps every token")


def check_generation(prompt: list[int], max_context: int, temperature: float, top_k: int, top_p: float) -> None:
    """A UserError for sampling options out of range, an empty prompt or one that leaves no room."""
    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise UserError("the prompt is empty", "give a prompt of at least one token")
    if len(prompt) >= max_context:
        raise UserError(f"the prompt is {len(prompt)} tokens; the artifact's context holds {max_context}, "
                        "with room for at least one new token", "shorten the prompt or recompile with a larger --max-context")


def decode_loop(prefill: Callable, decode: Callable, prompt: list[int], max_new_tokens: int, max_context: int,
                chunk: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                stop: set[int] | None = None, stats: dict | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids. `prefill(ids [chunk], pos, last) -> logits [V]`
    runs one padded chunk; `decode(id, pos) -> logits [V]`. `stats` gets prefill/decode seconds and
    token counts (tokens per second are computed from them)."""
    check_generation(prompt, max_context, temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    stats = stats if stats is not None else {}
    t0 = time.perf_counter()
    logits = prefill_prompt(prefill, prompt, chunk, max_context)
    stats.update(prefill_seconds=time.perf_counter() - t0, prefill_tokens=len(prompt), decode_seconds=0.0,
                 decode_tokens=0)
    pos = len(prompt)
    budget = min(max_new_tokens, max_context - len(prompt))
    for i in range(budget):
        token = sample(logits, rng, temperature, top_k, top_p)
        yield token
        if (stop and token in stop) or i == budget - 1:
            break
        t1 = time.perf_counter()
        logits = decode(token, pos)
        stats["decode_seconds"] += time.perf_counter() - t1
        stats["decode_tokens"] += 1
        pos += 1


def rates(stats: dict) -> dict:
    per_s = lambda n, s: round(n / s, 2) if s > 0 and n else None
    return {"prefill_tokens_per_s": per_s(stats.get("prefill_tokens", 0), stats.get("prefill_seconds", 0)),
            "decode_tokens_per_s": per_s(stats.get("decode_tokens", 0), stats.get("decode_seconds", 0))}


def teacher_forced(session, ids: list[int], chunk: int, prefilled: int) -> dict[int, np.ndarray]:
    """Logits by position from a session with prefill(ids, pos, last) / decode(token, pos) fed `ids`:
    ids[:prefilled] through prefill in chunks of `chunk` (each chunk's last position), then one
    decode step per remaining id (its own position)."""
    out = dict(prefill_chunks(session.prefill, ids[:prefilled], chunk, getattr(session, "max_context", None)))
    for pos in range(prefilled, len(ids)):
        out[pos] = session.decode(ids[pos], pos)
    return out


def verify_vs_decode(session, ids: list[int], chunk: int, prefilled: int, decoded: dict[int, np.ndarray]) -> float | None:
    """How far the `verify` entry's rows are from the decode steps for the same tokens at the same
    positions: ids[:prefilled] prefilled, then ids[prefilled:] (up to verify_len of them) in one verify
    call against `decoded` (teacher_forced's decode logits by position); max |difference| / max |logit|,
    0.0 when every row is bit-identical (greedy speculation is then exactly the target's own tokens).
    None without a verify entry, a token after the prefill, or room in the context for the verify
    chunk (it runs verify_len positions whatever the tokens). Each verify entry (verify_lens: the
    shorter ones too) is measured, the largest difference returned."""
    width = getattr(session, "verify_len", 0)
    n = min(width, len(ids) - prefilled)
    if n < 1 or prefilled < 1 or prefilled + width > getattr(session, "max_context", prefilled + width):
        return None
    for _ in prefill_chunks(session.prefill, ids[:prefilled], chunk, getattr(session, "max_context", None)):
        pass
    want = np.stack([decoded[prefilled + i] for i in range(n)]).astype(np.float64)
    worst = 0.0
    for entry in getattr(session, "verify_lens", None) or [width]:
        m = min(entry, n)
        rows = np.asarray(session.verify(ids[prefilled:prefilled + m], prefilled, entry=entry), np.float64)
        worst = max(worst, float(np.abs(rows - want[:m]).max() / max(float(np.abs(want[:m]).max()), 1e-30)))
    return worst


def source_logits(program: Program, ids: list[int]) -> np.ndarray:
    """One full-sequence forward of a (dynamic-length) causal-LM Program on `ids`: logits [len(ids), V]."""
    feeds = {}
    for s in program.inputs:
        rows = np.tile(np.asarray(ids, dtype=s.dtype), (s.shape[0], 1))
        feeds[s.name] = rows if s.name == "input_ids" else np.ones_like(rows)  # attention_mask
    return program(feeds)[program.outputs[0].name][0]


def compare_logits(want: np.ndarray, got: dict[int, np.ndarray]) -> dict:
    """Top-1 agreement of `got` (logits by position) with `want` [L, V] at those positions, and the
    largest logit difference (absolute, and relative to the largest reference logit)."""
    at = sorted(got)
    g, w = np.stack([got[p] for p in at]).astype(np.float64), want[at].astype(np.float64)
    err = float(np.abs(g - w).max())
    return {"rate": float(np.mean(g.argmax(-1) == w.argmax(-1))), "tokens": len(at),
            "max_abs_logit_error": err, "max_rel_logit_error": err / max(float(np.abs(w).max()), 1e-30)}


class ProgramSession:
    """Prefill/decode of a Generation in PyTorch (the reference the artifact is checked against)."""

    def __init__(self, gen: Generation):
        self.gen = gen
        self.caches = [torch.zeros(c.shape, dtype=getattr(torch, c.dtype)) for c in gen.caches]

    def prefill(self, ids, pos: int, last: int) -> np.ndarray:
        return self.step(ids, pos, last)

    def decode(self, token: int, pos: int) -> np.ndarray:
        return self.step(np.array([token]), pos, 0)

    def step(self, ids: np.ndarray, pos: int, last: int) -> np.ndarray:
        args = [torch.from_numpy(np.asarray(ids, dtype=np.int64).reshape(1, -1)),
                torch.tensor([pos]), torch.tensor([last])] + self.caches
        with torch.no_grad():
            out = self.gen.program.gm(*args)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out[0, 0].numpy()
