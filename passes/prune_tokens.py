"""`prune-tokens`: drop or merge tokens between the layers of an encoder or vision transformer, so
later layers run on a shorter sequence (static lengths per stage, inside the graph).

Contract: a transform pass for bidirectional encoders (BERT-style, post-norm, attention_mask input)
and ViTs (pre-norm, CLS token, no mask). Causal LMs are refused. Everything is found through
ModelInfo (block inputs and outputs, attention cores, q/k, softmax), not per architecture.

How many (one of):
  keep=R          (default 0.5) the default pyramid: tcc.tokens.pyramid(R, depth, stages) - the layers
                  cut into `stages` (default 4) equal parts, the first sees every token, each later one
                  keeps R**(1/(stages-1)) of the tokens before it, so the last part keeps R (MiniLM's 6
                  layers at R=0.5: 1, 1, 0.79, 0.63, 0.63, 0.5).
  schedule=[...]  per layer, the fraction of the ORIGINAL tokens at its input (non-increasing, each
                  in (0, 1], at most one entry per layer; missing tail layers keep the last value).
Counts are static: ceil(fraction * S) for the traced length S, never below protect + 1. A layer
whose count is below the previous layer's starts a stage: just before it the tokens are reduced.

Which (method=):
  attention  (default) drop the least important tokens. Importance is the attention each token
             received in the previous layer (the nearest earlier attention on the same tokens):
             softmax(q k^T * scale + mask) recomputed from that layer's q and k (the eager graph's own
             softmax when it has one), mean over heads; the first query's row (the CLS row;
             score=cls, the default when protect >= 1), else the mean over the valid query rows
             (score=mean). The top-k tokens stay in their original order (ranks by pairwise comparison, then gather).
  merge      ToMe bipartite soft matching: the tokens split alternately into A (even) and B (odd);
             each A token's most cosine-similar B token is found on the keys of the previous layer
             (mean over heads; the hidden states when there is no earlier attention on these tokens),
             and the most similar pairs merge into B by size-weighted average (sizes are tracked).
             A round merges at most the unprotected half; a stage needing more runs more rounds.
             proportional=true (default) adds log(size) to later layers' attention scores (ToMe's
             proportional attention), through the masks.
Always kept: the first `protect` tokens (default 1: CLS) and, for text models with a tokenizer
(special=true), positions holding the tokenizer's special tokens around a text ([CLS], [SEP]; not
padding). Padding (attention_mask 0) goes first: it ranks below every real token, and merges only
with padding. Ties among protected / padding tokens break toward earlier positions, so PyTorch and
the compiled library pick the same tokens.

Per-token tensors later layers read are reduced with the tokens: every attention mask (BERT's
[B, 1, S, S] mask gathered on both axes, a [B, 1, 1, S] one on the key axis; for merge, each merged
token keeps its representative's mask). Any other tensor of sequence length read inside the layers
(rotary cos/sin, position ids) raises a UserError: not supported yet. Static view / reshape sizes
holding S are rewritten (tcc.compress.tokens.resize).

Restore: when anything after the last layer reads more than the protected tokens - a token-level
output ([B, S, ...], e.g. last_hidden_state), a decoder that reshapes the patch tokens into a grid,
a pooling over the tokens (`_reads_beyond_protected` follows the last layer's output through
per-token ops to where the token axis is indexed) - the full length is rebuilt after the last
layer: a dropped token takes the hidden state it had when it was dropped (the stream at the input of
the layer it was dropped before), a merged token its merged token's final state (ToMe's un-merge);
the final norm (pre-norm models) and everything after it then run on all S positions. The record's
`restore` says which. Outputs that read only the protected tokens (a CLS pooler) need no restore and
run on the reduced tokens.

Errors (UserError naming the option): keep outside (0, 1]; a schedule entry that keeps no tokens
(<= 0), above 1, increasing, or longer than the model's depth; keep and schedule together;
method=attention with a first entry below 1 (no earlier attention to score with; use merge);
protect >= S; score=cls with protect=0; a causal model; a model without attention blocks.

Record: method, per layer token counts, the stages (layer, tokens before -> after, what scored
them, merge rounds), the importance / metric, protected tokens, restore. FLOPs before/after are the
pipeline's, from the shrunk shapes.

Measured, MiniLM at seq 128 (first 16 wikitext-2 valid sentences, mean-pooled embedding cosine vs
the unpruned model; default pyramid, FLOPs x0.86 / x0.75 / x0.64 at keep 0.7 / 0.5 / 0.3): merge
0.998 / 0.986 / 0.946, attention 0.933 / 0.836 / 0.671 (score=mean 0.843 at 0.5; merge without
proportional attention 0.982). For mean-pooled embeddings merge is the better method: dropped tokens
enter the mean with the earlier state they were restored with.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from tcc.errors import InternalError, UserError
from tcc.pipeline import Option, Pass, PassContext, check_runs, register
from tcc.ir.program import Program
from tcc.ir.structure import SDPA, ancestors, attention_visibility, descendants, nodes_by_name, op_name, sdpa_operands
from tcc.compress.tokens import (add_log_size, drop_key, inline, keep_top, keys_metric, merge_round, pyramid,
                        received_from_probs, received_from_scores, resize, take, take_mask, token_counts)


def _check_schedule(fr: list[float]) -> str | None:
    values = [f"{f:g}" for f in fr]
    for i, f in enumerate(fr):
        if f <= 0:
            return f"entry {i} is {values[i]}: that layer would keep no tokens (entries must be in (0, 1])"
        if f > 1:
            return f"entry {i} is {values[i]}: entries are fractions of the tokens, in (0, 1]"
        if i and f > fr[i - 1]:
            return f"entry {i} ({values[i]}) is above entry {i - 1} ({values[i - 1]}): it must be non-increasing"
    return None


@register
class PruneTokens(Pass):
    """Drop (by attention received) or merge (ToMe) tokens between layers of an encoder or ViT with a
    depth schedule; the sequence shrinks inside the graph, token-level outputs are restored."""

    name = "prune-tokens"
    kind = "transform"
    options = {
        "keep": Option(float, 0.5, "fraction of the tokens left after the last stage of the default pyramid schedule",
                       validator=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "schedule": Option(list[float], [], "per layer, the fraction of the original tokens at its input, "
                           "e.g. [1,1,0.7,0.5] (missing tail layers keep the last value)", validator=_check_schedule),
        "stages": Option(int, 4, "pyramid stages for keep=R (the first one keeps every token)",
                         validator=lambda v: None if v >= 2 else "must be >= 2"),
        "method": Option(str, "attention", "attention: drop the tokens receiving the least attention; "
                         "merge: merge the most similar tokens (ToMe)", choices=("attention", "merge")),
        "protect": Option(int, 1, "the first N tokens are always kept (CLS)",
                          validator=lambda v: None if v >= 0 else "must be >= 0"),
        "special": Option(bool, True, "also keep the tokenizer's special tokens ([CLS], [SEP]) where they occur"),
        "score": Option(str, "auto", "attention importance: the CLS row (cls) or the mean over query rows (mean); "
                        "auto: cls when protect >= 1", choices=("auto", "cls", "mean")),
        "proportional": Option(bool, True, "merge: add log(token size) to later attention scores (ToMe)"),
    }

    def requires(self, program: Program) -> None:
        info = program.info
        if not getattr(info, "blocks", None) or not any(b.attention for b in info.blocks):
            raise UserError("prune-tokens found no attention blocks in this program", "run `tcc analyze MODEL --structure` to see its structure")
        if program.task == "causal-lm":
            raise UserError("prune-tokens: token pruning is for encoders/ViTs, this is a causal LM",
                            "use it on an encoder (feature-extraction) or a vision transformer")
        if self.schedule and self.keep != self.options["keep"].default:
            raise UserError("pass 'prune-tokens' takes one of keep, schedule; got both", "give keep=R or schedule=[...]")
        depth = len(info.blocks)
        if len(self.schedule) > depth:
            raise UserError(f"pass 'prune-tokens' option 'schedule' has {len(self.schedule)} entries, the model has "
                            f"{depth} layers", f"give at most {depth} entries (one per layer)")
        if self.method == "attention" and self.fractions(depth)[0] < 1:
            raise UserError("pass 'prune-tokens' option 'schedule': the first entry must be 1 with method=attention "
                            "(tokens are scored by the previous layer's attention)", "use method=merge, or start with 1")
        if self.score == "cls" and self.protect == 0:
            raise UserError("pass 'prune-tokens' option 'score': cls needs protect >= 1 (the first token must stay)",
                            "use score=mean, or protect=1")

    def fractions(self, depth: int) -> list[float]:
        if not self.schedule:
            return pyramid(self.keep, depth, self.stages)
        fr = list(self.schedule)
        return fr + [fr[-1]] * (depth - len(fr))

    def run(self, program: Program, ctx: PassContext) -> bool:
        info = program.info
        x0 = nodes_by_name(program.gm)[info.blocks[0].input]
        batch, seq = _shape(x0)[:2]
        if self.protect >= seq:
            raise UserError(f"pass 'prune-tokens' option 'protect' is {self.protect}, the sequence has {seq} tokens",
                            f"protect fewer than {seq} tokens")
        fractions = self.fractions(len(info.blocks))
        counts = token_counts(fractions, seq, self.protect + 1)
        stages = [(i, prev, n) for i, (prev, n) in enumerate(zip([seq] + counts, counts)) if n < prev]
        ctx.note(method=self.method, seq_len=seq, schedule=[round(f, 4) for f in fractions], tokens=counts)
        if not stages:
            ctx.note(stages=[], restore="none (no token is removed)")
            return False
        _refuse_causal(program)
        notes = _Rewriter(program, self, batch, seq).apply(stages)  # in place: Pipeline.run works on a copy
        check_runs(program, "prune-tokens", "this model is not supported by prune-tokens yet")
        self._signature = _signature(program.info)  # ensures compares the ModelInfo the manager recovers
        ctx.note(**notes)
        return True

    def ensures(self, program: Program) -> None:
        before, self._signature = getattr(self, "_signature", None), None
        if before is not None and _signature(program.info) != before:
            raise InternalError(f"prune-tokens: ModelInfo after pruning differs: {_signature(program.info)} vs {before}")


# -- the rewrite -------------------------------------------------------------------------------------

@dataclasses.dataclass
class _State:
    """Per-token tensors of the current tokens, as graph nodes."""
    protected: fx.Node  # [B, n] 1.0 for always-kept tokens
    valid: fx.Node      # [B, n] 1.0 for real tokens, 0.0 for padding
    pos: fx.Node        # [B, n] original position of each token (attention: for the restore)
    size: fx.Node       # [B, n] original tokens in each token (merge)
    slot: fx.Node       # [B, S] where each original token is now (merge: for the un-merge)
    full: fx.Node | None = None  # [B, S, D] every token's latest stream state (attention restore)


class _Rewriter:
    def __init__(self, program: Program, opts: PruneTokens, batch: int, seq: int):
        self.program, self.gm, self.info, self.o = program, program.gm, program.info, opts
        self.batch, self.seq = batch, seq
        self.by = nodes_by_name(self.gm)
        blocks = self.info.blocks
        self.y = self.by[blocks[-1].output]
        self.restore = _reads_beyond_protected(self.gm, self.y, seq, opts.protect)
        self.until = self.y if self.restore else None  # what comes after y sees the full length again
        self.cls = opts.score == "cls" or (opts.score == "auto" and opts.protect >= 1)
        self.attn = {b.index: b.attention for b in blocks if b.attention is not None}
        self.eager_in: dict[fx.Node, fx.Node] = {}  # softmax -> its input before proportional attention
        self.original = set(self.gm.graph.nodes)

    def node(self, name: str) -> fx.Node:
        return self.by[name]

    # -- the plan ------------------------------------------------------------------------------------
    def apply(self, stages: list[tuple[int, int, int]]) -> dict:
        first = self.node(self.info.blocks[stages[0][0]].input)
        self.masks = self._mask_consumers(first)  # {(consumer, where): (block, current mask node or None)}
        special = _special_ids(self.program) if self.o.special else []
        st = self._initial(first, special)
        notes, prev_layer = [], 0
        for layer, n_cur, n_new in stages:
            old = {m: m.meta.get("val") for m in self.gm.graph.nodes}
            x = self.node(self.info.blocks[layer].input)
            at = self._first_user(x)
            src = self._source(layer, prev_layer)
            if self.o.method == "attention":
                x_new, rep, st, how = self._drop(x, at, src, st, n_cur, n_new, layer)
                rounds = 1
            else:
                x_new, rep, st, how, rounds = self._merge(x, at, src, st, n_cur, n_new)
            mine = {m for m in self.gm.graph.nodes if m not in old}
            x.replace_all_uses_with(x_new, delete_user_cb=lambda u: u not in mine)
            self._reduce_masks(layer, rep, n_cur, st)
            self._erase_dead(st)
            resize(self.gm, old, self.until)
            if self.o.method == "merge" and self.o.proportional:
                self._proportional_eager(layer, st)
            notes.append({"layer": layer, "tokens": [n_cur, n_new], "scored_by": how,
                          **({"rounds": rounds} if self.o.method == "merge" else {})})
            prev_layer = layer
        restore = self._restore(st) if self.restore else "none (no token-level output)"
        self._erase_dead(st)
        self.gm.graph.lint()
        self.gm.recompile()
        what = (f"the first {self.o.protect} token(s)" if self.o.protect else "none") + (
            f" and the tokenizer's special ids {special}" if special else "")
        out = {"stages": notes, "protected": what, "restore": restore}
        if self.o.method == "attention":
            out["importance"] = ("attention received from the first (CLS) query" if self.cls else
                                 "attention received, mean over valid query rows") + ", mean over heads"
        else:
            out["metric"] = "cosine similarity of the previous layer's keys (mean over heads)"
            out["proportional_attention"] = self.o.proportional
        return out

    def _first_user(self, x: fx.Node) -> fx.Node:
        order = {m: i for i, m in enumerate(self.gm.graph.nodes)}
        return min(x.users, key=order.get)

    def _source(self, layer: int, since: int):
        """The attention nearest before `layer` that ran on the current tokens (the layers from
        `since`, where they became current), or None."""
        return next((self.attn[i] for i in range(layer - 1, since - 1, -1) if i in self.attn), None)

    # -- the state -------------------------------------------------------------------------------
    def _initial(self, first: fx.Node, special: list[int]) -> _State:
        phs = {p.name: p for p in self.gm.graph.nodes if p.op == "placeholder"}
        ok = lambda p: p is not None and _shape(p) == (self.batch, self.seq)
        ids, mask = phs.get("input_ids"), phs.get("attention_mask")
        ids = ids if ok(ids) and special else None
        mask = mask if ok(mask) else None
        prot, valid, pos, size = inline(self.gm, _initial_state, [first, ids, mask], self._first_user(first),
                                        protect=self.o.protect, special=tuple(special))
        return _State(prot, valid, pos, size, slot=pos)

    # -- attention: drop ----------------------------------------------------------------------------
    def _drop(self, x, at, src, st: _State, n_cur: int, n_new: int, layer: int):
        if src is None:
            raise UserError(f"prune-tokens method=attention: no attention before layer {layer} ran on the same tokens "
                            "to score them", "use method=merge, or a schedule that reduces after an attention layer")
        imp, how = self._importance(src, st, at)
        key = inline(self.gm, drop_key, [imp, st.protected, st.valid], at)[0]
        idx = inline(self.gm, keep_top, [key], at, k=n_new)[0]
        full = st.full
        if self.restore:
            full = inline(self.gm, _write, [st.full, x, st.pos], at)[0]
        x_new, prot, valid, pos = inline(self.gm, _take_all, [idx, x, st.protected, st.valid, st.pos], at)
        return x_new, idx, dataclasses.replace(st, protected=prot, valid=valid, pos=pos, full=full), how

    def _importance(self, a, st: _State, at) -> tuple[fx.Node, str]:
        core = self.node(a.core)
        if a.kind == "eager" and a.softmax:
            probs = self.node(a.softmax)
            return inline(self.gm, received_from_probs, [probs, st.valid], at, cls=self.cls)[0], f"{probs.name} (softmax)"
        q, k = core.args[0], core.args[1]
        mask, _ = _sdpa_mask(core)
        imp = inline(self.gm, received_from_scores, [q, k, mask, st.valid], at, scale=_sdpa_scale(core), cls=self.cls)[0]
        return imp, f"{core.name} (q, k recomputed)"

    # -- merge ----------------------------------------------------------------------------------------
    def _merge(self, x, at, src, st: _State, n_cur: int, n_new: int):
        if src is not None:
            k = self._keys(src, at)
            metric = inline(self.gm, keys_metric, [k], at, B=self.batch)[0]
            how = f"keys of {src.core}"
        else:
            metric, how = x, "hidden states (no earlier attention on these tokens)"
        n, rep, rounds = n_cur, None, 0
        cur = x
        while n > n_new:
            r = min(n - n_new, (n + 1) // 2 - (self.o.protect + 1) // 2)
            if r <= 0:
                raise UserError(f"prune-tokens method=merge cannot reduce {n} tokens further with protect={self.o.protect}",
                                "protect fewer tokens or keep more")
            cur, metric, size, rep_r, slot_r = inline(self.gm, merge_round, [cur, metric, st.size, st.protected, st.valid],
                                                      at, r=r)
            prot, valid = inline(self.gm, _take_all, [rep_r, st.protected, st.valid], at)
            slot = inline(self.gm, take, [slot_r, st.slot], at)[0]
            rep = rep_r if rep is None else inline(self.gm, take, [rep, rep_r], at)[0]
            st = dataclasses.replace(st, protected=prot, valid=valid, size=size, slot=slot)
            n, rounds = n - r, rounds + 1
        return cur, rep, st, how, rounds

    def _keys(self, a, at) -> fx.Node:
        core = self.node(a.core)
        if a.kind == "eager" and a.scores:
            kt = self.node(a.scores).args[-1]  # scores = q @ k^T
            return inline(self.gm, _transpose, [kt], at)[0]
        return core.args[1]

    # -- masks ----------------------------------------------------------------------------------------
    def _mask_consumers(self, first: fx.Node) -> dict:
        """Every tensor of sequence length that the layers from `first` on read from outside the
        token stream must be an attention mask: an SDPA core's mask, or an operand on an eager
        core's scores -> softmax path. Returns {(consumer, where): (block, mask node or None)}."""
        end = self.y if self.restore else next(m for m in self.gm.graph.nodes if m.op == "output")
        region = (descendants(first) - {first}) & ancestors(end)
        allowed, out = {}, {}
        for i, a in self.attn.items():
            core = self.node(a.core)
            if op_name(core) in SDPA:
                mask, where = _sdpa_mask(core)
                out[(core, where)] = (i, mask)
                if mask is not None:
                    allowed[(core, mask)] = where
            elif a.scores and a.softmax:
                scores = self.node(a.scores)
                path = descendants(scores) & ancestors(self.node(a.softmax))
                for u in path - {scores}:
                    for j, arg in enumerate(u.args):
                        if isinstance(arg, fx.Node) and arg not in path:
                            allowed[(u, arg)] = ("args", j)
                            out[(u, ("args", j))] = (i, arg)
        for u in (m for m in self.gm.graph.nodes if m in region):  # graph order: the first offender is named
            if u.op not in ("call_function", "output"):
                continue
            for arg in u.all_input_nodes:
                shape = _shape(arg)
                if arg in region or arg is first or arg.op == "get_attr" or shape is None or self.seq not in shape:
                    continue
                if (u, arg) not in allowed:
                    layer = max(b.index for b in self.info.blocks if u in descendants(self.node(b.input)))
                    raise UserError(f"prune-tokens: node '{arg.name}' (shape {list(shape)}) is read by '{u.name}' in layer "
                                    f"{layer} after the tokens are reduced and is not an attention mask; position-dependent "
                                    "tensors inside the layers (rotary embeddings, position ids) are not supported yet",
                                    "this model is not supported by prune-tokens yet")
        # keep only the consumers that read a tensor of sequence length (or an SDPA without a mask)
        return {key: v for key, v in out.items()
                if v[1] is None or (_shape(v[1]) is not None and self.seq in _shape(v[1]))}

    def _reduce_masks(self, layer: int, rep, n_cur: int, st: _State) -> None:
        cache, logs = {}, {}
        proportional = self.o.method == "merge" and self.o.proportional
        order = {m: i for i, m in enumerate(self.gm.graph.nodes)}
        # new masks go before their first reader: the mask may be computed after the stage starts
        for (u, where), (block, mask) in sorted(self.masks.items(), key=lambda kv: order[kv[0][0]]):
            if block < layer:
                continue
            if mask is not None:
                if mask not in cache:
                    cache[mask] = inline(self.gm, take_mask, [mask, rep], u, n=n_cur)[0]
                mask = cache[mask]
                self.masks[(u, where)] = (block, mask)
            value = mask
            if proportional and op_name(u) in SDPA:
                if mask not in logs:
                    logs[mask] = inline(self.gm, add_log_size, [mask, st.size], u)[0]
                value = logs[mask]
            if value is not None:
                _set(u, where, value)
        for block, a in self.attn.items():  # the last stage's log sizes: redone on the new shapes
            sm = self.node(a.softmax) if block >= layer and a.softmax else None
            if sm in self.eager_in:
                sm.update_arg(0, self.eager_in[sm])

    def _erase_dead(self, st: _State) -> None:
        """Remove the nodes this pass added that nothing reads any more (the state aside)."""
        keep = {getattr(st, f.name) for f in dataclasses.fields(st)}
        for m in reversed(list(self.gm.graph.nodes)):
            if m not in self.original and m not in keep and m.op == "call_function" and not m.users:
                self.gm.graph.erase_node(m)

    def _proportional_eager(self, layer: int, st: _State) -> None:
        """Proportional attention in eager cores: log(size) added to the scores before softmax
        (traced after the resize, so on the reduced shapes)."""
        old = {m: m.meta.get("val") for m in self.gm.graph.nodes}
        for block, a in self.attn.items():
            if block >= layer and a.kind == "eager" and a.softmax:
                sm = self.node(a.softmax)
                scores = self.eager_in.setdefault(sm, sm.args[0])
                sm.update_arg(0, inline(self.gm, _scores_plus_log_size, [scores, st.size], sm)[0])
        resize(self.gm, old, self.until)

    # -- restore -------------------------------------------------------------------------------------
    def _restore(self, st: _State) -> str:
        old = {m: m.meta.get("val") for m in self.gm.graph.nodes}
        y, at = self.y, self._first_user(self.y)
        if self.o.method == "attention":
            out = inline(self.gm, _write, [st.full, y, st.pos], at)[0]
            how = ("full length rebuilt after the last layer: each dropped token takes the hidden state it had "
                   "when it was dropped (the stream at the input of that layer)")
        else:
            out = inline(self.gm, take, [y, st.slot], at)[0]
            how = "full length rebuilt after the last layer: each merged token takes its merged token's final state"
        mine = {m for m in self.gm.graph.nodes if m not in old}
        y.replace_all_uses_with(out, delete_user_cb=lambda u: u not in mine)
        resize(self.gm, old)
        return how


