"""Activation-aware smoothing: SmoothQuant and AWQ scale search and folding, exact in fp32.

Smoothing rescales the input features of a group of linears that read the same value x (q/k/v, gate/up,
one linear alone): the weights become W * s (column j times s_j) and x becomes x / s, so
(x / s) (W s)^T = x W^T: the program computes the same function up to float rounding. It moves
activation outliers into the weights (SmoothQuant, for int8 activations) or protects the weight columns
that see large activations (AWQ, for int4 / int8 weights); the quantizer that runs afterwards
(passes/quantize.py) then loses less. x / s is folded, exactly, into (1) the preceding norm's weight
(and bias) when x is that norm's output and only these linears read it, else (2) the rows of the
previous linear for attention v -> o (query heads sharing a KV head share one s) and a gated MLP's
up -> down (its `up` rows), else (3), AWQ only, an explicit `mul(x, 1/s)` (a buffer `input_smooth` next
to the first weight). SmoothQuant leaves a group with neither (1) nor (2) unsmoothed (noted).

Both searches need the format the weights will be quantized to (a `Target`: the grid, the int4 group,
whether int8 activations are asymmetric) and which linears will be quantized (`layers`, the
quantization plan's {weight target: Layer} in graph order; tcc.compress.quantization.match): a group no
quantized linear reads stays unsmoothed, and a tied lm_head (Layer.tied) is never smoothed (its weight
is the embedding table).

smooth(program, layers, feeds, method, alpha, target, hessian_blocks=False) -> Smoothed
    the whole step: per-input statistics over `feeds` (one GraphRunner pass, which also gives the
    float outputs the check and the alpha search compare against), the fold of each group, the scales, W * s and the folds applied, and a
    check that the outputs on feeds[0] moved by < 1e-3 relative (InternalError otherwise). Returns the
    per-group notes {linears, fold, ratio | alpha}, the alpha search (SmoothQuant, alpha=None), the
    statistics (with the diagonal int4-group blocks of the input Hessian when hessian_blocks: AWQ's
    clipping reads them, scaled by 1 / (s s^T)), the per-feature s applied per input, and the groups.
    method="awq": per group the a in 0, 1/20 .. 19/20 of s = mean|x|^a (tcc.compress.quantization.awq_scale)
        whose quantized group, on the first AWQ_FEEDS feeds, changes the output of the sub-block it
        feeds least (awq_scales); a = 0 (s = 1) leaves the group alone.
    method="smoothquant": s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (quantization.smoothquant_scales);
        alpha=None picks one alpha for the model from ALPHA_GRID by the calibration loss of the
        program with every quantized linear emulated as smoothed W8A8 (search_alpha) on at most
        ALPHA_FEEDS feeds, fewer for big models (_search_feeds, SEARCH_FLOP). Where s scales a bf16
        weight (a bf16 checkpoint's own tensors) it is rounded to a power of two (_exact_scales).
input_groups(gm, layers) -> [(x, [linears reading x])]   the groups, in graph order.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from ..errors import InternalError
from ..memory import page_out
from ..ir.graph import linear_bias, module_path, new_attribute, op_name, readers, set_val
from ..ir.ops import dense_a8w8
from ..ir.program import Program, attribute as _attr
from ..ir.structure import IDENTITY
from ..pipeline import estimate_flops
from ..progress import track
from ..ir.runner import GraphRunner
from .calibration import CalibrationLoss
from .quantization import (DENSE, Grid, InputStats, awq_scale, collect, feed_args, int4_group, linear_reads,
                           quantize_per_channel, row_chunks, rtn, run_range, smoothquant_scales)

aten = torch.ops.aten
AWQ_FEEDS, AWQ_GRID = 8, 20
ALPHA_FEEDS, ALPHA_GRID = 8, (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
METHODS = ("awq", "smoothquant")


def alpha_problem(v: str) -> str | None:
    """What is wrong with a SmoothQuant alpha option value (auto or a number in [0, 1]), None when fine."""
    if v == "auto":
        return None
    try:
        ok = 0 <= float(v) <= 1
    except ValueError:
        ok = False
    return None if ok else f"must be auto or a number in [0, 1], got {v}"


@dataclasses.dataclass(frozen=True)
class Target:
    """The format the smoothed linears will be quantized to: the weights' grid, the int4 group asked
    for (each layer uses int4_group(K, group)), and whether int8 activations have zero points."""

    grid: Grid
    group: int = 128
    act_asym: bool = False


@dataclasses.dataclass
class Smoothed:
    notes: list[dict]  # per input group: {linears, fold, ratio | alpha}
    alpha_search: dict | None  # SmoothQuant with alpha=None: {chosen, by, losses, float, feeds, metric}
    stats: dict[str, InputStats]  # per input node name, of the float program before smoothing
    applied: dict[str, torch.Tensor]  # input node name -> the per-feature s its linears' weights were multiplied by
    groups: list[tuple[fx.Node, list[fx.Node]]]


@torch.no_grad()  # the Program's weights are parameters: |W|.amax(0) under autograd kept each |W| (a second copy)
def smooth(program: Program, layers: dict, feeds: list[dict], method: str, alpha: float | None, target: Target,
           hessian_blocks: bool = False) -> Smoothed:
    """Scale each input group's weights by s and fold x / s into the graph (exact in fp32); see the
    module docstring."""
    if method not in METHODS:
        raise InternalError(f"smoothing: unknown method {method!r}")
    gm = program.gm
    width = lambda lins: _attr(gm, lins[0].args[1].target).shape[1]
    groups = input_groups(gm, layers)
    stats = {x.name: InputStats(width(lins), blocks=int4_group(width(lins), target.group) if hessian_blocks else 0)
             for x, lins in groups}
    searched = (_search_feeds(program, feeds, ALPHA_FEEDS, 1 + len(ALPHA_GRID))
                if method == "smoothquant" and alpha is None else feeds[:1])
    outputs = collect(program, feeds, stats, f"smoothing: calibrating {method}", keep=len(searched))
    reference = outputs[0]
    notes, todo = [], []
    for x, lins in groups:
        note = {"linears": [module_path(n) or n.name for n in lins]}
        notes.append(note)
        fold = _find_fold(program, x, lins)
        if isinstance(fold, str):
            note["fold"] = "none: " + fold
        elif fold[0] == "mul" and method == "smoothquant":
            note["fold"] = "none: the input is no norm's own output and no v->o / up->down projection"
        elif not any(n.args[1].target in layers for n in lins):
            note["fold"] = "none: no quantized linear reads it"
        else:
            todo.append((x, lins, fold, note))
    search = None
    if method == "awq":
        scales = awq_scales(program, layers, todo, stats, feeds[:AWQ_FEEDS], target)
    else:
        w_max = _column_maxima(gm, todo)
        if alpha is None and todo:  # nothing to smooth: no alpha to choose
            search = search_alpha(program, layers, todo, stats, searched, target.act_asym, w_max, outputs)
            alpha = search["chosen"]
        scales = _smoothquant_scales(gm, todo, stats, alpha, w_max)
    applied = {}
    for (x, lins, fold, note), s in zip(todo, scales):
        if method == "smoothquant":
            note["alpha"] = alpha
        elif note["ratio"] == 0:
            note["fold"] = "none: the search kept s = 1"
            continue
        full = s if fold[-1] is None else s[fold[-1]]
        for n in lins:
            _scale_columns(_attr(gm, n.args[1].target), full)
        note["fold"] = _apply_fold(gm, fold, s, full, x, lins)
        applied[x.name] = full
    gm.recompile()
    _check_exact(program, feeds[0], reference)
    return Smoothed(notes, search, stats, applied, groups)


def _scale_columns(w: torch.Tensor, s: torch.Tensor) -> None:
    """w[:, j] *= s[j], written into new memory that `w` then holds (set_: the same tensor object, its
    version bumped as by an in-place op). In place (mul_) a weight mapped from the checkpoint file
    became private copies of its pages, which MADV_PAGEOUT cannot reclaim without swap and quantize's
    page_out then left in RSS: a second copy of every smoothed weight (issue 15; 1B W8A8 compile).
    A block of rows at a time (row_chunks: float32 products of at most 32 MiB, the same values): a
    bf16 weight times float32 s in one piece made a float32 copy of the whole weight, 0.6 GB beside a
    49,152 x 3,072 bf16 LM head, the 3B W8A8 compile's peak (RSS sampled, session 17)."""
    out = torch.empty_like(w)
    for rows in row_chunks(*w.shape):
        out[rows] = (w[rows] * s[None, :]).to(w.dtype)
    _hold(w, out)


