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
bytes are not stored twice. It is the default (issue 18: a user asking for int8 weights expects the
model's weights in int8; MiniLM int8 then measures cosine 0.9995 and 0.25x the fp32 bytes instead of
0.65x, docs/BENCHMARKS.md); embeddings=false keeps every table, and a tied lm_head (skipped: its weight
is also read by the embedding), in fp32. The record's `float` says what stays in float: the bytes and
count of float parameters left, and each one with >= min_size elements. embedding_format=int4 (with embeddings=true and weights=int4): the tables take the
body's int4 grid instead (group, sym, zero; rtn), `tcc::embedding_w4(ids, q, scale, zero, group)`
dequantizing the rows it gathers, and a tied lm_head reads the same codes through dense_w4 (W4A8 with
acts=int8), so decode's LM head streams 4-bit codes (the TVM backend stores the packed codes once,
read by the gather kernel and the GEMV kernel; llama.cpp's Q4_0 / Q4_1 keep output.weight at Q8_0 / Q6_K).

Methods (`method`):
  rtn          round to nearest.
  gptq         GPTQ per layer (tcc.compress.quantization.gptq), block by block: the Hessians of block i's
               linears come from the inputs the program computes with blocks < i already quantized
               (the model runs about twice per feed); `damp`; act_order=true (default) quantizes
               columns by decreasing Hessian diagonal with every group's scale fitted up front (on
               SmolLM2 int4 g64: +6.8% perplexity vs +17% in the paper's column order, where groups
               are fitted as they come: act_order=false). GPTQ wants many more calibration tokens than
               a Hessian's size (MiniLM int4 g32: 16 windows of 128 -> cosine 0.986, 256 -> 0.990;
               docs/BENCHMARKS.md): raise `samples` and give the compile as many windows
               (--calibration-samples) from a text long enough to hold them.
  awq          the `smooth` pass's step (tcc.compress.smoothing: AWQ's per-group s = mean|x|^a, searched
               for this pass's int4 / int8 grid, folded exactly into norms, previous linears' rows or an
               explicit mul), then (int4) AWQ's clipping search per row and group (bounds max|w| * 1,
               0.95 .. 0.55, least d^T H_g d with H_g the group's block of the input Hessian, here the
               smoothing statistics' scaled by 1 / (s s^T)), then rtn. The same numbers as
               `smooth(method=awq,...),quantize(...,clip=awq)` up to rounding in H_g.
  smoothquant  W8A8 only: the `smooth` pass's SmoothQuant step (s_j = max|X_j|^alpha / max|W_j|^(1-alpha),
               folded into a norm or the previous linear's rows, else the group stays unsmoothed;
               alpha=auto picks one alpha for the model from 0.3 .. 0.8 by the calibration loss with
               every candidate linear emulated as smoothed W8A8: mean KL of the next-token distributions
               for causal LMs, 1 - cosine of the pooled output for encoders), then rtn; bit for bit
               `smooth(method=smoothquant,...),quantize(weights=int8,acts=int8,...)`. The record's
               `alpha_search` holds each alpha's score, its calibration loss, and the float program's loss.
  clip=awq     (int4, method=rtn; after a `smooth` pass) AWQ's clipping as above, against the Hessian
               blocks of each layer's input in the program as given (one calibration run); noted in `clip`.
  See passes/smooth.py and tcc/compress/smoothing.py for the scale searches and folds.
  A tied lm_head is never smoothed (its weight is the embedding table).

Sparse weights (annotated by `sparsify`, see tcc/compress/sparsity.py) stay sparse: every format stores a
zero weight as the code of exactly 0.0 (int8: 0; int4 sym: 8; int4 asym: the zero point, an integer
code since lo <= 0 <= hi); gptq keeps the weight's zeros at that code and spreads their whole value
as error to the columns not yet quantized instead of filling them in; awq and smoothquant only scale
columns and rows, which keeps zeros. The annotation moves to the codes (`<w>_int8` / `<w>_int4`)
with format, scale, zero and group (a layer mixed precision keeps in fp32 keeps it on the weight).

Calibration: ctx.calibration when given (every feed; the first `samples` if samples > 0), else
`samples` (0: 16) windows of the default text (tcc.compress.calibration.text_feeds). Needed by gptq, awq, smoothquant, clip=awq,
static activations and mixed precision; plain rtn with dynamic activations needs none.

