"""`quantize`: int8 / int4 weights, int8 activations and int8 embedding tables.

Contract. Every `aten.linear` / `tcc::dense` node whose weight is a float 2-D `get_attr` tensor with
at least `min_size` elements, whose module path matches no `skip` glob (globs as in
quantize-weights: a module path or any dotted suffix of it) and whose weight nothing else reads,
becomes one of (tcc/ir/ops.py defines the numerics; tcc/compress/quantization.py the codes and scales):

    weights=int8, acts=none   tcc::dense_w8(x, q int8 [N,K], scale [N], b)        per output channel
    weights=int4, acts=none   tcc::dense_w4(x, q uint8 [N,K/2], scale f16 [N,K/g], zero uint8 [N,K/g] | None, g, b)
    weights=int4, acts=int8   tcc::dense_w4(..., g, b, "int8"): W4A8, each block of g input features of a
                              row of x quantized to int8 at run time (symmetric, one scale per block, as
                              llama.cpp's Q8_0 activations for Q4_0/Q4_1); `sym` applies to the weights
                              only; dynamic only. The integer kernel runs decode (M <= 32), prefill
                              multiplies the same quantized activations in fp32 (docs/BENCHMARKS.md
                              "Decode vs the bandwidth limit (issue 15)")
    weights=int8, acts=int8   tcc::dense_a8w8(x, q, w_scale, b, x_scale, x_zero, asym)
                              act_scheme=dynamic: x_scale None, per token in the op; static: x_scale
                              (and x_zero when sym=false) f32 [1] from the `percentile` of the
                              calibration values of x (100 = their max)

with buffers next to the old weight (`<w>_int8` / `<w>_int4`, `<w>_scale`, `<w>_zero`,
`<w>_act_scale`, `<w>_act_zero`); the float weight is deleted. `group` is the int4 group (input
features per scale, even; 0 = one group per row); int8 weights are always per row. A layer whose K the
group does not divide uses the largest even divisor of K below the group instead (SmolLM2's K=576
with group=128: 96; its K=1536 keeps 128), noted per layer ("group") and summarised in the record's
`group_fallback` and the log ("group 128 does not divide K=576 for 180 layers: used 96"); a layer
with an odd K has no even divisor and is an error (skip it). int4 scales are float16 (see
tcc/compress/quantization.py; every method fits its codes to the rounded scale). `sym`
picks symmetric int4 weights (zero 8) or asymmetric ones (zero codes), and symmetric or asymmetric
int8 activations; int8 weights are always symmetric. `zero=float` (int4, sym=false): fractional
float32 zero points, the grid min + scale * code of each group as llama.cpp's Q4_1 stores it (with
group=32 and method=rtn a Q4_1 checkpoint's dequantized weights come back exactly); not with sparse
weights (0.0 is not a level of such a grid).

embeddings=true: every `aten.embedding` table (>= min_size, not skipped) becomes int8 per row,
`tcc::embedding_w8(ids, q, scale)`, and a linear reading the same table (a tied lm_head) reads
those very buffers through dense_w8 (dense_a8w8 with acts=int8), whatever `weights` says, so the
bytes are not stored twice. Without it a tied lm_head stays fp32 (skipped: its weight is also read
by the embedding).

Methods (`method`):
  rtn          round to nearest.
  gptq         GPTQ per layer (tcc.compress.quantization.gptq), block by block: the Hessians of block i's
               linears come from the inputs the program computes with blocks < i already quantized
               (the model runs about twice per feed); `damp`; act_order=true (default) quantizes
               columns by decreasing Hessian diagonal with every group's scale fitted up front (on
               SmolLM2 int4 g64: +6.8% perplexity vs +17% in the paper's column order, where groups
               are fitted as they come: act_order=false).
  awq          per input group (linears reading the same value x): grid search of s = mean|x|^a
               (a = 0, 0.05 .. 0.95) minimising, on the first 8 calibration feeds, the squared error
               of the output of the sub-block the group feeds (the attention's output projection for
               q/k/v, the MLP's down projection for gate/up, else the group's own outputs) when the
               group's weights are W * s quantized, over inputs x / s; then (int4) AWQ's clipping
               search per row and group (bounds max|w| * 1, 0.95 .. 0.55, least d^T H_g d with H_g the
               group's block of the input Hessian); x / s is folded, exactly, into (1) the preceding norm's
               weight (and bias) when x is that norm's output and only these linears read it, else
               (2) the rows of the previous linear for attention v -> o (query heads sharing a KV
               head share one s) and gated MLP up -> down, else (3) an explicit `mul(x, 1/s)`.
  smoothquant  W8A8 only: s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (max over the group's linears),
               folded as (1) or (2) above ((2) goes beyond the paper: exact, and free for int8 rows);
               a group with neither stays unsmoothed (noted with the reason). alpha=auto (default)
               picks one alpha for the model from 0.3, 0.4 .. 0.8: the one whose output, with every
               candidate linear emulated as quantized (smoothed W8A8 rtn, activations per token
               whatever act_scheme; embedding tables float), moves least from the float program's on
               the first 8 calibration feeds: mean KL of the next-token distributions for causal
               LMs, 1 - cosine of the pooled output for encoders (tcc.compress.calibration.CalibrationLoss).
               The record's `alpha_search` holds each alpha's score, its calibration loss, and the
               float program's loss.
  A tied lm_head is never smoothed (its weight is the embedding table).

Sparse weights (annotated by `sparsify`, see tcc/compress/sparsity.py) stay sparse: every format stores a
zero weight as the code of exactly 0.0 (int8: 0; int4 sym: 8; int4 asym: the zero point, an integer
code since lo <= 0 <= hi); gptq keeps the weight's zeros at that code and spreads their whole value
as error to the columns not yet quantized instead of filling them in; awq and smoothquant only scale
columns and rows, which keeps zeros. The annotation moves to the codes (`<w>_int8` / `<w>_int4`)
with format, scale, zero and group (a layer mixed precision keeps in fp32 keeps it on the weight).

Calibration: ctx.calibration (the first `samples` feeds) when given, else `samples` windows of
the default text (tcc.compress.calibration.text_feeds). Needed by gptq, awq, smoothquant, static
activations and mixed precision; plain rtn with dynamic activations needs none.

Mixed precision: keep=N keeps the N layers whose quantization alone raises the calibration loss
most (measured on up to 4 feeds, every layer quantized in its base format in turn, the rest
float) at higher precision: int8 instead of int4, fp32 instead of int8 / W8A8. avg_bits=B instead
promotes layers in that order as long as the average storage bits per weight (scales and zeros
included) of the candidate linears stays <= B. Tied lm_heads are no candidates.

Checks (UserError, naming the option): weights=int4 with acts=int8 and act_scheme=static;
method=smoothquant without acts=int8 or with int4; method=awq with weights=int8,acts=int8; sym=false with int8 weight-only; an odd int4 group; int4 for
a layer with an odd K (the layer is named); keep with avg_bits; keep above the number of
layers; an avg_bits below what the base format needs; calibration text too short (text_feeds).
After rewriting: every quantized op's buffers have the dtypes and shapes the op needs, no
candidate linear is left in float unless mixed precision kept it there, and every annotated sparse
tensor still holds its pattern.

Notes: options, calibration feeds, per layer and table {weight, modules, shape, format,
bytes_before, bytes_after[, group, error, rtn_error, shares]} (error = ||(W-Q)X|| / ||WX|| on the
calibration tokens, with gptq), group fallbacks, skipped layers with the reason, smoothing per group
{linears, fold, ratio, clip | alpha}, the alpha search, mixed-precision sensitivities and choices,
removed attributes.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from tcc.compress import sparsity
from tcc.compress.calibration import CalibrationLoss, GraphRunner, text_feeds
from tcc.errors import InternalError, UserError
from tcc.pipeline import Option, Pass, PassContext, estimate_flops, register, set_val
from tcc.ir.program import Program, attribute as _attr
from tcc.progress import track
from tcc.ir.ops import quantize_rows
from tcc.compress.quantization import (Grid, InputStats, QWeight, awq_clip, awq_scale, bits_per_weight, blockwise, collect,
                              collect_stats, feed_args, glob_matches, gptq, int4_group, module_path, output_error, rtn, run_range,
                              smoothquant_scales, static_scale)
from tcc.memory import page_out
from tcc.ir.structure import IDENTITY, op_name

from tcc.ir.graph import free_name as _free_name, register_tensors as _register, remove_dead, replace_node as _replace

aten, tcc_ops = torch.ops.aten, torch.ops.tcc
# tcc::dense_bf16 / embedding_bf16: a bf16 checkpoint's own tensors (tcc.frontends.frontend), read widened to float32
DENSE = (aten.linear.default, tcc_ops.dense.default, tcc_ops.dense_bf16.default)
EMBEDDING = aten.embedding.default
TABLES = {EMBEDDING: (0, 1), tcc_ops.embedding_bf16.default: (1, 0)}  # embedding op -> (table, ids) positions
ASSERT = aten._assert_tensor_metadata.default
OPS = {"w8": tcc_ops.dense_w8.default, "w4": tcc_ops.dense_w4.default, "a8w8": tcc_ops.dense_a8w8.default}
HIGHER = {"w4": "w8", "w8": "fp32", "a8w8": "fp32"}
AWQ_FEEDS, AWQ_GRID = 8, 20
ALPHA_FEEDS, ALPHA_GRID = 8, (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SENSITIVITY_FEEDS = 4


def _alpha_problem(v: str) -> str | None:
    if v == "auto":
        return None
    try:
        ok = 0 <= float(v) <= 1
    except ValueError:
        ok = False
    return None if ok else f"must be auto or a number in [0, 1], got {v}"


@register
class Quantize(Pass):
    """int8/int4 weights (rtn, gptq, awq), W8A8 (rtn, gptq, smoothquant), int8 embeddings, mixed precision."""

    name = "quantize"
    kind = "transform"
    writes_weights = True  # in place (Pipeline.run; Program.clone)

    @property
    def reads_bf16_weights(self) -> bool:
        """bf16 weights are read widened to float32, one layer at a time; smoothquant's scales are powers
        of two where they scale a bf16 weight (_exact_scales). AWQ's clipping would round: float32 load."""
        return self.method != "awq"
    options = {
        "weights": Option(str, "int8", "weight format", choices=("int8", "int4")),
        "group": Option(int, 128, "int4: input features per scale (even; a K it does not divide uses the largest even "
                        "divisor below it); 0 = one group per row",
                        validator=lambda v: None if v >= 0 else "must be >= 0"),
        "acts": Option(str, "none", "activation format", choices=("none", "int8")),
        "act_scheme": Option(str, "dynamic", "int8 activations: per token at run time, or per tensor from calibration",
                             choices=("dynamic", "static")),
        "percentile": Option(float, 100.0, "static activations: clip at this percentile of |x| (100 = max)",
                             validator=lambda v: None if 0 < v <= 100 else "must be in (0, 100]"),
        "sym": Option(bool, True, "symmetric int4 weights / int8 activations (false: zero points)"),
        "zero": Option(str, "int", "int4 zero points with sym=false: int (codes 0..15) or float (fractional, "
                       "float32: each group's grid starts at its minimum, as llama.cpp's Q4_1)", choices=("int", "float")),
        "method": Option(str, "rtn", "how weights are quantized", choices=("rtn", "gptq", "awq", "smoothquant")),
        "alpha": Option(str, "auto", "SmoothQuant migration strength in [0, 1], or auto: the one of 0.3 .. 0.8 "
                        "that moves the calibration output least", validator=lambda v: _alpha_problem(v)),
        "damp": Option(float, 0.01, "GPTQ damping, a fraction of the mean Hessian diagonal",
                       validator=lambda v: None if v > 0 else "must be > 0"),
        "act_order": Option(bool, True, "GPTQ: columns by decreasing Hessian diagonal, groups fitted up front "
                            "(false: the paper's order, groups fitted as they come)"),
        "samples": Option(int, 16, "calibration windows", validator=lambda v: None if v >= 1 else "must be >= 1"),
        "min_size": Option(int, 4096, "quantize weights with at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs to keep in float, e.g. [lm_head,*.classifier]"),
        "embeddings": Option(bool, False, "int8 embedding tables (a tied lm_head shares the int8 table)"),
        "keep": Option(int, 0, "keep the N most sensitive layers at higher precision",
                       validator=lambda v: None if v >= 0 else "must be >= 0"),
        "avg_bits": Option(float, 0.0, "average bits per weight for mixed precision (0 = off)",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
    }
    renamed = {"budget": "avg_bits"}  # its name until issue 16 (budget = the accuracy budget only)

    def __init__(self, **opts):
        super().__init__(**opts)
        self._check_combination()
        self._kept_float: set[str] = set()

    def _check_combination(self) -> None:
        bad = lambda option, msg, hint: UserError(f"pass 'quantize' option '{option}': {msg}", hint)
        if self.weights == "int4" and self.acts == "int8" and self.act_scheme == "static":
            raise bad("act_scheme", "int4 weights with acts=int8 quantize the activations per block of `group` at "
                      "run time (W4A8, dynamic)", "drop act_scheme=static, or use weights=int8 for static activations")
        if self.method == "smoothquant" and self.weights == "int4":
            raise bad("method", "smoothquant is for W8A8 (weights=int8,acts=int8)", "use method=awq or gptq for int4")
        if self.method == "smoothquant" and self.acts != "int8":
            raise bad("method", "smoothquant needs acts=int8 (it moves activation outliers into the weights)",
                      "add acts=int8, or use method=awq for weight-only int4")
        if self.method == "awq" and self.acts == "int8" and self.weights == "int8":
            raise bad("method", "awq is weight-only", "use method=smoothquant (or rtn, gptq) with acts=int8")
        if not self.sym and self.weights == "int8" and self.acts == "none":
            raise bad("sym", "int8 weights are always symmetric; sym=false applies to int4 weights or int8 activations",
                      "drop sym=false, or use weights=int4 / acts=int8")
        if self.zero == "float" and (self.weights != "int4" or self.sym):
            raise bad("zero", "zero=float is for asymmetric int4 weights", "add weights=int4,sym=false, or drop zero=float")
        if self.group and self.group % 2:
            raise bad("group", f"group={self.group} is odd; two int4 codes share a byte", "use an even group, e.g. 128")
        if self.keep and self.avg_bits:
            raise bad("keep", "give keep or avg_bits, not both", "keep=N layers, or avg_bits=bits per weight")

    @property
    def auto_alpha(self) -> bool:
        return self.alpha == "auto"

    @property
    def base_format(self) -> str:
        return "w4" if self.weights == "int4" else ("a8w8" if self.acts == "int8" else "w8")

    def run(self, program: Program, ctx: PassContext) -> Program:
        gm = program.gm
        plan = match(program, self)
        fallback = group_fallback(plan, self.group)
        for line in fallback:
            ctx.logger.warning("quantize: %s", line)
        feeds = self._feeds(program, ctx) if plan.layers and self._calibrates() else []
        smoothing, alpha_search = [], None
        if feeds and self.method in ("awq", "smoothquant"):
            smoothing, alpha_search = smooth(program, plan, feeds, self)
        if self.method == "gptq":
            stats = gptq_blocks(program, plan, feeds, self)
        else:
            stats = calibrate(program, plan, feeds, self) if feeds and self._static() else {}
            for layer in plan.layers.values():
                quantize_layer(gm, layer, stats, self)
        mixed = None
        if plan.layers and (self.keep or self.avg_bits):
            mixed = choose_precision(program, plan, feeds, stats, self)
        self._kept_float = {l.weight for l in plan.layers.values() if l.format == "fp32"}
        quantized = rewrite(gm, plan, self)
        carry_sparsity(program, plan)
        removed = remove_dead(gm)[1] if quantized or plan.tables else []
        gm.recompile()
        ctx.note(options=dict(self.opts), calibration={"feeds": len(feeds)}, quantized=quantized,
                 group_fallback=fallback, skipped=plan.skipped, smoothing=smoothing, alpha_search=alpha_search,
                 mixed=mixed, removed_attributes=removed)
        if quantized or plan.tables:
            ctx.refresh_info(program)
        return program

    def ensures(self, program: Program) -> None:
        verify(program.gm)
        broken = sparsity.violations(program)
        if broken:
            raise InternalError(f"quantize broke the sparsity of {broken}")
        left = [t for t in match(program, self, check_groups=False).layers if t not in self._kept_float]
        if left:
            raise InternalError(f"quantize left float weights it should have quantized: {sorted(left)}")

    def _calibrates(self) -> bool:
        return self.method != "rtn" or self._static() or bool(self.keep or self.avg_bits)

    def _static(self) -> bool:
        return self.acts == "int8" and self.act_scheme == "static"

    def _feeds(self, program: Program, ctx: PassContext) -> list[dict]:
        if ctx.calibration:
            return ctx.calibration[: self.samples]
        return text_feeds(program, n_samples=self.samples)


# -- match --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Layer:
    weight: str  # get_attr target of the float weight
    nodes: list[fx.Node]  # the linear nodes reading it (usually one)
    shape: tuple[int, int]  # [N, K]
    format: str  # "w8" | "w4" | "a8w8" | "fp32"
    tied: str | None = None  # the embedding table whose int8 buffers it reads
    group: int = 0  # int4: the input features per scale this layer uses (int4_group)
    q: QWeight | None = None
    act: dict = dataclasses.field(default_factory=dict)  # node name -> (x_scale, x_zero) when static
    info: dict = dataclasses.field(default_factory=dict)
    sparsity: dict | None = None  # the weight's sparsity annotation (tcc.compress.sparsity), carried to its codes
    stored: dict = dataclasses.field(default_factory=dict)  # suffix ("int8", "scale", ...) -> new buffer target

    @property
    def modules(self) -> list[str]:
        return sorted({module_path(n) for n in self.nodes})


@dataclasses.dataclass
class Plan:
    layers: dict[str, Layer]  # by weight target, in graph order
    tables: dict[str, list[fx.Node]]  # embedding table target -> embedding nodes
    skipped: list[dict]


def match(program: Program, opts: Quantize, check_groups: bool = True) -> Plan:
    gm = program.gm
    candidates: dict[str, list[fx.Node]] = {}
    tables: dict[str, list[fx.Node]] = {}
    skipped: list[dict] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in DENSE + tuple(TABLES):
            continue
        is_table = n.target in TABLES
        if is_table and not opts.embeddings:
            continue
        w = n.args[TABLES[n.target][0]] if is_table else (n.args[1] if len(n.args) > 1 else None)
        path = module_path(n)
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            skipped.append({"module": path, "node": n.name, "reason": "weight is computed, not a stored tensor"})
            continue
        t = _attr(gm, w.target)
        reason = None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            reason = "weight is not a 2-D float tensor"
        elif t.numel() < opts.min_size:
            reason = f"{t.numel()} weights < min_size={opts.min_size}"
        elif any(glob_matches(g, path) for g in opts.skip):
            reason = "matches skip"
        if reason:
            skipped.append({"module": path, "node": n.name, "reason": reason})
        else:
            (tables if is_table else candidates).setdefault(w.target, []).append(n)

    readers: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, set()).update(n.users)
    layers = {}
    for target, nodes in candidates.items():
        others = [u for u in readers[target] if u not in nodes]
        shape = tuple(_attr(gm, target).shape)
        if others and target in tables and all(u in tables[target] for u in others):
            layers[target] = Layer(target, nodes, shape, "a8w8" if opts.acts == "int8" else "w8", tied=target)
        elif others:
            reason = f"weight '{target}' is also read by {sorted(u.name for u in others)}"
            skipped += [{"module": module_path(n), "node": n.name, "reason": reason} for n in nodes]
        else:
            layer = layers[target] = Layer(target, nodes, shape, opts.base_format,
                                           sparsity=sparsity.annotation(program, target))
            if opts.base_format == "w4":
                layer.group = int4_group(shape[1], opts.group) or 0
                if check_groups and not layer.group:
                    raise UserError(f"pass 'quantize' option 'weights': layer {layer.modules[0] or target} cannot be "
                                    f"quantized to int4: its {shape[1]} input features are odd (two int4 codes "
                                    "share a byte, so a group must be even)",
                                    f"skip=[{layer.modules[0] or target}] the layer, or use weights=int8")
    return Plan(layers, tables, skipped)