# -- token operations composed for the rewrite ------------------------------------------------------------

def _initial_state(x, ids, mask, protect: int, special: tuple):
    B, S = x.shape[0], x.shape[1]
    pos = torch.arange(S).expand(B, S)
    prot = (pos < protect).to(x.dtype)  # 0/1 floats (see tcc.compress.tokens.merge_round)
    if ids is not None:
        for t in special:
            prot = torch.maximum(prot, (ids == t).to(x.dtype))
    valid = (mask != 0).to(x.dtype) if mask is not None else torch.ones(B, S, dtype=x.dtype)
    return prot, valid, pos, torch.ones(B, S, dtype=x.dtype)


def _take_all(idx, *tensors):
    return tuple(take(t, idx) for t in tensors)


def _write(full, x, pos):
    """full [B, S, D] with the current tokens' states x [B, n, D] written at their positions."""
    if full is None:  # the first stage: every token is current, in order
        return x
    return torch.scatter(full, 1, pos[:, :, None].expand(*pos.shape, x.shape[2]), x)


def _transpose(kt):
    return kt.transpose(-1, -2)


def _scores_plus_log_size(scores, size):
    B, n = size.shape
    logs = torch.log(size)[:, None, None, :].to(scores.dtype)
    return (scores.reshape(B, -1, scores.shape[-2], n) + logs).reshape(scores.shape)


