"""A pass written outside tcc, registered, and run in a pipeline next to the built-in ones.

    python examples/custom_pass.py            # runs it on a tiny model and checks the result (CI does)
    python examples/custom_pass.py --compile build/minilm-pruned   # compiles MiniLM for x86 with it

The pass zeroes the smallest-magnitude weights of every linear layer (unstructured magnitude
pruning). The contract is the docstring; `run` matches the linear nodes (tcc.ir.graph.nodes, a small
declarative matcher), rewrites their weights and returns whether it changed the program. The pass
manager does the rest: dead code, ModelInfo, the check of tcc ops' operands, and the record (size,
FLOPs, the numeric drift the pass caused).
"""
from __future__ import annotations

import sys

import torch

import tcc
from tcc.ir.graph import nodes
from tcc.pipeline import Option, Pass, register


@register
class ZeroSmallWeights(Pass):
    """Set the `fraction` smallest-magnitude entries of each linear weight to zero.

    Requires: aten.linear nodes whose weight is a stored tensor. Ensures: same graph and shapes;
    each touched weight has at least `fraction` zeros.
    """

    name = "zero-small-weights"
    kind = "transform"
    writes_weights = True  # it writes into the weights in place
    options = {"fraction": Option(float, 0.1, "fraction of each weight to zero",
                                  validator=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")}

    def run(self, program, ctx) -> bool:
        linears = nodes(program.gm, "aten.linear", where=lambda n: n.args[1].op == "get_attr")  # match
        touched = 0
        for n in linears:
            w = program.gm.get_parameter(n.args[1].target)
            k = int(w.numel() * self.fraction)
            if k:
                cut = w.detach().abs().flatten().kthvalue(k).values                             # rewrite
                with torch.no_grad():
                    w[w.abs() <= cut] = 0.0
                touched += 1
        ctx.note(weights_pruned=touched)                                                        # record
        return touched > 0


def main() -> None:
    from tcc.testing import assert_ops, program_of, run_pass

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    program = program_of(mlp, torch.randn(2, 16))
    out, record = run_pass("zero-small-weights(fraction=0.5)", program)
    zeros = [float((p == 0).float().mean()) for n, p in out.gm.named_parameters() if n.endswith("weight")]
    assert all(z >= 0.5 for z in zeros), zeros
    assert_ops(out, ["aten.linear", "aten.relu", "aten.linear"], only=True)  # these ops, in this order
    print(f"zero-small-weights: {record['details']}, zeros per weight {[round(z, 3) for z in zeros]}, "
          f"drift {record['drift']['rel']:.2g}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--compile":
        art = tcc.compile("minilm", "x86", out=sys.argv[2], seq_len=128, pipeline="zero-small-weights(fraction=0.2)")
        print(art.manifest["passes"][-1]["details"], art.manifest["run"]["verify"])
    else:
        main()
