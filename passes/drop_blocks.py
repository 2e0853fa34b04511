"""`drop-blocks`: remove whole transformer blocks (layers), the most redundant first (ShortGPT).

Contract: each chosen block's output stream becomes its input stream, so the program equals the
model built without those layers (post-norm: the block's LayerNorms go with it). Dead nodes and
parameters are removed, so parameter bytes drop by the blocks' weights; the blocks leave ModelInfo
and the rest are renumbered from 0.

Choosing works as in drop-attention: exactly one of count=N, ratio=R (N = floor(R * blocks)),
threshold=T (block input/output cosine similarity >= T; 1 - similarity is ShortGPT's Block
Influence) or layers=[...]; ranked by analyze-redundancy (by=similarity, highest first; by=loss,
smallest loss increase first), run on the calibration feeds or the default calibration text when the
pipeline has not run it; keep_ends=true (default) keeps the first and last block out of automatic
choices. Bad options raise a UserError naming the option.
"""
from __future__ import annotations

from tcc.compress.elimination import drop_chosen, require_blocks
from tcc.pipeline import Pass, PassContext, register
from tcc.ir.program import Program
from tcc.compress.redundancy import DROP_OPTIONS, choose, drop_reads


@register
class DropBlocks(Pass):
    """Remove the most redundant (or the given) transformer blocks, exactly."""

    name = "drop-blocks"
    kind = "transform"
    part = "block"
    options = DROP_OPTIONS
    keeps_info = True  # tcc.compress.elimination.drop keeps ModelInfo true (edited where recovery cannot see it)

    def reads(self, analysis: str) -> set[str]:
        return drop_reads(self, analysis)  # analyze-redundancy's similarities (loss increases with by=loss)

    def run(self, program: Program, ctx: PassContext) -> bool:
        require_blocks(program, self.name)                              # contract: recognised blocks
        chosen, notes = choose(self, program, ctx)                      # match: the most redundant
        return drop_chosen(program, ctx, self.part, chosen, notes)      # rewrite: exact removal, noted