# -- what reads the last layer's tokens -------------------------------------------------------------------

# ops whose token t depends on token t of each operand only (the token axis, 1, stays where it is)
_ELEMENTWISE = {"aten.add", "aten.sub", "aten.mul", "aten.div", "aten.gelu", "aten.relu", "aten.silu", "aten.tanh",
                "aten.sigmoid", "aten.pow", "aten.rsqrt", "aten.sqrt", "aten.neg", "aten.exp", "aten.clone",
                "aten._to_copy", "aten.to", "aten.contiguous", "aten.dropout", "aten.alias", "aten.detach"}
_FEATURE_REDUCTIONS = {"aten.mean", "aten.sum", "aten.amax", "aten.softmax", "aten._softmax", "aten.log_softmax"}


def _reads_beyond_protected(gm: fx.GraphModule, y: fx.Node, seq: int, protect: int) -> bool:
    """Whether anything after the last layer reads more of its output `y` [B, S, ...] than the first
    `protect` tokens. y is followed (in graph order) through per-token ops - elementwise ops, norms,
    linears and reductions over the feature dims, reshapes that keep (B, S) in front - to where the
    token axis is indexed: a select or slice inside the first `protect` tokens (a CLS pooler) reads
    only those. Anything else reads more: an output, a reshape of the tokens (into a grid), a pooling
    or any op across them, an index past the protected tokens, a sequence-length operand from
    elsewhere."""
    nodes = list(gm.graph.nodes)
    tokens = {y}  # values whose axis 1 is y's tokens, each from the same token
    for u in nodes[nodes.index(y) + 1:]:
        if not any(a in tokens for a in u.all_input_nodes):
            continue
        use = _token_use(u, tokens, seq, protect)
        if use == "more":
            return True
        if use == "per-token":
            tokens.add(u)
    return False