Mixed precision (here, not a pass of its own: a layer's sensitivity is measured with the codes this
pass gives it - GPTQ's block by block, AWQ's clipped weights - and a promoted layer is quantized again
from this pass's statistics, e.g. GPTQ's Hessians; a pass before quantize could only guess with rtn
codes, one after it no longer has the float weights): keep=N keeps the N layers whose quantization alone raises the calibration loss
most (measured on up to 4 feeds, every layer quantized in its base format in turn, the rest
float) at higher precision: int8 instead of int4, fp32 instead of int8 / W8A8. avg_bits=B instead
promotes layers in that order as long as the average storage bits per weight (scales and zeros
included) of the candidate linears stays <= B. Tied lm_heads are no candidates.

Checks (UserError, naming the option): weights=int4 with acts=int8 and act_scheme=static;
method=smoothquant without acts=int8 or with int4; method=awq with weights=int8,acts=int8; clip=awq
without weights=int4,method=rtn; sym=false with int8 weight-only; an odd int4 group; int4 for
a layer with an odd K (the layer is named); keep with avg_bits; keep above the number of
layers; an avg_bits below what the base format needs; calibration text too short (text_feeds).
After rewriting: every quantized op's buffers have the dtypes and shapes the op needs, no
candidate linear is left in float unless mixed precision kept it there, and every annotated sparse
tensor still holds its pattern.

Notes: options, calibration feeds, per layer and table {weight, modules, shape, format,
bytes_before, bytes_after[, group, error, rtn_error, shares]} (error = ||(W-Q)X|| / ||WX|| on the
calibration tokens, with gptq), group fallbacks, skipped layers with the reason, smoothing per group
{linears, fold, ratio, clip | alpha}, the alpha search, clip=awq's per group {linears, clip},
mixed-precision sensitivities and choices. The float weights it replaced are dead afterwards: the
pass manager removes them (removed_attributes) and recovers ModelInfo.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from tcc.compress import smoothing, sparsity
from tcc.compress.calibration import CalibrationLoss, pass_feeds, samples_option
from tcc.compress.quantization import (Grid, InputStats, Layer, Plan, QWeight, TABLES, awq_clip_groups, bits_per_weight, blockwise,
                                       collect_stats, feed_args, gptq, group_fallback, int4_group, linear_reads, match as plan_of,
                                       output_error, rtn, static_scale)
from tcc.errors import InternalError, UserError
from tcc.ir.graph import BIAS_AT, linear_bias, module_path, op_name, readers, register_tensors as _register, replace_node as _replace
from tcc.ir.program import Program, attribute as _attr
from tcc.ir.runner import GraphRunner
from tcc.memory import page_out
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.progress import track

tcc_ops = torch.ops.tcc
OPS = {"w8": tcc_ops.dense_w8.default, "w4": tcc_ops.dense_w4.default, "a8w8": tcc_ops.dense_a8w8.default}
HIGHER = {"w4": "w8", "w8": "fp32", "a8w8": "fp32"}
SENSITIVITY_FEEDS = 4


