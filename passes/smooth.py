"""`smooth`: SmoothQuant / AWQ activation-aware scaling, folded into the program, exact in fp32.

Contract. For each group of quantization candidates reading one value x (the linears `quantize` with
the same `min_size`, `skip` and `embeddings` would quantize, tcc.compress.quantization.match; q/k/v,
gate/up, or one linear), weights W become W * s and x / s is folded into the graph: the preceding
norm's weight (and bias), else the rows of the previous linear (attention v -> o, gated MLP up ->
down), else (awq only) an explicit `mul(x, 1/s)`. The program computes the same function up to float
rounding (checked: outputs on the first calibration feed move < 1e-3 relative, else InternalError);
it stays float, for any quantizer after it:

    smooth(method=smoothquant),quantize(weights=int8,acts=int8)
    smooth(method=awq),quantize(weights=int4,clip=awq)        = quantize(weights=int4,method=awq) up to
                                                                 rounding in the clipping statistics
    smooth(method=awq),quantize(weights=int4,method=gptq)

Methods (tcc/compress/smoothing.py has the formulas and searches):
  smoothquant  s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the group's linears; alpha=auto picks one
               alpha for the model from 0.3 .. 0.8 by the calibration loss with every candidate linear
               emulated as smoothed W8A8 (per-token int8 activations, `sym`: symmetric or not). A group
               whose x / s can fold into no norm and no previous linear stays unsmoothed (noted).
  awq          per group s = mean|x|^a, a in 0, 1/20 .. 19/20 picked by the output error of the sub-block
               the group feeds when the group's weights are quantized to the target format (`weights`,
               `group`, `sym`, `zero`, as quantize's options: give the ones quantize will use).

The search needs the target format because AWQ's scales are chosen for one grid (int4 g128
symmetric is not int4 g32 asymmetric); options rather than a hand-off from quantize, because a
pass runs before the next one exists and passes share nothing but the program. AWQ's weight
clipping is not here: it changes the function, so it is quantization (`quantize(clip=awq)`).
`quantize(method=awq|smoothquant)` runs this same step (tcc.compress.smoothing.smooth) inside
quantize and gives the numbers it always gave.

Calibration: ctx.calibration when given (every feed; the first `samples` if samples > 0), else
`samples` (0: 16) windows of the default text. Checks (UserError naming the option): smoothquant with weights=int4; alpha with awq;
zero=float without weights=int4,sym=false; an odd group; int4 for a layer with an odd K.
Notes: options, calibration feeds, per group {linears, fold, ratio | alpha}, the alpha search.
"""
from __future__ import annotations

from tcc.compress import smoothing
from tcc.compress.calibration import pass_feeds, samples_option
from tcc.compress.quantization import Grid, match
from tcc.errors import UserError
from tcc.ir.program import Program
from tcc.pipeline import Option, Pass, PassContext, register


@register
class Smooth(Pass):
    """SmoothQuant / AWQ scales folded into norms and linears: the same function in fp32, easier to quantize."""

    name = "smooth"
    kind = "transform"
    writes_weights = True  # scales weights and norms in place

    @property
    def reads_bf16_weights(self) -> bool:
        """smoothquant's scales are powers of two where they scale a bf16 weight (exact in bf16); awq's are not."""
        return self.method == "smoothquant"

    options = {
        "method": Option(str, "awq", "awq (for weight quantization) or smoothquant (for int8 activations)",
                         choices=smoothing.METHODS),
        "alpha": Option(str, "auto", "smoothquant: migration strength in [0, 1], or auto (the one of 0.3 .. 0.8 "
                        "that moves the calibration output least)", validator=smoothing.alpha_problem),
        "weights": Option(str, "auto", "the weight format quantize will use (auto: int4 for awq, int8 for smoothquant)",
                          choices=("auto", "int8", "int4")),
        "group": Option(int, 128, "int4: input features per scale quantize will use (0 = one group per row)",
                        validator=lambda v: None if v >= 0 else "must be >= 0"),
        "sym": Option(bool, True, "symmetric int4 weights / int8 activations, as quantize's sym"),
        "zero": Option(str, "int", "int4 with sym=false: int or float zero points, as quantize's zero",
                       choices=("int", "float")),
        "samples": samples_option(),
        "min_size": Option(int, 4096, "smooth for the weights quantize will take: at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs quantize will keep in float"),
        "embeddings": Option(bool, True, "quantize will quantize embedding tables, its default (a tied lm_head then "
                             "counts as quantized in the smoothquant alpha search)"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        bad = lambda option, msg, hint: UserError(f"pass 'smooth' option '{option}': {msg}", hint)
        if self.method == "smoothquant" and self.weights == "int4":
            raise bad("weights", "smoothquant is for W8A8 (int8 weights and activations)",
                      "use method=awq for int4 weights, or weights=int8")
        if self.method == "awq" and self.alpha != "auto":
            raise bad("alpha", "alpha is smoothquant's migration strength; awq searches its own exponent",
                      "drop alpha, or use method=smoothquant")
        if self.zero == "float" and (self.format != "int4" or self.sym):
            raise bad("zero", "zero=float is for asymmetric int4 weights", "add weights=int4,sym=false, or drop zero=float")
        if self.group and self.group % 2:
            raise bad("group", f"group={self.group} is odd; two int4 codes share a byte", "use an even group, e.g. 128")

    @property
    def format(self) -> str:
        """The target weight format: int4 | int8."""
        return self.weights if self.weights != "auto" else ("int4" if self.method == "awq" else "int8")

    def target(self) -> smoothing.Target:
        grid = Grid("int4", self.sym, self.zero == "float") if self.format == "int4" else Grid("int8", self.sym)
        return smoothing.Target(grid, self.group, act_asym=not self.sym)

    def run(self, program: Program, ctx: PassContext) -> bool:
        base = "w4" if self.format == "int4" else ("a8w8" if self.method == "smoothquant" else "w8")
        plan = match(program, base, group=self.group, tied_format="w8",  # what quantize reads a tied head as
                     min_size=self.min_size, skip=self.skip, embeddings=self.embeddings, who="smooth")
        if not plan.layers:
            ctx.note(options=dict(self.opts), calibration={"feeds": 0}, smoothing=[], alpha_search=None)
            return False
        feeds = pass_feeds(program, ctx, self.samples)
        alpha = None if self.alpha == "auto" else float(self.alpha)
        done = smoothing.smooth(program, plan.layers, feeds, self.method, alpha, self.target())
        ctx.note(options=dict(self.opts), calibration={"feeds": len(feeds)}, smoothing=done.notes,
                 alpha_search=done.alpha_search)
        return bool(done.applied)