def _token_use(u: fx.Node, tokens: set, seq: int, protect: int) -> str:
    """How `u` reads the token values in `tokens`: "protected" (only the first `protect` tokens),
    "per-token" (u is [B, S, ...] again, each token from the same tokens), or "more"."""
    name, out, x = op_name(u), _shape(u), u.args[0] if u.args else None
    if name in _ELEMENTWISE:
        if out is None or len(out) < 2 or out[1] != seq:
            return "more"
        for a in u.all_input_nodes:  # the others broadcast along the tokens (no axis of length S there)
            o = _shape(a)
            at = 1 - (len(out) - len(o)) if o is not None else -1
            if a not in tokens and at >= 0 and o[at] != 1:
                return "more"
        return "per-token"
    if x not in tokens or any(a in tokens for a in u.all_input_nodes[1:]):
        return "more"
    rank = len(_shape(x))
    dim = lambda d: int(d) % rank
    if name in ("aten.select", "aten.slice") and dim(u.args[1] if len(u.args) > 1 else 0) == 1:
        if name == "aten.select":
            last = int(u.args[2]) % seq
        else:
            end = u.args[3] if len(u.args) > 3 and u.args[3] is not None else seq
            last = min(int(end) + (seq if int(end) < 0 else 0), seq) - 1
        return "protected" if last < protect else "more"
    if out is None or len(out) < 2 or out[1] != seq:
        return "more"  # the token axis moved or went away
    if name in ("aten.reshape", "aten.view"):
        keeps = out[0] == _shape(x)[0]  # (B, S) in front: only the feature dims are reshaped
    elif name == "aten.permute":
        keeps = [dim(d) for d in u.args[1][:2]] == [0, 1]
    elif name == "aten.transpose":
        keeps = min(dim(u.args[1]), dim(u.args[2])) >= 2
    elif name == "aten.slice":  # of the batch or the features
        keeps = dim(u.args[1] if len(u.args) > 1 else 0) != 1
    elif name == "aten.select":  # of the features
        keeps = dim(u.args[1]) >= 2
    elif name in _FEATURE_REDUCTIONS:
        dims = u.args[1] if len(u.args) > 1 else None
        dims = [dims] if isinstance(dims, int) else dims
        keeps = bool(dims) and all(dim(d) >= 2 for d in dims)
    elif name == "aten.layer_norm":
        keeps = len(u.args[1]) <= rank - 2
    else:
        keeps = (name == "aten.linear" or name.startswith("tcc.dense")) and rank >= 3
    return "per-token" if keeps else "more"


