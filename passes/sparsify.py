"""`sparsify`: zero weights in a pattern and annotate them, so that later passes and backends see it.

Contract. The linears inside the transformer blocks (ModelInfo.linears(): q/k/v/o or a fused qkv, the
MLP's projections; never embeddings or the lm head) whose weight is a float 2-D `get_attr` tensor
with at least `min_size` elements, that no `skip` glob matches (a module path or any dotted suffix of
it, as in quantize) and that nothing else reads, are pruned in place: the chosen entries become 0.0
and program.annotations[weight]["sparsity"] records the pattern (format: tcc/compress/sparsity.py). Shapes
and ops do not change; quantize later keeps the zeros exact and moves the annotation to its codes.

Patterns (`pattern`; W is [N out, K in]):
  unstructured  each output row prunes round(sparsity * K) entries (scope=layer)
  n:m           in every row each group of m consecutive input features keeps n (2:4, 4:8, any
                1 <= n < m: the layout sparse tensor cores take); the sparsity is (m - n) / m, so
                giving `sparsity` as anything else is an error (the pass's options then say
                sparsity=(m - n) / m); m must divide K
  block         blocks of `block`=RxC (R output rows x C input features), kept or pruned whole by the
                sum of their entries' scores, round(sparsity * K / C) in every row of blocks; R must
                divide N and C divide K

Methods (`method`), the score of W[i, j] (lowest pruned first):
  magnitude  |W_ij|; needs no calibration
  wanda      |W_ij| * ||X_j|| (Sun et al. 2024), ||X_j|| the L2 norm of input feature j over the
             calibration tokens of the program as it enters the pass
  sparsegpt  SparseGPT (Frantar & Alistarh 2023; tcc.compress.sparsity.sparsegpt): score w^2 / U_jj^2 (U the
             Cholesky factor of H^-1), and the weights not yet visited are updated to compensate each
             pruned one; H = X^T X + `damp` * mean(diag), column blocks of 128. Block by block
             (tcc.compress.quantization.blockwise, as quantize's gptq): block i's Hessians come from the inputs
             the program computes with blocks < i already pruned
Scope (`scope`): layer gives every layer `sparsity`; global (unstructured and block) gives each layer
the share of one threshold over all selected layers' scores, each divided by its layer's mean score
(tcc.compress.sparsity.allocate; sparsegpt allocates by Wanda's score), then prunes each layer at its share
as for layer. The overall sparsity is then `sparsity` within rounding; the layers' shares differ.

Calibration: ctx.calibration (every feed; the first `samples` if samples > 0), else `samples` (0: 16) windows of the default text
(tcc.compress.calibration.text_feeds) when the program has a tokenizer; wanda and sparsegpt need one of them,
magnitude none.

Checks (UserError naming the option): sparsity outside [0, 1); a pattern that is not unstructured,
n:m with 1 <= n < m, or block; a block that is not RxC; an n:m `sparsity` other than (m - n) / m;
scope=global with n:m; a layer whose K the m does not divide, or whose [N, K] the block does not
tile (the layer and its shape are named: skip it, or choose another m / block); a block linear that
is already quantized (sparsify before quantize); wanda / sparsegpt without calibration inputs.
After: every annotated tensor holds its pattern (tcc.compress.sparsity.violations) and is finite.

Notes: options, pattern, method, scope, calibration feeds, per layer {weight, module, shape,
sparsity (the pruned fraction), error (sparsegpt: ||(W - W')X|| / ||WX|| on its own inputs)},
overall sparsity (pruned / all weights of the pruned layers), skipped layers with the reason, and a
reminder that the zeros alone speed nothing up: the weights are still dense tensors; a backend with
a kernel for the pattern reads the annotation and decides.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from tcc.compress import sparsity as sp
from tcc.compress.calibration import pass_feeds, samples_option
from tcc.errors import InternalError, UserError
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program, attribute as _attr
from tcc.compress.quantization import InputStats, blockwise, collect_stats, glob_matches, output_error
from tcc.ir.graph import module_path

FLOAT_LINEARS = ("aten.linear", "tcc.dense")
SPEED_NOTE = ("zeros alone speed nothing up: the weights are still dense tensors; a backend with a kernel for "
              "the pattern reads the annotation and decides")


def _problem(parse, v: str) -> str | None:
    try:
        parse(v)
    except ValueError as e:
        return str(e)
    return None


@register
class Sparsify(Pass):
    """Prune block linears to unstructured, n:m or block sparsity (magnitude, wanda, sparsegpt) and
    annotate the pattern."""

    name = "sparsify"
    kind = "transform"
    writes_weights = True  # in place (Pipeline.run; Program.clone)
    options = {
        "pattern": Option(str, "unstructured", "unstructured, n:m (e.g. 2:4, 4:8) or block (shape: block=)",
                          validator=lambda v: _problem(sp.parse_pattern, v)),
        "sparsity": Option(float, 0.5, "fraction of weights to zero, in [0, 1) (n:m: set by the pattern)",
                           validator=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "block": Option(str, "1x16", "pattern=block: ROWSxCOLUMNS (output rows x input features), e.g. 1x16, 4x4",
                        validator=lambda v: _problem(sp.parse_block, v)),
        "method": Option(str, "magnitude", "how weights are scored", choices=("magnitude", "wanda", "sparsegpt")),
        "scope": Option(str, "layer", "layer: every layer at `sparsity`; global: one threshold over all layers' "
                        "normalised scores", choices=("layer", "global")),
        "samples": samples_option(),
        "damp": Option(float, 0.01, "SparseGPT damping, a fraction of the mean Hessian diagonal",
                       validator=lambda v: None if v > 0 else "must be > 0"),
        "min_size": Option(int, 4096, "prune weights with at least this many elements",
                           validator=lambda v: None if v >= 0 else "must be >= 0"),
        "skip": Option(list[str], [], "module-path globs to leave dense, e.g. [*.q_proj,layers.0.*]"),
    }

    def __init__(self, **opts):
        super().__init__(**opts)
        self.layout = sp.parse_pattern(self.pattern, self.block)
        fixed = self.layout.fixed_sparsity
        bad = lambda option, msg, hint: UserError(f"pass 'sparsify' option '{option}': {msg}", hint)
        if fixed is not None and "sparsity" in opts and abs(self.sparsity - fixed) > 1e-9:
            raise bad("sparsity", f"pattern={self.pattern} sets the sparsity to {fixed:g}, got sparsity={self.sparsity:g}",
                      f"drop sparsity, or choose an n:m with (m - n) / m = {self.sparsity:g}")
        if fixed is not None and self.scope == "global":
            raise bad("scope", f"scope=global does not apply to pattern={self.pattern} (every group keeps {self.layout.n})",
                      "use scope=layer, or pattern=unstructured / block")
        if fixed is not None:  # the pattern's own sparsity, so the pipeline text says what it does
            self.opts["sparsity"] = self.sparsity = fixed

    def run(self, program: Program, ctx: PassContext) -> Program:
        layers, skipped = match(program, self)
        ctx.note(options=dict(self.opts), pattern=self.layout.text, method=self.method, scope=self.scope,
                 skipped=skipped, speed=SPEED_NOTE)
        if not layers:
            ctx.logger.warning("sparsify: no block linear to prune")
            ctx.note(calibration={"feeds": 0}, layers=[], sparsity=0.0)
            return program
        feeds = self._feeds(program, ctx) if self.method != "magnitude" else []
        norms = input_norms(program, layers, feeds) if self.method == "wanda" or (
            self.method == "sparsegpt" and self.scope == "global") else {}
        shares = {l.weight: self.sparsity for l in layers}
        if self.scope == "global":
            shares = sp.allocate({l.weight: score(l, norms) for l in layers}, self.layout, self.sparsity)
        if self.method == "sparsegpt":
            prune_sparsegpt(program, layers, feeds, shares, self)
        else:
            for l in layers:
                prune(l, ~sp.keep_mask(score(l, norms), self.layout, shares[l.weight]))
        total = sum(l.pruned for l in layers)
        for l in layers:
            sp.annotate(program, l.weight, self.layout.annotation(l.pruned / l.size, self.method))
        ctx.note(calibration={"feeds": len(feeds)}, layers=[l.note() for l in layers],
                 sparsity=round(total / sum(l.size for l in layers), 6))
        return program

    def ensures(self, program: Program) -> None:
        broken = sp.violations(program)
        if broken:
            raise InternalError(f"sparsify: annotated tensors break their pattern: {broken}")

    def _feeds(self, program: Program, ctx: PassContext) -> list[dict]:
        if not ctx.calibration and not program.tokenizer_dir:
            raise UserError(f"pass 'sparsify' option 'method': method={self.method} needs calibration inputs "
                            "(the layers' activations) and there are none, nor a tokenizer to cut them from text",
                            "give calibration feeds (PassContext(calibration=...)), or use method=magnitude")
        return pass_feeds(program, ctx, self.samples)


# -- match ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Layer:
    weight: str  # get_attr target
    nodes: list[fx.Node]  # the linears reading it
    tensor: torch.Tensor  # the weight itself, pruned in place
    module: str
    pruned: int = 0  # entries the pass's mask zeroed
    error: float | None = None

    @property
    def size(self) -> int:
        return self.tensor.numel()

    def note(self) -> dict:
        out = {"weight": self.weight, "module": self.module, "shape": list(self.tensor.shape),
               "sparsity": round(self.pruned / self.size, 6)}
        return out if self.error is None else {**out, "error": round(self.error, 6)}


def match(program: Program, opts: Sparsify) -> tuple[list[Layer], list[dict]]:
    """The layers to prune (graph order) and the skipped ones with the reason."""
    gm = program.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    found: dict[str, list[fx.Node]] = {}
    skipped: list[dict] = []
    for lin in program.info.linears() if program.info else []:
        n = nodes.get(lin.node)
        if n is None:
            continue
        path = lin.module or module_path(n)
        skip = lambda reason: skipped.append({"module": path, "node": n.name, "reason": reason})
        if any(glob_matches(g, path) for g in opts.skip):
            skip("matches skip")
            continue
        if lin.op not in FLOAT_LINEARS:
            raise UserError(f"pass 'sparsify': layer {path or n.name} is already quantized ({lin.op}); pruning "
                            "needs its float weight", "sparsify before quantize: put sparsify(...) first in the pipeline")
        w = n.args[1] if len(n.args) > 1 else None
        t = _attr(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            skip("weight is not a stored 2-D float tensor")
        elif t.numel() < opts.min_size:
            skip(f"{t.numel()} weights < min_size={opts.min_size}")
        else:
            found.setdefault(w.target, []).append(n)
    readers: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, set()).update(n.users)
    layers = []
    for target, lins in found.items():
        path = module_path(lins[0]) or target
        others = readers[target] - set(lins)
        if others:
            skipped.append({"module": path, "node": lins[0].name,
                            "reason": f"weight '{target}' is also read by {sorted(u.name for u in others)}"})
            continue
        t = _attr(gm, target)
        problem = sp.shape_problem(opts.layout, tuple(t.shape))
        if problem:
            option = "block" if opts.layout.kind == "block" else "pattern"
            raise UserError(f"pass 'sparsify' option '{option}': layer {path} [{t.shape[0]}, {t.shape[1]}]: {problem}",
                            f"skip=[{path}] the layer, or choose a {'block shape' if option == 'block' else 'pattern'} "
                            "that divides it")
        layers.append(Layer(target, lins, t, path))
    return layers, skipped


# -- score and prune -----------------------------------------------------------------------------------

def input_norms(program: Program, layers: list[Layer], feeds: list[dict]) -> dict[str, torch.Tensor]:
    """{weight: ||X_j|| per input feature} over the feeds (one run of the program per feed)."""
    stats = {n.args[0].name: InputStats(l.tensor.shape[1]) for l in layers for n in l.nodes}
    collect_stats(program, feeds, stats, "sparsify: input norms")
    inputs = lambda l: {n.args[0].name for n in l.nodes}
    return {l.weight: sum(stats[x].sq_sum for x in inputs(l)).sqrt().to(torch.float32) for l in layers}


def score(layer: Layer, norms: dict[str, torch.Tensor]) -> torch.Tensor:
    """|W|, times ||X_j|| when the norms are known (Wanda)."""
    w = layer.tensor.detach().abs().to(torch.float32)
    return w * norms[layer.weight][None, :] if layer.weight in norms else w


@torch.no_grad()
def prune(layer: Layer, mask: torch.Tensor) -> None:
    layer.tensor.masked_fill_(mask, 0.0)
    layer.pruned = int(mask.sum())


def prune_sparsegpt(program: Program, layers: list[Layer], feeds: list[dict], shares: dict[str, float],
                    opts: Sparsify) -> None:
    """SparseGPT layer by layer, block by block, each on inputs from the blocks before it already pruned."""
    def stats_for(here):
        return {n.args[0].name: InputStats(l.tensor.shape[1], hessian=True) for l in here for n in l.nodes}

    def process(here, stats):
        for l in here:
            h = sum(stats[x].H for x in {n.args[0].name for n in l.nodes})
            before = l.tensor.detach().to(torch.float32).clone()
            after, mask = sp.sparsegpt(before, h, opts.layout, shares[l.weight], opts.damp)
            with torch.no_grad():
                l.tensor.copy_(after)
            l.pruned, l.error = int(mask.sum()), output_error(before, after, h)
        return {}  # the weights changed in place: the program computes with them from now on

    blockwise(program, layers, feeds, stats_for, process, "sparsify: sparsegpt inputs")

