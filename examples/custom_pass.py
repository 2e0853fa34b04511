"""A pass written outside tcc, registered, and run in a pipeline next to the built-in ones.

    python examples/custom_pass.py            # compiles MiniLM for x86 with the pass

The pass zeroes the smallest-magnitude weights of every linear layer (unstructured magnitude
pruning). The contract is the docstring; `run` matches the linear nodes, rewrites their weights,
and notes what it did in the pass record. The pass manager checks the graph afterwards and
records size, FLOPs and the numeric drift it caused.
"""
from __future__ import annotations

import sys

import torch

import tcc
from tcc.pipeline import Option, Pass, register


@register
class ZeroSmallWeights(Pass):
    """Set the `fraction` smallest-magnitude entries of each linear weight to zero.

    Requires: a Program with aten.linear nodes whose weight is a parameter.
    Ensures: same graph, same shapes; each touched weight has >= `fraction` zeros.
    """

    name = "zero-small-weights"
    kind = "transform"
    options = {"fraction": Option(float, 0.1, "fraction of each weight to zero",
                                  validator=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")}

    def run(self, program, ctx):
        touched = 0
        for node in program.gm.graph.nodes:                                   # match
            if node.op == "call_function" and node.target == torch.ops.aten.linear.default \
                    and node.args[1].op == "get_attr":
                w = program.gm.get_parameter(node.args[1].target)
                k = int(w.numel() * self.fraction)
                if k == 0:
                    continue
                cut = w.detach().abs().flatten().kthvalue(k).values              # rewrite
                with torch.no_grad():
                    w[w.abs() <= cut] = 0.0
                touched += 1
        ctx.note(weights_pruned=touched)                                       # verify/record
        return program


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "build/minilm-pruned"
    art = tcc.compile("minilm", "x86", out=out, seq_len=128, pipeline="zero-small-weights(fraction=0.2)")
    print(art.manifest["passes"][-1]["details"], art.manifest["run"]["verify"])
