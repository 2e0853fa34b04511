"""`rotate`: an orthogonal rotation of a pre-norm decoder's residual stream (QuaRot / SpinQuant style),
so that a later `quantize` sees weights and activations without outlier channels.

Contract. A float32 pre-norm decoder whose norms are RMSNorms with stored (or no) scales, found by
structure recovery (tcc.ir.structure: by pattern, not module names), is rewritten into the same function
(tcc.compress.rotation.rotate_residual, exact up to float rounding):
  - every norm's scale is folded into the linears reading its output, and becomes 1;
  - the residual stream is rotated by Q = signs * (H_{2^k} kron R_m) (randomised Walsh-Hadamard of the
    width's power-of-two part, a random orthogonal matrix of the odd rest; `seed`), absorbed into the
    embedding tables (E Q), the linears reading a norm (W Q), the attention output and MLP down
    projections (Q^T W, bias b Q) and the lm head (W Q). A tied lm head gets its own table (it is no
    longer the embedding's): the record's `lm_head_untied_bytes` says what that adds to the float
    Program (vocab x hidden x 4 bytes; with quantize(embeddings=true) the table and the head are then
    quantized each in its own format);
  - every attention's value/output head pair: the value projection's rows of each KV head -> H_d W,
    the output projection's columns of each query head -> W H_d (head dim d a power of two);
  - residual=false: only the head pairs and the online transform below (no norm folding, no stream
    rotation, a tied head stays tied). Measured on SmolLM2 (docs/BENCHMARKS.md "Rotations"): the
    folded norm scales cost more int4 accuracy than the rotation wins there;
  - online=true (default): before every MLP down projection, x -> x H_b at run time (the normalised
    Walsh-Hadamard transform of each `block` consecutive features: a view, a matmul by H_b, a view),
    the down weight's columns rotated alike (W H_b); b = min(block, the largest power of two dividing
    the down projection's K). The gated product's outliers, which no offline rotation reaches, are
    spread within each block: this is what makes int4 weights and int8 activations of down_proj work.
Refused with a UserError naming what was found: post-norm models (BERT, MiniLM: LayerNorm on the
stream itself; use quantize's smoothquant / awq), LayerNorm or biased norms, computed norm scales
(Gemma's 1 + w), a norm output read by anything but projections, programs that output hidden states,
and weights already quantized or in bf16 (rotate runs before quantize and bf16).

Verify: the rewritten program's outputs on the first calibration feed (or example inputs) must match
the input program's within 1e-3 of their largest magnitude (float rounding is ~1e-6); otherwise an
InternalError, and the input program is left as it was (the pass works on a copy).

Notes: hidden size, seed, the form of Q, norms folded, linears rotated, embedding tables rotated,
lm_head_untied_bytes, heads_rotated, per down projection its online block, and the measured output drift.
Composes with every quantizer: quantize(weights=int4, method=rtn|gptq|awq), W4A8, W8A8.
"""
from __future__ import annotations

import numpy as np

from tcc.errors import InternalError, UserError
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program
from tcc.compress.rotation import rotate_residual


@register
class Rotate(Pass):
    """Rotate a pre-norm decoder's residual stream (randomised Hadamard, norms folded), exactly, and
    rotate each down projection's input online: 4-bit weights and 8-bit activations without outliers."""

    name = "rotate"
    kind = "transform"
    writes_weights = False  # replaces tensors, never writes into them
    options = {
        "seed": Option(int, 0, "seed of the random signs and of the odd-size orthogonal factor"),
        "residual": Option(bool, True, "rotate the residual stream (norms folded, embeddings and every projection "
                                       "rotated); false: only the value/output heads and the online down input"),
        "online": Option(bool, True, "Walsh-Hadamard transform of each down projection's input at run time"),
        "block": Option(int, 128, "features per online Hadamard block (a power of two)",
                        validator=lambda v: None if v >= 2 and not v & (v - 1) else "must be a power of two >= 2"),
    }

    def requires(self, program: Program) -> None:
        if program.info is None:
            raise UserError("rotate: the program has no recovered structure", "trace a transformer model first")

    def run(self, program: Program, ctx: PassContext) -> Program:
        feed = (ctx.calibration or [program.example_inputs()])[0]
        before = program(feed)
        out = program.clone(share_weights=True)
        notes = rotate_residual(out.gm, out.info, self.seed, self.block if self.online else 0, self.residual)
        ctx.refresh_info(out)
        after = out(feed)
        drift = max(float(np.abs(after[k].astype(np.float64) - before[k]).max() / (np.abs(before[k]).max() or 1.0))
                    for k in before)
        notes["drift"] = drift
        if not drift <= 1e-3:
            raise InternalError(f"rotate changed the outputs by {drift:.3g} of their largest magnitude (float rounding "
                                "is ~1e-6): a part of this model's residual stream was not rotated")
        ctx.note(**notes)
        return out