def group_fallback(plan: Plan, group: int) -> list[str]:
    """One line per (K, group used) where int4 layers could not use the requested group."""
    counts: dict[tuple[int, int], int] = {}
    for l in plan.layers.values():
        if l.format == "w4" and l.group != (group or l.shape[1]):
            counts[(l.shape[1], l.group)] = counts.get((l.shape[1], l.group), 0) + 1
    return [f"group {group} does not divide K={k} for {n} layer{'s' * (n > 1)}: used {g}"
            for (k, g), n in sorted(counts.items())]


# -- calibrate -----------------------------------------------------------------------------------------

def _x(n: fx.Node) -> fx.Node:
    return n.args[0]


def _bias(n: fx.Node):
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias", n.kwargs.get("b"))


def calibrate(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> dict[str, InputStats]:
    """Statistics of every quantized linear's input (the |x| percentile for static activations)."""
    stats = _input_stats(plan.layers.values(), len(feeds), opts)
    collect_stats(program, feeds, stats, "quantize: calibrating")
    return stats


def _input_stats(layers, n_feeds: int, opts: Quantize) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}
    for layer in layers:
        for n in layer.nodes:
            if _x(n).name not in stats:
                static = opts._static() and layer.format == "a8w8"
                stats[_x(n).name] = InputStats(layer.shape[1], hessian=opts.method == "gptq",
                                               percentile=opts.percentile if static else None,
                                               signed=not opts.sym, feeds=n_feeds)
    return stats