@register
class Quantize(Pass):
    """int8/int4 weights (rtn, gptq, awq = smooth + AWQ clipping), W8A8 (rtn, gptq, smoothquant), int8 embeddings, mixed precision."""

    name = "quantize"
    kind = "transform"
    writes_weights = True  # in place (Pipeline.run; Program.clone)

    @property
    def reads_bf16_weights(self) -> bool:
        """bf16 weights are read widened to float32, one layer at a time; smoothquant's scales are powers
        of two where they scale a bf16 weight (_exact_scales). AWQ's clipping would round: float32 load."""
        return self.method != "awq" and self.clip != "awq"
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
        "clip": Option(str, "none", "int4, method=rtn: AWQ's clipping search per row and group before rounding "
                       "(method=awq always clips)", choices=("none", "awq")),
        "alpha": Option(str, "auto", "SmoothQuant migration strength in [0, 1], or auto: the one of 0.3 .. 0.8 "
                        "that moves the calibration output least", validator=smoothing.alpha_problem),
        "damp": Option(float, 0.01, "GPTQ damping, a fraction of the mean Hessian diagonal",
                       validator=lambda v: None if v > 0 else "must be > 0"),
        "act_order": Option(bool, True, "GPTQ: columns by decreasing Hessian diagonal, groups fitted up front "
                            "(false: the paper's order, groups fitted as they come)"),
        "samples": samples_option(),
        "min_size": Option(int, 4096, "quantize weights with at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs to keep in float, e.g. [lm_head,*.classifier]"),
        "embeddings": Option(bool, True, "int8 embedding tables (a tied lm_head shares the int8 table); false keeps "
                             "them, and a tied lm_head, in float32"),
        "embedding_format": Option(str, "int8", "embeddings=true: the tables' format; int4 (weights=int4): the "
                                   "body's int4 grid, a tied lm_head reads the same codes", choices=("int8", "int4")),
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
        if self.clip == "awq" and (self.weights != "int4" or self.method != "rtn"):
            raise bad("clip", "clip=awq searches clipping bounds for round-to-nearest int4 codes",
                      "use weights=int4 with method=rtn (method=awq clips by itself), or drop clip=awq")
        if self.keep and self.avg_bits:
            raise bad("keep", "give keep or avg_bits, not both", "keep=N layers, or avg_bits=bits per weight")
        if self.embedding_format == "int4" and (self.weights != "int4" or not self.embeddings):
            raise bad("embedding_format", "int4 tables take the body's int4 grid: they need weights=int4 and "
                      "embeddings=true", "add weights=int4,embeddings=true, or drop embedding_format=int4")

    @property
    def auto_alpha(self) -> bool:
        return self.alpha == "auto"

    @property
    def base_format(self) -> str:
        return "w4" if self.weights == "int4" else ("a8w8" if self.acts == "int8" else "w8")

    def run(self, program: Program, ctx: PassContext) -> bool:
        gm = program.gm
        plan = match(program, self)
        fallback = group_fallback(plan, self.group)
        for line in fallback:
            ctx.logger.warning("quantize: %s", line)
        feeds = self._feeds(program, ctx) if plan.layers and self._calibrates() else []
        smoothed, clipped = None, None
        if feeds and self.method in smoothing.METHODS:  # = smooth(method=...) then (awq, int4) AWQ's clipping
            smoothed = smooth_in_place(program, plan, feeds, self)
        elif feeds and self.clip == "awq":
            clipped = clip_awq(program, plan, feeds, self)
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
        gm.recompile()
        ctx.note(options=dict(self.opts), calibration={"feeds": len(feeds)}, quantized=quantized,
                 group_fallback=fallback, skipped=plan.skipped, smoothing=smoothed.notes if smoothed else [],
                 alpha_search=smoothed.alpha_search if smoothed else None, clip=clipped, mixed=mixed,
                 float=_float_left(gm, self.min_size))
        return bool(quantized or plan.tables)  # the manager removes the float weights (dead now), refreshes ModelInfo

    def ensures(self, program: Program) -> None:
        verify(program.gm)
        broken = sparsity.violations(program)
        if broken:
            raise InternalError(f"quantize broke the sparsity of {broken}")
        left = [t for t in match(program, self, check_groups=False).layers if t not in self._kept_float]
        if left:
            raise InternalError(f"quantize left float weights it should have quantized: {sorted(left)}")

    def _calibrates(self) -> bool:
        return self.method != "rtn" or self.clip != "none" or self._static() or bool(self.keep or self.avg_bits)

    def _static(self) -> bool:
        return self.acts == "int8" and self.act_scheme == "static"

    def _feeds(self, program: Program, ctx: PassContext) -> list[dict]:
        return pass_feeds(program, ctx, self.samples)


# -- match --------------------------------------------------------------------------------------------

def match(program: Program, opts: Quantize, check_groups: bool = True) -> Plan:
    """The layers and tables to quantize (tcc.compress.quantization.match with this pass's options)."""
    return plan_of(program, opts.base_format, group=opts.group, tied_format=_tied_format(opts),
                   min_size=opts.min_size, skip=opts.skip, embeddings=opts.embeddings, check_groups=check_groups)


def _tied_format(opts: Quantize) -> str:
    """The format of a linear reading an embedding table (a tied lm_head): the table's codes, int8 ones read
    weight-only (float activations) even where acts=int8. SmolLM2 W8A8 SmoothQuant, 16 held-out windows of
    valid.txt at seq 64: head through dense_a8w8 perplexity ratio 1.037 / KL 0.025, through dense_w8 1.023 /
    0.015, the table left fp32 1.013 / 0.013 (issue 18)."""
    return "w4" if opts.embedding_format == "int4" else "w8"


