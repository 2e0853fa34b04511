"""A graph runner that taps and patches node values (the calibration statistics, the redundancy
analysis, the scale searches and the structure checks run graphs with it).

GraphRunner(gm).run(args, record=, patches=, snapshot_at=, resume=, replace=)
    Runs a torch.fx graph node by node (freeing values after their last use), returns the outputs,
    the values of the `record`ed nodes, and snapshots of the live values before chosen positions;
    `patches` replace a node's value by fn(value, get) (`get(name)` reads another node's value) and
    `resume` starts from a snapshot, so a change deep in the model re-runs only what follows it;
    `replace` computes a node by fn(get) instead of its own target (which then does not run).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx

from .graph import mutates
from .program import attribute as _attr

Patch = Callable[[torch.Tensor, Callable[[str], torch.Tensor]], torch.Tensor]


@dataclasses.dataclass
class RunResult:
    outputs: list  # the graph's outputs, flattened, in order
    values: dict  # {recorded node name: value}
    snapshots: dict  # {position: {node: value}} live values before that position


class GraphRunner:
    """Runs one GraphModule node by node; see the module docstring."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.last_use = {n: max([self.position[u.name] for u in n.users], default=i) for i, n in enumerate(self.nodes)}
        self.attrs = {n: _attr(gm, n.target) for n in self.nodes if n.op == "get_attr"}
        # values that in-place ops overwrite: copied when resuming, so snapshots stay intact
        self.mutated = {n.args[0] for n in self.nodes if n.op == "call_function" and mutates(n)
                        and isinstance(n.args[0], fx.Node)}

    def run(self, args, record=(), patches: dict[str, tuple[Patch, tuple[str, ...]]] | None = None,
            snapshot_at=(), resume: tuple[int, dict] | None = None,
            replace: dict[str, tuple[Callable, tuple[str, ...]]] | None = None) -> RunResult:
        """`patches`: {node name: (fn, names fn reads through get)}; `replace` likewise, fn(get) computing
        the node's value in place of its target; `resume`: (position, snapshot)."""
        patches, replace = patches or {}, replace or {}
        last = dict(self.last_use)
        for name, (_, needs) in [*patches.items(), *replace.items()]:
            for need in needs:
                node = self.by_name[need]
                last[node] = max(last[node], self.position[name])
        keep = {self.by_name[r] for r in record}
        snapshot_at = set(snapshot_at)
        start, env = 0, {}
        if resume is not None:
            start, snap = resume
            env = {n: (v.clone() if n in self.mutated and isinstance(v, torch.Tensor) else v) for n, v in snap.items()}
        placeholders = iter(args or ())
        values, snapshots, outputs = {}, {}, None
        get = lambda name: env[self.by_name[name]]
        with torch.no_grad():
            for i in range(start, len(self.nodes)):
                if i in snapshot_at:
                    snapshots[i] = {m: (v.clone() if m in self.mutated and isinstance(v, torch.Tensor) else v)
                                    for m, v in env.items()}
                n = self.nodes[i]
                if n.op == "placeholder":
                    if resume is not None:
                        raise ValueError("cannot resume before a placeholder")
                    env[n] = next(placeholders)
                    continue
                if n.op == "output":
                    outputs = fx.node.map_arg(n.args[0], env.__getitem__)
                    break
                if n.name in replace:
                    v = replace[n.name][0](get)
                elif n.op == "get_attr":
                    v = self.attrs[n]
                else:
                    a, kw = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                    if n.op == "call_function":
                        v = n.target(*a, **kw)
                    elif n.op == "call_module":
                        v = self.gm.get_submodule(n.target)(*a, **kw)
                    else:  # call_method
                        v = getattr(a[0], n.target)(*a[1:], **kw)
                if n.name in patches:
                    v = patches[n.name][0](v, get)
                env[n] = v
                if n in keep:  # a copy when a later in-place op would overwrite it
                    values[n.name] = v.clone() if n in self.mutated and isinstance(v, torch.Tensor) else v
                for arg in n.all_input_nodes:
                    if last[arg] <= i and arg not in keep:
                        env.pop(arg, None)
        flat = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        return RunResult(flat, values, snapshots)

