"""`round-fp16`: round every linear layer's weight to the nearest float16 value.

The weights stay float32 tensors (the program runs and lowers as before), but each holds only
values float16 can represent, so the pass's drift record measures what half-precision weight
storage would cost. Values beyond float16's range (|w| > 65504) would become inf: the pass refuses
them instead.
"""
from __future__ import annotations

import torch

from tcc.errors import UserError
from tcc.pipeline import Option, Pass


class RoundFp16(Pass):
    """Round the weight of every `aten.linear` node with a stored weight to float16 precision.

    Requires: linear weights within float16's range (|w| <= 65504).
    Ensures: the same graph and shapes; every weight of at least `min_size` elements equals its
    float16 round trip; the record notes how many weights were rounded and the largest change.
    """

    name = "round-fp16"
    kind = "transform"
    options = {"min_size": Option(int, 0, "leave weights with fewer elements than this in float32",
                                  validator=lambda v: None if v >= 0 else "must be >= 0")}

    def run(self, program, ctx):
        rounded, largest = 0, 0.0
        for target in _linear_weights(program.gm):
            w = program.gm.get_parameter(target)
            if w.numel() < self.min_size:
                continue
            if w.abs().max() > torch.finfo(torch.float16).max:
                raise UserError(f"round-fp16: weight {target} holds values beyond float16's range",
                                f"min_size={w.numel() + 1} leaves it alone")
            with torch.no_grad():
                new = w.to(torch.float16).to(w.dtype)
                largest = max(largest, float((new - w).abs().max()))
                w.copy_(new)
            rounded += 1
        ctx.note(weights_rounded=rounded, max_abs_change=largest)
        return program


def _linear_weights(gm) -> list[str]:
    """Attribute paths of the float32 parameters that linear nodes read as their weight (once each)."""
    params = dict(gm.named_parameters())
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            w = node.args[1]
            if w.op == "get_attr" and params.get(w.target) is not None \
                    and params[w.target].dtype == torch.float32 and w.target not in found:
                found.append(w.target)
    return found
