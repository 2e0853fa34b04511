"""`quantize-weights`: int8 weights, per output channel, for the linear layers.

The special case `quantize(weights=int8, acts=none, method=rtn)` of passes/quantize.py, kept under
its own name and options; it runs that pass (found through the registry, as any caller finds a pass).

Contract: every `aten.linear` / `tcc::dense` node whose weight is a float `get_attr` tensor of
shape [N, K] with at least `min_size` elements, whose module path matches no `skip` glob, and whose
weight no other kind of node reads (a tied embedding table stays fp32, so quantizing its lm_head
would only add bytes), becomes

    tcc::dense_w8(x, weight_int8, weight_scale, bias)

with symmetric per-output-channel quantization: scale[n] = max_k |W[n,k]| / 127 (1 for an all-zero
row), weight_int8 = round(W / scale) in [-127, 127]. The int8 and float32 scale buffers live next to
the old weight (`<module>.weight_int8`, `<module>.weight_scale`), and the float weight is deleted,
so those layers take ~0.25x the bytes. Outputs change by the rounding only: each weight moves by at
most scale/2, i.e. 0.4% of its row's largest magnitude. Needs no calibration.

Options and defaults: bits=8 (the only width here; int4 is `quantize(weights=int4)`);
min_size=4096, which leaves tiny layers (classifier heads, adapters) alone, where int8 saves little
and costs accuracy; skip=[] - lm_head is quantized too when it has its own weight (int8
per-channel moves logits by well under 1% of their range), pass `skip=[lm_head]` to keep it fp32.
A glob matches a module path (from node.meta["nn_module_stack"], else the weight's attribute path)
or any dotted suffix of it, so `lm_head` matches `model.lm_head` and `layers.0.*` matches
`model.layers.0.mlp.up_proj`.

Notes the quantized layers (module, weight, shape) and the skipped ones with the reason.
"""
from __future__ import annotations

from tcc.pipeline import Option, Pass, PassContext, get_pass, register
from tcc.ir.program import Program
from tcc.compress.quantization import quantize_per_channel  # noqa: F401  (the int8 math, re-exported for callers)


@register
class QuantizeWeights(Pass):
    """Linear weights to symmetric per-output-channel int8 (tcc::dense_w8); fp32 weights deleted."""

    name = "quantize-weights"
    kind = "transform"
    options = {
        "bits": Option(int, 8, "weight bit width (8; int4 is quantize(weights=int4))", choices=(8,)),
        "min_size": Option(int, 4096, "quantize weights with at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs to keep in float, e.g. [lm_head,*.classifier]"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        self.impl = get_pass("quantize")(weights="int8", acts="none", method="rtn", min_size=self.min_size,
                                         skip=self.skip, embeddings=False)  # linears only (quantize's default: tables too)

    def run(self, program: Program, ctx: PassContext) -> Program:
        return self.impl.run(program, ctx)

    def ensures(self, program: Program) -> None:
        self.impl.ensures(program)
