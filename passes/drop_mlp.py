"""`drop-mlp`: remove whole MLP (feed-forward) sub-blocks, the most redundant first.

Contract: the chosen blocks lose their MLP sub-block exactly as if the model had been built
without it (tcc.compress.elimination): pre-norm, the residual add `x + mlp(norm(x))` becomes `x` and the
MLP's norm goes with it; parallel-residual blocks (GPT-NeoX, Falcon) lose only the MLP term;
post-norm (BERT), the sub-layer `LayerNorm(x + mlp(x))`, its LayerNorm included, becomes `x`. Dead
nodes and parameters are removed, so parameter bytes drop by the sub-blocks' weights, and
ModelInfo keeps the block with `mlp = None`.

Choosing works as in drop-attention: exactly one of count=N, ratio=R (N = floor(R * blocks)),
threshold=T (MLP input/output cosine similarity >= T) or layers=[...]; ranked by analyze-redundancy
(by=similarity, highest first; by=loss, smallest loss increase first), run on the calibration feeds
or the default calibration text when the pipeline has not run it; keep_ends=true (default) keeps
the first and last block out of automatic choices. Bad options raise a UserError naming the option.
"""
from __future__ import annotations

from tcc.compress.elimination import drop_chosen, require_blocks
from tcc.pipeline import Pass, PassContext, register
from tcc.ir.program import Program
from tcc.compress.redundancy import DROP_OPTIONS, choose, drop_reads


@register
class DropMLP(Pass):
    """Remove the MLP sub-blocks of the most redundant (or the given) blocks, exactly."""

    name = "drop-mlp"
    kind = "transform"
    part = "mlp"
    options = DROP_OPTIONS
    keeps_info = True  # tcc.compress.elimination.drop keeps ModelInfo true (edited where recovery cannot see it)

    def reads(self, analysis: str) -> set[str]:
        return drop_reads(self, analysis)  # analyze-redundancy's similarities (loss increases with by=loss)

    def run(self, program: Program, ctx: PassContext) -> bool:
        require_blocks(program, self.name)                              # contract: recognised blocks
        chosen, notes = choose(self, program, ctx)                      # match: the most redundant
        return drop_chosen(program, ctx, self.part, chosen, notes)      # rewrite: exact removal, noted