# -- small helpers ------------------------------------------------------------------------------------------

def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _sdpa_mask(core: fx.Node):
    """(mask node or None, where it is: ("args", 3) or ("kwargs", "attn_mask"))."""
    if op_name(core) == "tcc.sdpa" or len(core.args) > 3:
        return core.args[3] if len(core.args) > 3 else None, ("args", 3)
    return core.kwargs.get("attn_mask"), ("kwargs", "attn_mask")


def _sdpa_scale(core: fx.Node) -> float:
    return float(sdpa_operands(core)[4])


def _set(u: fx.Node, where: tuple, value: fx.Node) -> None:
    kind, key = where
    if kind == "args":
        u.update_arg(key, value)
    else:
        u.update_kwarg(key, value)


def _special_ids(program: Program) -> list[int]:
    if not program.tokenizer_dir or "input_ids" not in {s.name for s in program.inputs}:
        return []
    from tcc.compress.calibration import _special_tokens
    from tcc.frontends.models import load_tokenizer
    tok = load_tokenizer(program.tokenizer_dir)
    before, after = _special_tokens(tok)
    return sorted(set(before + after) - {tok.pad_token_id})


def _refuse_causal(program: Program) -> None:
    """UserError when the first attention hides positions from each other on inputs with every
    token valid (a causal or sliding-window mask)."""
    if attention_visibility(program) != "full":
        raise UserError("prune-tokens: token pruning is for encoders/ViTs; this model's attention hides positions "
                        "from each other (causal or sliding-window)",
                        "use it on an encoder (feature-extraction) or a vision transformer")


def _signature(info) -> tuple:
    w = lambda lin: lin.weight if lin is not None else None
    return tuple((w(b.attention and (b.attention.q or b.attention.qkv)), w(b.mlp and b.mlp.down)) for b in info.blocks)