# -- smoothing and clipping -------------------------------------------------------------------------

def target(opts: Quantize) -> smoothing.Target:
    """The format these options quantize to, as the smoothing searches see it."""
    grid = Grid("int4", opts.sym, opts.zero == "float") if opts.weights == "int4" else Grid("int8", opts.sym)
    return smoothing.Target(grid, opts.group, act_asym=not opts.sym)


def smooth_in_place(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> smoothing.Smoothed:
    """method=awq|smoothquant: the `smooth` pass's step (tcc.compress.smoothing) on this plan, then, for
    awq with int4 weights, AWQ's clipping against the smoothing statistics' Hessian blocks scaled by
    1 / (s s^T) (the Hessian of x / s, without another calibration run). Each group's note gets "clip"."""
    clip = opts.method == "awq" and opts.weights == "int4"
    done = smoothing.smooth(program, plan.layers, feeds, opts.method, None if opts.auto_alpha else float(opts.alpha),
                            target(opts), hessian_blocks=clip)
    if clip:
        def hessian(x: fx.Node) -> torch.Tensor:
            h = done.stats[x.name].H_blocks
            if x.name in done.applied:
                full = done.applied[x.name].reshape(h.shape[0], -1).to(torch.float64)
                h = h / (full[:, :, None] * full[:, None, :])
            return h
        ratios = awq_clip_groups(program.gm, plan.layers, done.groups, hessian, target(opts).grid, opts.group)
        for note, ratio in zip(done.notes, ratios):
            note["clip"] = ratio
    return done


def clip_awq(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> list[dict]:
    """clip=awq: AWQ's clipping of every int4 layer against the Hessian blocks of its input in this
    program (after a `smooth` pass: the smoothed input). One calibration run; notes per input group."""
    gm = program.gm
    groups = smoothing.input_groups(gm, plan.layers)
    width = lambda lins: _attr(gm, lins[0].args[1].target).shape[1]
    stats = {x.name: InputStats(width(lins), blocks=int4_group(width(lins), opts.group)) for x, lins in groups}
    collect_stats(program, feeds, stats, "quantize: awq clipping")
    ratios = awq_clip_groups(gm, plan.layers, groups, lambda x: stats[x.name].H_blocks, target(opts).grid, opts.group)
    return [{"linears": [module_path(n) or n.name for n in lins], "clip": r} for (_, lins), r in zip(groups, ratios)]


# -- calibrate -----------------------------------------------------------------------------------------

def calibrate(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> dict[str, InputStats]:
    """Statistics of every quantized linear's input (the |x| percentile for static activations)."""
    stats = _input_stats(plan.layers.values(), len(feeds), opts)
    collect_stats(program, feeds, stats, "quantize: calibrating")
    return stats


def _input_stats(layers, n_feeds: int, opts: Quantize) -> dict[str, InputStats]:
    stats: dict[str, InputStats] = {}
    for layer in layers:
        for n in layer.nodes:
            if n.args[0].name not in stats:
                static = opts._static() and layer.format == "a8w8"
                stats[n.args[0].name] = InputStats(layer.shape[1], hessian=opts.method == "gptq",
                                               percentile=opts.percentile if static else None,
                                               signed=not opts.sym, feeds=n_feeds)
    return stats


def gptq_blocks(program: Program, plan: Plan, feeds: list[dict], opts: Quantize) -> dict[str, InputStats]:
    """GPTQ block by block (tcc.compress.quantization.blockwise): the Hessians of block i's linears come from the
    inputs the program computes with blocks 0..i-1 already quantized. Returns the stats (Hessians kept
    only when mixed precision will re-quantize)."""
    kept: dict[str, InputStats] = {}

    def process(here, stats):
        together = _gptq_together(program.gm, here, stats, opts)
        for l in here:
            quantize_layer(program.gm, l, stats, opts, together.get(l.weight))
        if opts.keep or opts.avg_bits:
            kept.update(stats)
        return {n: _emulate(l, n, not opts.sym) for l in here if l.q is not None for n in l.nodes}

    blockwise(program, list(plan.layers.values()), feeds, lambda here: _input_stats(here, len(feeds), opts),
              process, "quantize: gptq inputs")
    return kept


# -- quantize ------------------------------------------------------------------------------------------

def _grid(opts: Quantize, fmt: str) -> Grid:
    return Grid("int4", opts.sym, opts.zero == "float") if fmt == "w4" else Grid("int8")


def _gptq_together(gm, layers: list[Layer], stats: dict[str, InputStats], opts: Quantize) -> dict[str, QWeight]:
    """{weight: its GPTQ codes} for the layers that read the same inputs in the same format (q, k and v;
    gate and up), from one GPTQ run over their rows stacked: they share the Hessian, and GPTQ's updates
    stay within a row, so each layer gets its own run's codes in one pass over the columns instead of one
    pass per layer (SmolLM2: 4,992 columns a block become 3,264). quantize_layer does the rest."""
    if opts.method != "gptq":
        return {}
    sets: dict[tuple, list[Layer]] = {}
    for l in layers:
        if not l.tied and l.format != "fp32":
            sets.setdefault((tuple(n.args[0].name for n in l.nodes), l.format, l.group), []).append(l)
    out: dict[str, QWeight] = {}
    for (inputs, fmt, group), same in sets.items():
        if len(same) < 2:
            continue
        ws = [_attr(gm, l.weight).detach().to(torch.float32) for l in same]
        zeros = [_zeros(w, l) for w, l in zip(ws, same)]
        zeros = None if all(z is None for z in zeros) else \
            torch.cat([torch.zeros_like(w, dtype=torch.bool) if z is None else z for w, z in zip(ws, zeros)])
        h = sum(stats[name].H for name in inputs)
        q = gptq(torch.cat(ws), h, _grid(opts, fmt), group if fmt == "w4" else ws[0].shape[1], opts.damp,
                 opts.act_order, zeros=zeros)
        del ws, zeros
        row = 0
        for l in same:
            n = l.shape[0]
            out[l.weight] = QWeight(q.kind, q.codes[row:row + n].clone(), q.scale[row:row + n].clone(),
                                    None if q.zero is None else q.zero[row:row + n].clone(), q.group)
            row += n
    return out


def quantize_layer(gm, layer: Layer, stats: dict[str, InputStats], opts: Quantize, q: QWeight | None = None) -> None:
    """layer.q in layer.format (tables are quantized in rewrite), layer.act for static activations; `q`:
    its GPTQ codes when they were computed already (_gptq_together)."""
    if layer.tied or layer.format == "fp32":
        return
    w = _attr(gm, layer.weight).detach().to(torch.float32)
    k = layer.shape[1]
    grid = _grid(opts, layer.format)
    if grid.float_zero and layer.sparsity is not None:
        raise UserError(f"pass 'quantize' option 'zero': {layer.weight} is sparse and zero=float has no level at "
                        "exactly 0.0", "use zero=int (the default) for sparse weights")
    group = layer.group if layer.format == "w4" else k
    h = None
    if opts.method == "gptq":
        h = sum(stats[n.args[0].name].H for n in layer.nodes)
        layer.q = q if q is not None else gptq(w, h, grid, group, opts.damp, opts.act_order, zeros=_zeros(w, layer))
        layer.info["error"] = round(output_error(w, layer.q.dequantize(), h), 6)
        layer.info["rtn_error"] = round(output_error(w, rtn(w, grid, group).dequantize(), h), 6)
    else:
        layer.q = rtn(w, grid, group)
    # a weight mapped from the checkpoint file: its pages leave RSS now that its codes exist (issue 15)
    page_out([_attr(gm, layer.weight)])
    if not (opts.keep or opts.avg_bits):  # mixed precision may choose the float weight back
        _release(gm, layer)
    if layer.format == "a8w8" and opts._static():
        layer.act = {n.name: static_scale(stats[n.args[0].name], opts.sym) for n in layer.nodes}


def _release(gm, layer: Layer) -> None:
    """Free the float weight whose codes layer.q now holds, where only this layer's linears read it:
    a weight in new memory (SmoothQuant's / AWQ's scaled copy, a converted GGUF or bf16 tensor) would
    otherwise stay beside every layer's codes until the pass ends (issue 15: the SmoothQuant W8A8 compile
    of the Llama-3.2-1B shape peaked at 7.4 GB there). The tensor keeps its object (the graph's
    get_attr) with no elements; rewrite's bytes_before comes from layer.info."""
    if not {u for n in gm.graph.nodes if n.op == "get_attr" and n.target == layer.weight
            for u in readers(n)} <= set(layer.nodes):
        return
    w = _attr(gm, layer.weight)
    layer.info["bytes_before"] = w.numel() * w.element_size()
    with torch.no_grad():
        w.set_(torch.empty(0, dtype=w.dtype))


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
        patches = {n.name: (_patch(_emulate(l, n, not opts.sym), runner), linear_reads(n)) for n in l.nodes}
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


def _emulate(layer: Layer, n: fx.Node, asym: bool):
    """fn(get): node n's value as the quantized layer computes it (get reads other nodes' values)."""
    x, b = n.args[0], linear_bias(n)
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
        if opts.embedding_format == "int4":
            q, op, stored, args = _int4_table(w, target, nodes, opts)
        else:
            q, op = rtn(w, Grid("int8"), w.shape[1]), tcc_ops.embedding_w8.default
            stored = {"int8": q.codes, "scale": q.scale}
            args = lambda get, ids: (ids, get("int8"), get("scale"))
        tables[target] = (q, _register(gm, target, stored))
        page_out([w])  # mapped from the checkpoint file: its pages leave RSS
        for n in nodes:
            _replace(gm, n, op, lambda get, n=n: args(get, n.args[TABLES[n.target][1]]), tables[target][1])
        notes.append({"weight": target, "modules": sorted({module_path(n) for n in nodes}), "shape": list(w.shape),
                      "format": op.name().split("::")[-1].split(".")[0], "bytes_before": w.numel() * w.element_size(),
                      "bytes_after": q.nbytes, **({"group": q.group} if q.kind == "int4" else {})})
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
            x, b = n.args[0], linear_bias(n)
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


def _int4_table(w: torch.Tensor, target: str, nodes: list, opts: Quantize):
    """embedding_format=int4: the table's rtn codes on the body's int4 grid, the op, its stored tensors
    and its arguments (get, ids) -> tcc::embedding_w4's."""
    group = int4_group(w.shape[1], opts.group)
    if not group:
        module = sorted({module_path(n) for n in nodes})[0] or target
        raise UserError(f"pass 'quantize' option 'embedding_format': table {module} cannot be int4: its {w.shape[1]} "
                        "columns are odd (two int4 codes share a byte)", "use embedding_format=int8")
    q = rtn(w, Grid("int4", opts.sym, opts.zero == "float"), group)
    stored = {"int4": q.packed(), "scale": q.scale, **({"zero": q.zero} if q.zero is not None else {})}
    args = lambda get, ids: (ids, get("int4"), get("scale"), get("zero") if q.zero is not None else None, q.group)
    return q, tcc_ops.embedding_w4.default, stored, args


def _float_left(gm: fx.GraphModule, min_size: int) -> dict:
    """What stays in float after quantize: {bytes, tensors, large: [{name, shape}] (>= min_size elements)}."""
    quantized_ops = set(OPS.values()) | {getattr(tcc_ops, e).default for e in ("embedding_w8", "embedding_w4")
                                         if hasattr(tcc_ops, e)}
    codes_of = {a.target for n in gm.graph.nodes if n.target in quantized_ops  # scales, zeros: part of the codes
                for i, a in enumerate(n.args) if i >= 1 and i != BIAS_AT.get(op_name(n)) and isinstance(a, fx.Node)}
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users} - codes_of  # the replaced: no users
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    left = [(k, t) for k, t in tensors.items()
            if k in used and t.is_floating_point()]
    return {"bytes": sum(t.numel() * t.element_size() for _, t in left), "tensors": len(left),
            "large": [{"name": k, "shape": list(t.shape)} for k, t in left if t.numel() >= max(min_size, 1)]}


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
        elif n.target is tcc_ops.embedding_w4.default:
            qw, s, g = t(n.args[1]), t(n.args[2]), n.args[4]
            need(qw is not None and qw.dtype == torch.uint8 and qw.dim() == 2 and g % 2 == 0
                 and (2 * qw.shape[1]) % g == 0, n, "table must be uint8 [V, D/2] with an even group dividing D")
            need(s is not None and s.dtype == torch.float16 and tuple(s.shape) == (qw.shape[0], 2 * qw.shape[1] // g), n,
                 "scale must be f16 [V, D/group]")


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

