"""`drop-mlp`: remove whole MLP (feed-forward) sub-blocks, the most redundant first.

Contract: the chosen blocks lose their MLP sub-block exactly as if the model had been built
without it (tcc.elimination): pre-norm, the residual add `x + mlp(norm(x))` becomes `x` and the
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

from tcc.elimination import DropPass
from tcc.pipeline import register


@register
class DropMLP(DropPass):
    """Remove the MLP sub-blocks of the most redundant (or the given) blocks, exactly."""

    name = "drop-mlp"
    part = "mlp"