def gptq_blocks(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> dict[str, InputStats]:
    """GPTQ block by block (tcc.compress.quantization.blockwise): the Hessians of block i's linears come from the
    inputs the program computes with blocks 0..i-1 already quantized. Returns the stats (Hessians kept
    only when mixed precision will re-quantize)."""
    kept: dict[str, InputStats] = {}

    def process(here, stats):
        for l in here:
            quantize_layer(program.gm, l, stats, opts)
        if opts.keep or opts.avg_bits:
            kept.update(stats)
        return {n: _emulate(l, n, not opts.sym) for l in here if l.q is not None for n in l.nodes}

    blockwise(program, list(plan.layers.values()), feeds, lambda here: _input_stats(here, len(feeds), opts),
              process, "quantize: gptq inputs")
    return kept


# -- smooth (awq, smoothquant) ------------------------------------------------------------------------

def smooth(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> list[dict]:
    """Scale each input group's weights by s and fold x / s into the graph (exact in fp32)."""
    gm = program.gm
    width = lambda lins: _attr(gm, lins[0].args[1].target).shape[1]
    groups = _input_groups(gm, plan)
    clip = opts.method == "awq" and opts.weights == "int4"
    stats = {x.name: InputStats(width(lins), blocks=int4_group(width(lins), opts.group) if clip else 0)
             for x, lins in groups}
    reference = collect(program, feeds, stats, f"quantize: calibrating {opts.method}")[0]
    notes, todo = [], []
    for x, lins in groups:
        note = {"linears": [module_path(n) or n.name for n in lins]}
        notes.append(note)
        fold = _find_fold(program, x, lins, plan)
        if isinstance(fold, str):
            note["fold"] = "none: " + fold
        elif fold[0] == "mul" and opts.method == "smoothquant":
            note["fold"] = "none: the input is no norm's own output and no v->o / up->down projection"
        elif not any(n.args[1].target in plan.layers for n in lins):
            note["fold"] = "none: no quantized linear reads it"
        else:
            todo.append((x, lins, fold, note))
    search = None
    if opts.method == "awq":
        scales = awq_scales(program, plan, todo, stats, feeds[:AWQ_FEEDS], opts)
    else:
        alpha = None if opts.auto_alpha else float(opts.alpha)
        if alpha is None and todo:  # nothing to smooth: no alpha to choose
            search = search_alpha(program, plan, todo, stats, _search_feeds(program, feeds, ALPHA_FEEDS,
                                                                            1 + len(ALPHA_GRID)), opts)
            alpha = search["chosen"]
        scales = _smoothquant_scales(gm, todo, stats, alpha)
    applied = {}  # x name -> the per-feature s its linears' weights were multiplied by
    for (x, lins, fold, note), s in zip(todo, scales):
        if opts.method == "smoothquant":
            note["alpha"] = alpha
        elif note["ratio"] == 0:
            note["fold"] = "none: the search kept s = 1"
            continue
        full = s if fold[-1] is None else s[fold[-1]]
        with torch.no_grad():
            for n in lins:
                _attr(gm, n.args[1].target).mul_(full[None, :])
        note["fold"] = _apply_fold(gm, fold, s, full, x, lins)
        applied[x.name] = full
    gm.recompile()
    _check_exact(program, feeds[0], reference)
    if clip:
        _clip(gm, plan, groups, stats, applied, notes, opts)
    return notes, search


def _smoothquant_scales(gm, todo: list, stats: dict, alpha: float) -> list[torch.Tensor]:
    return [_exact_scales(gm, lins, smoothquant_scales(stats[x.name].abs_max, [_attr(gm, n.args[1].target) for n in lins],
                                                       alpha, fold[-1]))
            for x, lins, fold, _ in todo]


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


def search_alpha(program: Program, plan: Plan, todo: list, stats: dict, feeds: list[dict], opts: Quantize) -> dict:
    """SmoothQuant's alpha for the whole model: for each alpha in ALPHA_GRID, run `feeds` through the
    program with every quantized linear emulated as smoothed W8A8 (x / s fake-quantized per token,
    times Q(W * s) with Q int8 per row; float32 products, which differ from the op's exact integer
    sums only by rounding; the float program is not changed) and score it by how far its output
    moves from the float program's: causal LMs the mean KL(float || quantized) of the next-token
    distributions (less noisy than the cross-entropy against the text, also recorded as "loss"),
    encoders the calibration loss (1 - cosine to the float program). Returns {chosen, losses, float}."""
    gm = program.gm
    runner = GraphRunner(gm)
    objective = CalibrationLoss(program, feeds)
    args = [feed_args(program, f) for f in feeds]
    base, reference = [], []
    for i, a in enumerate(args):
        out = runner.run(a).outputs
        base.append(objective.terms(i, out))
        if objective.causal:
            reference.append(_log_probs(program, out))
    smoothed = {x.name: (fold[-1], i) for i, (x, _, fold, _) in enumerate(todo)}
    asym = not opts.sym
    losses = []
    for alpha in track(ALPHA_GRID, f"quantize: smoothquant alpha on {len(feeds)} feeds"):
        scales = _smoothquant_scales(gm, todo, stats, alpha)
        patches = {}
        for layer in plan.layers.values():
            w = _attr(gm, layer.tied or layer.weight).detach().to(torch.float32)
            for n in layer.nodes:
                x, b = _x(n), _bias(n)
                s = None
                if x.name in smoothed and not layer.tied:
                    expand, i = smoothed[x.name]
                    s = scales[i] if expand is None else scales[i][expand]
                wq = rtn(w if s is None else w * s[None, :], Grid("int8"), w.shape[1])  # codes: 1/4 the float bytes
                patches[n.name] = (_fake_a8w8(x.name, wq, s, b.name if isinstance(b, fx.Node) else b, asym), _needs(n))
        terms, kl = [], []
        for i, a in enumerate(args):
            out = runner.run(a, patches=patches).outputs
            terms.append(objective.terms(i, out))
            if objective.causal:
                p = reference[i]
                kl.append((float((p.exp() * (p - _log_probs(program, out))).sum()), p.shape[0]))
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


def _fake_a8w8(x: str, wq: QWeight, s: torch.Tensor | None, b, asym: bool):
    """A GraphRunner patch: linear(fake-quantized x / s, wq dequantized) + b."""
    def fn(v, get):
        xv = get(x).to(torch.float32)
        xv = xv if s is None else xv / s
        q, scale, zero = quantize_rows(xv.reshape(-1, xv.shape[-1]), None, None, asym)
        y = torch.nn.functional.linear(((q - zero) * scale).reshape(xv.shape), wq.dequantize())
        return y + get(b) if isinstance(b, str) else (y + b if b is not None else y)
    return fn


def _clip(gm, plan: Plan, groups: list, stats: dict, applied: dict, notes: list[dict], opts: Quantize) -> None:
    """AWQ's clipping of every quantized int4 weight, against its (smoothed: x / s) input."""
    grid = Grid("int4", opts.sym, opts.zero == "float")
    for (x, lins), note in zip(groups, notes):
        h = stats[x.name].H_blocks
        k = h.shape[0] * h.shape[1]
        if x.name in applied:
            full = applied[x.name].reshape(h.shape[0], -1).to(torch.float64)
            h = h / (full[:, :, None] * full[:, None, :])
        ratios = []
        for n in lins:
            if n.args[1].target in plan.layers:
                w = _attr(gm, n.args[1].target)
                clipped, ratio = awq_clip(w, h, grid, int4_group(k, opts.group))
                with torch.no_grad():
                    w.copy_(clipped)
                ratios.append(ratio)
        note["clip"] = round(sum(ratios) / len(ratios), 4) if ratios else None


def awq_scales(program: Program, plan: Plan, todo: list, stats: dict, feeds: list[dict], opts: Quantize) -> list:
    """Per group, AWQ's s: the a in 0, 1/20 .. 19/20 for which the output of the sub-block the group
    feeds (attention output projection for q/k/v, down projection for gate/up, else the group's own
    linears) changes least, in squared error over `feeds`, when the group's quantized linears compute
    with Q(W * s) / s. Groups are independent: each is measured on the unchanged float program, from
    the values its sub-block reads (kept per feed from one run of the graph)."""
    gm = program.gm
    runner = GraphRunner(gm)
    grid = Grid("int4", opts.sym, opts.zero == "float") if opts.weights == "int4" else Grid("int8", opts.sym)
    spans, reads = [], []
    for _, lins, _, _ in todo:
        start, stop = min(runner.position[n.name] for n in lins), runner.position[_inspect_end(program, lins).name]
        inside = set(runner.nodes[start:stop + 1])
        spans.append((start, stop))
        reads.append({a for n in inside for a in n.all_input_nodes if a not in inside})
    inputs = [[] for _ in todo]
    for feed in track(feeds, f"quantize: awq inputs of {len(todo)} groups"):
        snapshots = runner.run(feed_args(program, feed), snapshot_at={start for start, _ in spans}).snapshots
        for g, (start, _) in enumerate(spans):
            inputs[g].append({a: snapshots[start][a] for a in reads[g]})
        del snapshots
    out = []
    for g, (x, lins, fold, note) in enumerate(track(todo, "quantize: awq search")):
        start, stop = spans[g]
        end = runner.nodes[stop]
        refs = [run_range(runner, env, start, stop)[end] for env in inputs[g]]
        quantized = [n for n in lins if n.args[1].target in plan.layers]
        best = (math.inf, 0.0, None)
        for a in [i / AWQ_GRID for i in range(AWQ_GRID)]:
            s = awq_scale(stats[x.name].abs_mean, a, fold[-1])
            full = s if fold[-1] is None else s[fold[-1]]
            overrides = {n: _with_weight(n, _dequantized_scaled(gm, n, full, grid, opts)) for n in quantized}
            err = sum(float(((run_range(runner, env, start, stop, overrides)[end] - ref) ** 2).sum())
                      for env, ref in zip(inputs[g], refs))
            if err < best[0]:
                best = (err, a, s)
        inputs[g] = None
        note["ratio"] = best[1]
        out.append(best[2])
    return out


def _dequantized_scaled(gm, n: fx.Node, full: torch.Tensor, grid: Grid, opts: Quantize) -> torch.Tensor:
    w = _attr(gm, n.args[1].target).detach()
    group = int4_group(w.shape[1], opts.group) if grid.kind == "int4" else w.shape[1]
    return rtn(w * full[None, :], grid, group).dequantize() / full[None, :]


def _with_weight(n: fx.Node, w: torch.Tensor):
    """A run_range override: linear node n computed with weight w."""
    x, b = _x(n), _bias(n)
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


def _input_groups(gm, plan: Plan) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(x, every linear reading x) for each input of a quantized, untied linear; graph order."""
    seen, out = set(), []
    for layer in plan.layers.values():
        if layer.tied:
            continue
        for n in layer.nodes:
            x = _x(n)
            if x in seen:
                continue
            seen.add(x)
            out.append((x, [u for u in x.users if u.target in DENSE and u.args[0] is x]))
    return out


def _find_fold(program: Program, x: fx.Node, lins: list[fx.Node], plan: Plan):
    """("norm", w, b, None) | ("rows", prev linear, rows, expand) | ("mul", None), or the reason (str)
    why x / s cannot go anywhere exact."""
    gm = program.gm
    for n in lins:
        w = n.args[1]
        if not isinstance(w, fx.Node) or w.op != "get_attr" or _readers(gm, w.target) != {n}:
            return f"the weight of {n.name} is shared or computed"
    users = _users(x)
    if all(u in lins for u in users):
        src = x
        while op_name(src) in IDENTITY and len(_users(src.args[0])) == 1:
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
            _attr(gm, prev.args[1].target)[rows] /= s[:, None]
            b = _bias(prev)
            if isinstance(b, fx.Node):
                _attr(gm, b.target)[rows] /= s
            return f"rows of {module_path(prev) or prev.name}"
    # an explicit x * (1/s) before the group
    owner_path = lins[0].args[1].target.rpartition(".")[0]
    owner = gm.get_submodule(owner_path) if owner_path else gm
    name = _free_name(owner, "input_smooth")
    owner.register_buffer(name, (1.0 / full).to(torch.float32))
    first = min(lins, key=lambda n: list(gm.graph.nodes).index(n))
    with gm.graph.inserting_before(first):
        inv = gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)
        mul = gm.graph.call_function(aten.mul.Tensor, (x, inv))
    set_val(gm, inv, _attr(gm, inv.target))
    set_val(gm, mul)
    for n in lins:
        n.replace_input_with(x, mul)
    return f"explicit mul ({inv.target})"


def _users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if u.target is not ASSERT]


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
        if bias is None or op_name(m) != "aten.mul" or len(m.args) != 2 or len(_users(m)) != 1:
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
    w, b = n.args[1], _bias(n)
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
            raise InternalError(f"quantize: folding the smoothing scales changed output '{spec.name}' by {rel:.2e}")


# -- quantize ------------------------------------------------------------------------------------------

def quantize_layer(gm, layer: Layer, stats: dict[str, InputStats], opts: Quantize) -> None:
    """layer.q in layer.format (tables are quantized in rewrite), layer.act for static activations."""
    if layer.tied or layer.format == "fp32":
        return
    w = _attr(gm, layer.weight).detach().to(torch.float32)
    k = layer.shape[1]
    grid = Grid("int4", opts.sym, opts.zero == "float") if layer.format == "w4" else Grid("int8")
    if grid.float_zero and layer.sparsity is not None:
        raise UserError(f"pass 'quantize' option 'zero': {layer.weight} is sparse and zero=float has no level at "
                        "exactly 0.0", "use zero=int (the default) for sparse weights")
    group = layer.group if layer.format == "w4" else k
    h = None
    if opts.method == "gptq":
        h = sum(stats[_x(n).name].H for n in layer.nodes)
        layer.q = gptq(w, h, grid, group, opts.damp, opts.act_order, zeros=_zeros(w, layer))
        layer.info["error"] = round(output_error(w, layer.q.dequantize(), h), 6)
        layer.info["rtn_error"] = round(output_error(w, rtn(w, grid, group).dequantize(), h), 6)
    else:
        layer.q = rtn(w, grid, group)
    # a weight mapped from the checkpoint file: its pages leave RSS now that its codes exist (issue 15)
    page_out([_attr(gm, layer.weight)])
    if layer.format == "a8w8" and opts._static():
        layer.act = {n.name: static_scale(stats[_x(n).name], opts.sym) for n in layer.nodes}


# -- mixed precision -----------------------------------------------------------------------------------

def choose_precision(program: Program, plan: Plan, feeds: list[dict], stats: dict, opts: Quantize) -> dict:
    """Promote the most sensitive layers to the next higher format (keep=N, or within avg_bits=B)."""
    gm = program.gm
    cands = [l for l in plan.layers.values() if not l.tied]
    if opts.keep > len(cands):
        raise UserError(f"pass 'quantize' option 'keep': keep={opts.keep} but only {len(cands)} layers are quantized",
                        f"use keep <= {len(cands)}")
    bits = lambda l, fmt: bits_per_weight({"w4": "int4", "w8": "int8", "a8w8": "int8", "fp32": "fp32"}[fmt],
                                          l.shape[1], l.group or l.shape[1], opts.sym, opts.zero == "float") * l.shape[0] * l.shape[1]
    total = sum(l.shape[0] * l.shape[1] for l in cands)
    used = sum(bits(l, l.format) for l in cands)
    if opts.avg_bits and used > opts.avg_bits * total + 1e-6:
        raise UserError(f"pass 'quantize' option 'avg_bits': avg_bits={opts.avg_bits:g} bits per weight is below the "
                        f"{used / total:.3f} that {opts.base_format} needs for every layer",
                        "raise avg_bits, or choose a smaller format (weights=int4)")
    sens = sensitivity(program, cands, feeds[:SENSITIVITY_FEEDS], opts)
    order = sorted(cands, key=lambda l: (-sens[l.weight], l.weight))
    promoted = []
    for l in order:
        if opts.keep and len(promoted) == opts.keep:
            break
        extra = bits(l, HIGHER[l.format]) - bits(l, l.format)
        if opts.avg_bits and used + extra > opts.avg_bits * total + 1e-6:
            continue
        used += extra
        l.format = HIGHER[l.format]
        promoted.append(l)
        quantize_layer(gm, l, stats, opts)
    n_feeds = min(len(feeds), SENSITIVITY_FEEDS)
    return {"metric": f"calibration loss increase with only that layer quantized ({n_feeds} feeds)",
            "sensitivity": {(l.modules[0] or l.weight): round(sens[l.weight], 6) for l in order},
            "higher_precision": [{"module": l.modules[0] or l.weight, "format": l.format} for l in promoted],
            "bits_per_weight": round(used / total, 4)}


def sensitivity(program: Program, cands: list[Layer], feeds: list[dict], opts: Quantize) -> dict[str, float]:
    """{weight: calibration loss with only that layer quantized - the float program's}, each layer
    run from a snapshot taken just before it (GraphRunner)."""
    gm = program.gm
    runner = GraphRunner(gm)
    objective = CalibrationLoss(program, feeds)
    changes = {}
    for l in cands:
        patches = {n.name: (_patch(_emulate(l, n, not opts.sym), runner), _needs(n)) for n in l.nodes}
        changes[l.weight] = (min(runner.position[n.name] for n in l.nodes), patches)
    base, terms = [], {key: [] for key in changes}
    for f, feed in enumerate(track(feeds, f"quantize: sensitivity of {len(cands)} layers")):
        clean = runner.run(feed_args(program, feed), snapshot_at={pos for pos, _ in changes.values()})
        base.append(objective.terms(f, clean.outputs))
        for key, (pos, patches) in changes.items():
            changed = runner.run(None, patches=patches, resume=(pos, clean.snapshots[pos]))
            terms[key].append(objective.terms(f, changed.outputs))
        del clean
    b = CalibrationLoss.combine(base)
    return {key: CalibrationLoss.combine(t) - b for key, t in terms.items()}


def _patch(fn, runner: GraphRunner):
    """A GraphRunner patch from fn(get) over nodes (GraphRunner's get takes node names)."""
    return lambda v, get: fn(lambda node: get(node.name))


def _needs(n: fx.Node) -> tuple[str, ...]:
    b = _bias(n)
    return (_x(n).name,) + ((b.name,) if isinstance(b, fx.Node) else ())


def _emulate(layer: Layer, n: fx.Node, asym: bool):
    """fn(get): node n's value as the quantized layer computes it (get reads other nodes' values)."""
    x, b = _x(n), _bias(n)
    bias = (lambda get: get(b)) if isinstance(b, fx.Node) else (lambda get: b)
    if layer.format == "a8w8":
        xs, xz = layer.act.get(n.name, (None, None))
        return lambda get: tcc_ops.dense_a8w8(get(x), layer.q.codes, layer.q.scale, bias(get), xs, xz, asym)
    w = layer.q.dequantize()
    return lambda get: torch.nn.functional.linear(get(x), w, bias(get))


# -- rewrite -------------------------------------------------------------------------------------------

def rewrite(gm: fx.GraphModule, plan: Plan, opts: Quantize) -> list[dict]:
    """Replace the float ops by the quantized ones; returns the notes on each layer and table."""
    notes, tables = [], {}
    for target, nodes in plan.tables.items():
        w = _attr(gm, target)
        q = rtn(w, Grid("int8"), w.shape[1])
        tables[target] = (q, _register(gm, target, {"int8": q.codes, "scale": q.scale}))
        page_out([w])  # mapped from the checkpoint file: its pages leave RSS
        for n in nodes:
            _replace(gm, n, tcc_ops.embedding_w8.default, lambda get, n=n: (n.args[TABLES[n.target][1]], get("int8"), get("scale")),
                     tables[target][1])
        notes.append({"weight": target, "modules": sorted({module_path(n) for n in nodes}), "shape": list(w.shape),
                      "format": "embedding_w8", "bytes_before": w.numel() * w.element_size(), "bytes_after": q.nbytes})
    asym = not opts.sym
    for layer in plan.layers.values():
        w = _attr(gm, layer.weight)
        note = {"weight": layer.weight, "modules": layer.modules, "shape": list(layer.shape), "format": layer.format,
                "bytes_before": w.numel() * w.element_size(), **layer.info}
        notes.append(note)
        if layer.format == "fp32":
            note["bytes_after"] = note["bytes_before"]
            continue
        if layer.tied:
            q, names = tables[layer.tied]
            note.update(bytes_after=0, shares=layer.tied)
        else:
            q = layer.q
            tensors = {"int4": q.packed()} if q.kind == "int4" else {"int8": q.codes}
            tensors["scale"] = q.scale
            if q.zero is not None:
                tensors["zero"] = q.zero
            names = layer.stored = _register(gm, layer.weight, tensors)
            note["bytes_after"] = q.nbytes
            if q.kind == "int4":
                note["group"] = q.group
        for n in layer.nodes:
            x, b = _x(n), _bias(n)
            names_n = dict(names)
            xs, xz = layer.act.get(n.name, (None, None))
            if xs is not None:
                act = {"act_scale": xs} if xz is None else {"act_scale": xs, "act_zero": xz}
                names_n.update(_register(gm, layer.weight, act))
                note["bytes_after"] += 4 * (1 + (xz is not None))
            if layer.format == "w8":
                args = lambda get: (x, get("int8"), get("scale"), b)
            elif layer.format == "w4":
                w4a8 = ("int8",) if opts.acts == "int8" else ()  # tcc::dense_w4's acts, the W4A8 variant
                args = lambda get: (x, get("int4"), get("scale"), get("zero") if q.zero is not None else None,
                                    q.group, b, *w4a8)
            else:
                args = lambda get: (x, get("int8"), get("scale"), b, get("act_scale") if xs is not None else None,
                                    get("act_zero") if xz is not None else None, asym)
            _replace(gm, n, OPS[layer.format], args, names_n)
    return notes


# -- verify --------------------------------------------------------------------------------------------

def verify(gm: fx.GraphModule) -> None:
    """Every quantized op's stored tensors have the dtypes and shapes its contract needs."""
    def t(a):
        return _attr(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None

    def need(ok: bool, n: fx.Node, what: str):
        if not ok:
            raise InternalError(f"quantize: node {n.name} ({op_name(n)}): {what}")

    for n in gm.graph.nodes:
        if n.target in (OPS["w8"], OPS["a8w8"]):
            qw, s = t(n.args[1]), t(n.args[2])
            need(qw is not None and qw.dtype == torch.int8 and qw.dim() == 2, n, "weight must be int8 [N, K]")
            need(s is not None and s.dtype == torch.float32 and tuple(s.shape) == (qw.shape[0],), n,
                 "scale must be f32 [N]")
            if n.target is OPS["a8w8"] and len(n.args) > 4 and n.args[4] is not None:
                xs = t(n.args[4])
                need(xs is not None and xs.dtype == torch.float32 and xs.numel() == 1, n, "x_scale must be f32 [1]")
        elif n.target is OPS["w4"]:
            qw, s, z, g = t(n.args[1]), t(n.args[2]), t(n.args[3]), n.args[4]
            need(qw is not None and qw.dtype == torch.uint8 and qw.dim() == 2, n, "weight must be uint8 [N, K/2]")
            k = qw.shape[1] * 2
            need(g % 2 == 0 and k % g == 0, n, f"group {g} must be even and divide K={k}")
            need(s is not None and s.dtype == torch.float16 and tuple(s.shape) == (qw.shape[0], k // g), n,
                 "scale must be f16 [N, K/group]")
            need(n.args[3] is None or (z is not None and z.dtype in (torch.uint8, torch.float32) and z.shape == s.shape),
                 n, "zero must be uint8 (codes) or float32 (zero=float) [N, K/group]")
            need(len(n.args) < 7 or n.args[6] in ("none", "int8"), n, "acts must be none or int8")
        elif n.target is tcc_ops.embedding_w8.default:
            qw, s = t(n.args[1]), t(n.args[2])
            need(qw is not None and qw.dtype == torch.int8 and s is not None and tuple(s.shape) == (qw.shape[0],), n,
                 "table must be int8 [V, D] with f32 [V] scales")


def carry_sparsity(program: Program, plan: Plan) -> None:
    """Move each quantized weight's sparsity annotation to its codes, saying how to read them."""
    for layer in plan.layers.values():
        if layer.sparsity is None or not layer.stored:
            continue
        kind = "int4" if "int4" in layer.stored else "int8"
        ann = sparsity.move_annotation(program, layer.weight, layer.stored[kind])
        ann.update(format=kind, scale=layer.stored["scale"], zero=layer.stored.get("zero"),
                   group=layer.q.group if kind == "int4" else None)


def _zeros(w: torch.Tensor, layer: Layer) -> torch.Tensor | None:
    """The entries a sparse weight must keep at exactly 0 (its stored zeros), None for a dense one."""
    return (w == 0) if layer.sparsity is not None else None