def _hold(w: torch.Tensor, values: torch.Tensor) -> None:
    """`w` holds `values` (new memory of its shape and dtype) from now on; its old pages leave RSS."""
    page_out([w])  # a weight mapped from the checkpoint: its file pages go (a no-op for other memory)
    w.set_(values)


def _smoothquant_scales(gm, todo: list, stats: dict, alpha: float, w_max: list | None = None) -> list[torch.Tensor]:
    """`w_max` (_column_maxima(gm, todo)): the weights' column maxima, which do not depend on alpha
    (the alpha search computes them once, not once per alpha; the same scales bit for bit)."""
    w_max = w_max or _column_maxima(gm, todo)
    return [_exact_scales(gm, lins, smoothquant_scales(stats[x.name].abs_max, [m], alpha, fold[-1]))
            for (x, lins, fold, _), m in zip(todo, w_max)]


def _column_maxima(gm, todo: list) -> list[torch.Tensor]:
    """Per group of linears reading one input: max over their rows of |W|, as a [1, K] tensor (the
    one "weight" whose column maxima smoothquant_scales then takes: the same values)."""
    return [torch.stack([_attr(gm, n.args[1].target).abs().amax(dim=0) for n in lins]).amax(dim=0)[None, :]
            for _, lins, _, _ in todo]


