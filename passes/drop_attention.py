"""`drop-attention`: remove whole attention sub-blocks, the most redundant first.

Contract: the chosen blocks lose their attention sub-block exactly as if the model had been built
without it (tcc.compress.elimination): pre-norm, the residual add `x + attn(norm(x))` becomes `x` and the
attention's norm goes with it; post-norm (BERT), the sub-layer `LayerNorm(x + attn(x))`, its
LayerNorm included, becomes `x`. Dead nodes and parameters are removed, so parameter bytes drop by
the sub-blocks' weights, and ModelInfo keeps the block with `attention = None`.

Choosing (exactly one of): count=N sub-blocks; ratio=R of the blocks (N = floor(R * blocks),
0 <= R < 1); threshold=T, every candidate whose attention input/output cosine similarity is >= T;
layers=[i, ...], explicit block indices. count, ratio and threshold rank candidates by
analyze-redundancy (by=similarity: highest input/output cosine similarity first, as in "What
Matters in Transformers? Not All Attention Is Needed"; by=loss: smallest calibration-loss increase
first), using the pipeline's analysis when it ran earlier, else running it on the calibration feeds
or the default calibration text (the record says which). keep_ends=true (default) never chooses the
first and last block that way; explicit layers are taken as given. Bad options (count above the
number of blocks or candidates, ratio outside [0, 1), layers out of range) raise a UserError naming
the option. The record lists the dropped blocks with their scores, the ranking, the bytes freed.
"""
from __future__ import annotations

from tcc.compress.elimination import drop_chosen, require_blocks
from tcc.pipeline import Pass, PassContext, register
from tcc.ir.program import Program
from tcc.compress.redundancy import DROP_OPTIONS, choose, drop_reads


@register
class DropAttention(Pass):
    """Remove the attention sub-blocks of the most redundant (or the given) blocks, exactly."""

    name = "drop-attention"
    kind = "transform"
    part = "attention"
    options = DROP_OPTIONS
    keeps_info = True  # tcc.compress.elimination.drop keeps ModelInfo true (edited where recovery cannot see it)

    def reads(self, analysis: str) -> set[str]:
        return drop_reads(self, analysis)  # analyze-redundancy's similarities (loss increases with by=loss)

    def run(self, program: Program, ctx: PassContext) -> bool:
        require_blocks(program, self.name)                              # contract: recognised blocks
        chosen, notes = choose(self, program, ctx)                      # match: the most redundant
        return drop_chosen(program, ctx, self.part, chosen, notes)      # rewrite: exact removal, noted