def _exact_scales(gm, lins: list[fx.Node], s: torch.Tensor) -> torch.Tensor:
    """s, or s rounded to the nearest power of two where it scales a weight stored in bf16 (a bf16
    checkpoint's own tensors, tcc.frontends.frontend): W * s and the folded rows / s then stay exact in bf16, so
    smoothing writes no float32 copy of the weights (issue 15). float32 weights: s as it is."""
    if any(_attr(gm, n.args[1].target).dtype == torch.bfloat16 for n in lins):
        return torch.exp2(torch.round(torch.log2(s)))
    return s


SEARCH_FLOP = 2e12  # the alpha search's forward passes together: about this many FLOPs (at least one feed)


def _search_feeds(program: Program, feeds: list[dict], most: int, runs: int) -> list[dict]:
    """At most `most` of `feeds`, fewer for big models: `runs` forward passes over them stay within
    SEARCH_FLOP (estimate_flops; a Llama-3.2-1B shape at 128 tokens, 2.8e11 FLOPs a feed: the alpha
    search's 7 runs on one feed, where 8 feeds took 56 forward passes; SmolLM2 keeps 8; issue 15)."""
    try:
        per_feed = estimate_flops(program.gm)
    except InternalError:  # a node without shapes
        return feeds[:most]
    return feeds[:int(max(1, min(most, SEARCH_FLOP // max(runs * per_feed, 1))))]


def search_alpha(program: Program, layers: dict, todo: list, stats: dict, feeds: list[dict], asym: bool,
                 w_max: list | None = None, float_outputs: list | None = None) -> dict:
    """SmoothQuant's alpha for the whole model: for each alpha in ALPHA_GRID, run `feeds` through the
    program with every quantized linear computed as smoothed W8A8 (x / s quantized per token, times
    Q(W * s) with Q int8 per row: tcc::dense_a8w8 itself, its exact integer sums; the float linear does
    not run beside it and the float program is not changed) and score it by how far its output
    moves from the float program's: causal LMs the mean KL(float || quantized) of the next-token
    distributions (less noisy than the cross-entropy against the text, also recorded as "loss"),
    encoders the calibration loss (1 - cosine to the float program). `w_max`: _column_maxima(gm, todo);
    `float_outputs`: the float program's outputs on `feeds` when the caller has them (the statistics'
    run), else one run per feed. Returns {chosen, losses, float}."""
    gm = program.gm
    runner = GraphRunner(gm)
    objective = CalibrationLoss(program, feeds)
    args = [feed_args(program, f) for f in feeds]
    base, reference = [], []
    for i, a in enumerate(args):
        out = float_outputs[i] if float_outputs else runner.run(a).outputs
        base.append(objective.terms(i, out))
        if objective.causal:
            reference.append(_log_probs(program, out))
    smoothed = {x.name: (fold[-1], i) for i, (x, _, fold, _) in enumerate(todo)}
    losses = []
    w_max = w_max or _column_maxima(gm, todo)
    for alpha in track(ALPHA_GRID, f"smoothing: smoothquant alpha on {len(feeds)} feeds"):
        scales = _smoothquant_scales(gm, todo, stats, alpha, w_max)
        replace = {}
        for layer in layers.values():
            w = _attr(gm, layer.tied or layer.weight).detach()
            for n in layer.nodes:
                x, b = n.args[0], linear_bias(n)
                s = None
                if x.name in smoothed and not layer.tied:
                    expand, i = smoothed[x.name]
                    s = scales[i] if expand is None else scales[i][expand]
                replace[n.name] = (_a8w8(x.name, w, s, b.name if isinstance(b, fx.Node) else b, asym, len(feeds) > 1),
                                   linear_reads(n))
        terms, kl = [], []
        for i, a in enumerate(args):
            out = runner.run(a, replace=replace).outputs
            terms.append(objective.terms(i, out))
            if objective.causal:
                p = reference[i]
                kl.append((float((p.exp() * (p - _log_probs(program, out))).sum()), p.shape[0]))
        del replace
        losses.append({"alpha": alpha, "loss": _digits(CalibrationLoss.combine(terms))})
        if kl:
            losses[-1]["kl"] = _digits(CalibrationLoss.combine(kl))
    key = "kl" if objective.causal else "loss"
    best = min(losses, key=lambda r: r[key])
    return {"chosen": best["alpha"], "by": key, "losses": losses, "float": _digits(CalibrationLoss.combine(base)),
            "feeds": len(feeds), "metric": objective.kind}


def _digits(v: float) -> float:
    return float(f"{v:.6g}")


def _log_probs(program: Program, outputs: list) -> torch.Tensor:
    """log-softmax of a causal LM's logits output, [positions, vocab]."""
    names = [s.name for s in program.outputs]
    logits = torch.as_tensor(outputs[names.index("logits") if "logits" in names else 0]).to(torch.float32)
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)


def _a8w8(x: str, w: torch.Tensor, s: torch.Tensor | None, b, asym: bool, keep: bool):
    """A GraphRunner replacement: tcc::dense_a8w8(x / s, Q(w * s), b) with x's rows quantized per token and
    Q int8 per row (quantize_per_channel). The codes are made when the linear runs; `keep` (the search runs
    several feeds) holds them for the next feed. With one feed (a big model: _search_feeds) nothing holds
    them, so the search never keeps an int8 copy of every weight beside the float ones (1.2 GB on the
    Llama-3.2-1B shape, the SmoothQuant W8A8 compile's peak; issue 15)."""
    held = []

    def fn(get):
        q = held[0] if held else quantize_per_channel(w, s)  # 1/4 of the float bytes
        if keep and not held:
            held.append(q)
        xv = get(x).to(torch.float32)
        return dense_a8w8(xv if s is None else xv / s, q[0], q[1], get(b) if isinstance(b, str) else b,
                          None, None, asym)
    return fn


def awq_scales(program: Program, layers: dict, todo: list, stats: dict, feeds: list[dict], target: Target) -> list:
    """Per group, AWQ's s: the a in 0, 1/20 .. 19/20 for which the output of the sub-block the group
    feeds (attention output projection for q/k/v, down projection for gate/up, else the group's own
    linears) changes least, in squared error over `feeds`, when the group's quantized linears compute
    with Q(W * s) / s. Groups are independent: each is measured on the unchanged float program, from
    the values its sub-block reads (kept per feed from one run of the graph)."""
    gm = program.gm
    runner = GraphRunner(gm)
    spans, reads = [], []
    for _, lins, _, _ in todo:
        start, stop = min(runner.position[n.name] for n in lins), runner.position[_inspect_end(program, lins).name]
        inside = set(runner.nodes[start:stop + 1])
        spans.append((start, stop))
        reads.append({a for n in inside for a in n.all_input_nodes if a not in inside})
    inputs = [[] for _ in todo]
    for feed in track(feeds, f"smoothing: awq inputs of {len(todo)} groups"):
        snapshots = runner.run(feed_args(program, feed), snapshot_at={start for start, _ in spans}).snapshots
        for g, (start, _) in enumerate(spans):
            inputs[g].append({a: snapshots[start][a] for a in reads[g]})
        del snapshots
    out = []
    for g, (x, lins, fold, note) in enumerate(track(todo, "smoothing: awq search")):
        start, stop = spans[g]
        end = runner.nodes[stop]
        refs = [run_range(runner, env, start, stop)[end] for env in inputs[g]]
        quantized = [n for n in lins if n.args[1].target in layers]
        best = (math.inf, 0.0, None)
        for a in [i / AWQ_GRID for i in range(AWQ_GRID)]:
            s = awq_scale(stats[x.name].abs_mean, a, fold[-1])
            full = s if fold[-1] is None else s[fold[-1]]
            overrides = {n: _with_weight(n, _dequantized_scaled(gm, n, full, target)) for n in quantized}
            err = sum(float(((run_range(runner, env, start, stop, overrides)[end] - ref) ** 2).sum())
                      for env, ref in zip(inputs[g], refs))
            if err < best[0]:
                best = (err, a, s)
        inputs[g] = None
        note["ratio"] = best[1]
        out.append(best[2])
    return out


def _dequantized_scaled(gm, n: fx.Node, full: torch.Tensor, target: Target) -> torch.Tensor:
    w = _attr(gm, n.args[1].target).detach()
    group = int4_group(w.shape[1], target.group) if target.grid.kind == "int4" else w.shape[1]
    return rtn(w * full[None, :], target.grid, group).dequantize() / full[None, :]


def _with_weight(n: fx.Node, w: torch.Tensor):
    """A run_range override: linear node n computed with weight w."""
    x, b = n.args[0], linear_bias(n)
    return lambda get: torch.nn.functional.linear(get(x), w, get(b) if isinstance(b, fx.Node) else b)


def _inspect_end(program: Program, lins: list[fx.Node]) -> fx.Node:
    names, nodes = {n.name for n in lins}, {n.name: n for n in program.gm.graph.nodes}
    for b in program.info.blocks if program.info else []:
        a, m = b.attention, b.mlp
        if a and a.o and names & {l.node for l in (a.q, a.k, a.v, a.qkv) if l}:
            return nodes[a.o.node]
        if m and names & {l.node for l in (m.gate, m.up, m.gate_up) if l}:
            return nodes[m.down.node]
    return lins[-1]


def input_groups(gm, layers: dict) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(x, every linear reading x) for each input of a quantized, untied linear; graph order."""
    seen, out = set(), []
    for layer in layers.values():
        if layer.tied:
            continue
        for n in layer.nodes:
            x = n.args[0]
            if x in seen:
                continue
            seen.add(x)
            out.append((x, [u for u in x.users if u.target in DENSE and u.args[0] is x]))
    return out


def _find_fold(program: Program, x: fx.Node, lins: list[fx.Node]):
    """("norm", w, b, None) | ("rows", prev linear, rows, expand) | ("mul", None), or the reason (str)
    why x / s cannot go anywhere exact."""
    gm = program.gm
    for n in lins:
        w = n.args[1]
        if not isinstance(w, fx.Node) or w.op != "get_attr" or _readers(gm, w.target) != {n}:
            return f"the weight of {n.name} is shared or computed"
    users = readers(x)
    if all(u in lins for u in users):
        src = x
        while op_name(src) in IDENTITY and len(readers(src.args[0])) == 1:
            src = src.args[0]
        affine = _norm_affine(program, src)
        k = _attr(gm, lins[0].args[1].target).shape[1]
        if affine is not None and all(p is None or _attr(gm, p.target).shape == (k,) for p in affine):
            return ("norm", *affine, None)
    if len(lins) == 1:
        prev = _prev_rows(program, lins[0])
        if prev is not None:
            node, rows = prev
            uniq, expand = torch.unique(rows, return_inverse=True)
            return ("rows", node, uniq, expand)
    return ("mul", None)


def _apply_fold(gm, fold, s: torch.Tensor, full: torch.Tensor, x: fx.Node, lins: list[fx.Node]) -> str:
    kind = fold[0]
    with torch.no_grad():
        if kind == "norm":
            _, w, b, _ = fold
            for p in (w, b):
                if p is not None:
                    _attr(gm, p.target).div_(s)
            return f"norm weight {w.target}" + (f" and bias {b.target}" if b is not None else "")
        if kind == "rows":
            _, prev, rows, _ = fold
            w = _attr(gm, prev.args[1].target)
            divided = w.clone()
            divided[rows] /= s[:, None]
            _hold(w, divided)
            b = linear_bias(prev)
            if isinstance(b, fx.Node):
                _attr(gm, b.target)[rows] /= s
            return f"rows of {module_path(prev) or prev.name}"
    # an explicit x * (1/s) before the group
    first = min(lins, key=lambda n: list(gm.graph.nodes).index(n))
    inv = new_attribute(gm, "input_smooth", (1.0 / full).to(torch.float32), first,
                        owner=lins[0].args[1].target.rpartition(".")[0])
    with gm.graph.inserting_before(first):
        mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    set_val(gm, mul)
    for n in lins:
        n.replace_input_with(x, mul)
    return f"explicit mul ({inv.target})"


def _readers(gm, target: str) -> set[fx.Node]:
    return {u for n in gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users}


def _param(gm, a) -> fx.Node | None:
    """a, when it is a get_attr of a 1-D tensor read by nothing but one node."""
    ok = isinstance(a, fx.Node) and a.op == "get_attr" and _attr(gm, a.target).dim() == 1
    return a if ok and len(_readers(gm, a.target)) == 1 else None


def _norm_affine(program: Program, src: fx.Node):
    """(weight, bias or None) get_attr nodes of the affine end of the norm producing src, else None:
    aten.layer_norm / rms_norm, or decomposed y * w [+ b] with y a normalised value."""
    gm = program.gm
    if src.target in (aten.layer_norm.default, aten.rms_norm.default):
        a = list(src.args) + [None] * 4
        w, b = _param(gm, a[2]), (_param(gm, a[3]) if src.target is aten.layer_norm.default else None)
        has_bias = src.target is aten.layer_norm.default and a[3] is not None
        return (w, b) if w is not None and (b is not None or not has_bias) else None
    if op_name(src) not in ("aten.mul", "aten.add") or len(src.args) != 2:
        return None
    bias, m = None, src
    if op_name(m) == "aten.add":
        bias = next((a for a in m.args if _param(gm, a) is not None), None)
        m = next((a for a in m.args if a is not bias), None)
        if bias is None or op_name(m) != "aten.mul" or len(m.args) != 2 or len(readers(m)) != 1:
            return None
    w = next((a for a in m.args if _param(gm, a) is not None), None)
    y = next((a for a in m.args if a is not w), None)
    if w is None or not isinstance(y, fx.Node):
        return None
    known = {nm.node for nm in _norms(program.info)}
    return (w, bias) if src.name in known or _normalised(y) else None


def _norms(info) -> list:
    if info is None:
        return []
    out = [info.final_norm]
    for b in info.blocks:
        out += [b.attention.norm, b.attention.out_norm] if b.attention else []
        out += [b.mlp.norm, b.mlp.out_norm] if b.mlp else []
    return [n for n in out if n is not None]


def _normalised(y: fx.Node, depth: int = 4) -> bool:
    """y = v * rsqrt(...) or v / sqrt(...), maybe through casts."""
    for _ in range(depth):
        if op_name(y) in ("aten.mul", "aten.div"):
            return any(isinstance(a, fx.Node) and op_name(a) in ("aten.rsqrt", "aten.sqrt") for a in y.args)
        if op_name(y) not in IDENTITY:
            return False
        y = y.args[0]
    return False


def _ranges(r) -> list[int]:
    return [f for lo, hi in r for f in range(lo, hi)]


def _prev_rows(program: Program, lin: fx.Node):
    """(previous linear, its output row for each input feature of lin) for attention v -> o and a
    gated MLP's up -> down, from ModelInfo; None otherwise."""
    info, nodes = program.info, {n.name: n for n in program.gm.graph.nodes}
    for b in info.blocks if info else []:
        a, m = b.attention, b.mlp
        if a and a.o and a.o.node == lin.name and a.o_heads and a.v_heads and len(a.o_heads) % len(a.v_heads) == 0:
            src = a.v or a.qkv
            per = len(a.o_heads) // len(a.v_heads)
            rows = torch.full((a.o.in_features,), -1, dtype=torch.long)
            for h, ranges in enumerate(a.o_heads):
                of, vf = _ranges(ranges), _ranges(a.v_heads[h // per])
                if len(of) != len(vf):
                    return None
                rows[of] = torch.tensor(vf)
            return (nodes[src.node], rows) if bool((rows >= 0).all()) and _plain(nodes[src.node]) else None
        if m and m.down.node == lin.name and m.act:
            if m.up and m.gate and m.up.out_features == m.down.in_features:
                return (nodes[m.up.node], torch.arange(m.down.in_features)) if _plain(nodes[m.up.node]) else None
            if m.gate_up and m.gate_up_slices.get("up"):
                rows = torch.tensor(_ranges(m.gate_up_slices["up"]))
                ok = len(rows) == m.down.in_features and _plain(nodes[m.gate_up.node])
                return (nodes[m.gate_up.node], rows) if ok else None
    return None


def _plain(n: fx.Node) -> bool:
    """A float linear whose get_attr weight (and bias) only it reads."""
    w, b = n.args[1], linear_bias(n)
    return (n.target in DENSE and isinstance(w, fx.Node) and w.op == "get_attr"
            and len(_readers(n.graph.owning_module, w.target)) == 1
            and (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")))


def _check_exact(program: Program, feed: dict, reference: list) -> None:
    """Smoothing must not change the float program (beyond rounding)."""
    after = program(feed)
    for spec, ref in zip(program.outputs, reference):
        ref = ref.detach().numpy()
        rel = float(abs(after[spec.name] - ref).max()) / max(float(abs(ref).max()), 1e-12)
        if rel > 1e-3:
            raise InternalError(f"smoothing: folding the smoothing scales changed output '{spec.name}' by {rel:.2e}")

