"""`heal`: a short distillation that lets a pruned program recover what elimination cost it.

Contract: after drop-attention / drop-mlp / drop-blocks / prune-heads, the remaining float weights
are trained for a few steps to imitate the program as it entered the pipeline (the teacher,
`ctx.original`, which the Pipeline keeps because this pass declares `needs_original`):

  causal LMs  KL(teacher || student) of the next-token distributions, every position (the
              distillation of "ShortGPT" / "LLM-Streamline"-style layer pruning, on logits)
  encoders    mean squared error of the hidden states (`last_hidden_state`, else the first output),
              divided by the teacher's mean square, every token

on `samples` windows of calibration text (`text_file=FILE`, default the calibration text of
tcc.compress.calibration - the second half of $TCC_CALIBRATION_TEXT or tcc/data/calibration.txt), one window per step,
in a fixed order (`seed`), with AdamW (`lr`, cosine decay to 0 over `steps`, gradient norm clipped
to 1). `train=all` trains every float parameter, `train=norms` only the normalisation weights and
biases (cheap, and much less able to overfit). The graph is not changed - only parameter values -
so the compiled artifact's size and speed are those of the pruned program. Weights the `sparsify`
pass annotated keep their zeros: after every optimizer step the pruned entries are set back to 0,
so the pattern (and what the backend does with it) survives healing.

Checked, not assumed: before and after, on `eval_samples` held-out windows (drawn with the
training windows, never trained on) the pass measures the distillation loss and, for causal LMs,
the perplexity of the next token (for encoders: cosine similarity of the mean-pooled output to
the teacher's). When healing did not lower the held-out distillation loss, or produced a
non-finite loss, the weights from before are restored and the record says so.

Quantization-aware healing: after `quantize` (int4 tcc::dense_w4, int8 tcc::dense_w8 / dense_a8w8,
int8 embedding tables tcc::embedding_w8) heal trains THROUGH the quantizer, e.g.
`quantize(weights=int4,group=128,method=gptq),heal(steps=100)`. Each quantized weight gets a float
master copy, its dequantized value codes x scales; the forward computes every quantized layer with its
master quantize-dequantized on the layer's own grid (same group, sym/asym/float zero, bits; int8
activations of W8A8 / W4A8 fake-quantized the way the op quantizes them), rounding with a
straight-through gradient (tcc.compress.quantization.fake_quantize); `scales=fixed` (default) keeps
the stored scales and zero points, `scales=learn` trains the scales too (rounded to the stored dtype,
float16 for int4, at the end). After training the codes are re-derived from the masters with those
scales and written back into the layers' own buffers: same format, bytes and kernels, the codes on the
grid by construction. Float parameters (norms, biases, a float embedding / lm head) train as
without quantization (`train=norms`: only the norms; the quantized weights stay as they are). The
held-out check runs the real quantized program (its ops, the new codes) before and after; codes and
scales are restored with the float weights when the loss did not drop. bf16 weights are refused.
On SmolLM2 int4 (docs/BENCHMARKS.md) code_lr 0.01 diverged in 40 steps (codes crossing their rounding
edges together; restored), 0.002 for 20 steps changed no code and healed through the float parameters.

Time: stops after `steps` steps or `max_seconds` seconds of training, whichever comes first (the
record says which; a run stopped by time is not reproducible, one stopped by steps is). Progress
bar per step. Needs the teacher: run it in a Pipeline, after the passes whose damage it heals.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from tcc.compress.calibration import CalibrationLoss, text_feeds
from tcc.compress.quantization import Grid, fake_quantize
from tcc.ir.ops import pack_int4, quantize_blocks, quantize_rows, unpack_int4
from tcc.ir.graph import BIAS_AT
from tcc.ir.structure import is_causal_lm
from tcc.errors import UserError
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program, attribute
from tcc.progress import track

NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm"}
tcc_ops = torch.ops.tcc
QUANTIZED = {tcc_ops.dense_w4.default: "w4", tcc_ops.dense_w8.default: "w8", tcc_ops.dense_a8w8.default: "a8w8",
             tcc_ops.embedding_w8.default: "e8"}  # the ops heal trains through; arguments as in tcc/ir/ops.py


@register
class Heal(Pass):
    """Distil the pruned program from the program before the pipeline, on calibration text."""

    name = "heal"
    kind = "transform"
    writes_weights = True  # in place (Pipeline.run; Program.clone)
    needs_original = True
    renamed = {"budget": "max_seconds"}  # its name until issue 16 (budget = the accuracy budget only)
    options = {
        "steps": Option(int, 100, "training steps, one calibration window each",
                        validator=lambda v: None if v >= 1 else "must be >= 1"),
        "max_seconds": Option(float, 600.0, "stop training after this many seconds (0: no time limit)",
                         validator=lambda v: None if v >= 0 else "must be >= 0"),
        "lr": Option(float, 1e-4, "AdamW learning rate (cosine decay to 0 over the steps)",
                     validator=lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
        "train": Option(str, "all", "which parameters to train", choices=("all", "norms")),
        "samples": Option(int, 64, "calibration windows to train on (cycled when steps exceed them)",
                          validator=lambda v: None if v >= 1 else "must be >= 1"),
        "eval_samples": Option(int, 4, "held-out windows to measure before and after",
                               validator=lambda v: None if v >= 1 else "must be >= 1"),
        "text_file": Option(str, "", "calibration text file (default: $TCC_CALIBRATION_TEXT, else tcc's own, tcc/data/calibration.txt)"),
        "seed": Option(int, 0, "window choice and order"),
        "code_lr": Option(float, 0.002, "quantized layers: learning rate of their float masters, in code steps "
                          "(w / scale; cosine decay like lr)", validator=lambda v: None if 0 < v < 1 else "must be in (0, 1)"),
        "scales": Option(str, "fixed", "quantized layers: keep their scales, or train them with the weights (SmolLM2 "
                         "int4 g128 GPTQ: learn, code_lr=0.001: perplexity +13.7 % -> +7.8 % in 160 steps, +4.5 % in 600)",
                         choices=("fixed", "learn")),
    }

    # -- contract -----------------------------------------------------------------------------------
    def requires(self, program: Program) -> None:
        bf16 = sorted({n.target.name() for n in program.gm.graph.nodes
                       if n.op == "call_function" and n.target in (tcc_ops.dense_bf16.default,
                                                                  tcc_ops.embedding_bf16.default)})
        if bf16:
            raise UserError(f"heal found bf16 layers ({', '.join(bf16)}): it trains float32 weights and int8 / int4 "
                            "quantized layers, not bf16 ones", "put heal before the bf16 conversion in the pipeline")

    def run(self, program: Program, ctx: PassContext) -> Program:
        teacher = ctx.original
        if teacher is None:
            raise UserError("heal needs the program from before the pipeline to distil from",
                            "run it inside a pipeline (tcc compile --pipeline '...,heal' or Pipeline.parse(...).run)")
        if [s.name for s in teacher.inputs] != [s.name for s in program.inputs] or \
                [tuple(s.shape) for s in teacher.outputs] != [tuple(s.shape) for s in program.outputs]:
            raise UserError("heal: the program's inputs or output shapes differ from the original's, so it cannot "
                            "be distilled from it")
        # -- match: the data and the parameters ------------------------------------------------------
        train_feeds, eval_feeds, source = self._feeds(program, ctx)
        params = self._parameters(program)
        qat = _QuantizedWeights(program, learn_scales=self.scales == "learn" and self.train == "all", original=teacher)
        if not qat.weights:
            qat = None
        elif self.train == "all":  # train=norms: the gradient passes through the quantized layers, unchanged
            params.update(qat.parameters())
        if not params:
            raise UserError(f"heal(train={self.train}) found no float parameters to train")
        causal = is_causal_lm(program)
        targets = [self._target(teacher, f, causal) for f in eval_feeds]
        before = self._measure(program, teacher, eval_feeds, targets, causal)
        saved = {name: p.detach().clone() for name, p in params.items()}
        saved_buffers = qat.save() if qat else None
        sparse = {name: p != 0 for name, p in params.items() if "sparsity" in program.annotations.get(name, {})}

        # -- rewrite: train ---------------------------------------------------------------------------
        torch.manual_seed(self.seed)
        is_master = {k: k.startswith(_QuantizedWeights.PREFIX) and not k.endswith(".gain") for k in params}
        codes = [p for k, p in params.items() if is_master[k]]
        rest = [p for k, p in params.items() if not is_master[k]]
        opt = torch.optim.AdamW([{"params": rest}] + ([{"params": codes, "lr": self.code_lr}] if codes else []),
                                lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        for p in params.values():
            p.requires_grad_(True)
        t0, steps_done, stopped, losses = time.perf_counter(), 0, "steps", []
        try:
            for step in track(range(self.steps), f"heal: distilling ({self.train} parameters)", total=self.steps):
                feed = train_feeds[step % len(train_feeds)]
                target = self._target(teacher, feed, causal)
                loss = self._loss(self._forward(program, feed, grad=True, qat=qat), target, causal)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for name, keep in sparse.items():  # pruned weights stay pruned
                        params[name].mul_(keep)
                steps_done += 1
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    stopped = "non-finite loss"
                    break
                if self.max_seconds and time.perf_counter() - t0 > self.max_seconds:
                    stopped = "time limit"
                    break
        finally:
            for p in params.values():
                p.requires_grad_(False)
                p.grad = None
        seconds = time.perf_counter() - t0
        changed_codes = qat.write_codes() if qat else None  # the masters' codes into the layers' buffers

        # -- verify: measure on held-out windows, keep only an improvement -----------------------------
        after = self._measure(program, teacher, eval_feeds, targets, causal)
        kept = stopped != "non-finite loss" and math.isfinite(after["distill_loss"]) \
            and after["distill_loss"] < before["distill_loss"]
        if not kept:
            with torch.no_grad():
                for name, p in params.items():
                    if name in saved:
                        p.copy_(saved[name])
            if qat:
                qat.restore(saved_buffers)
        if qat:
            ctx.note(quantized_layers=len(qat.weights), scales=self.scales,
                     codes_changed=changed_codes if kept else 0)
        params = {k: v for k, v in params.items() if not k.startswith(_QuantizedWeights.PREFIX)}
        ctx.note(steps=steps_done, stopped_by=stopped, seconds=round(seconds, 1), train=self.train,
                 parameters=sum(p.numel() for p in params.values()), data=source,
                 sparse_weights_kept_zero=len(sparse),
                 train_loss_first_last=[round(losses[0], 5), round(losses[-1], 5)] if losses else None,
                 held_out_before=before, held_out_after=after,
                 result="healed" if kept else "restored the weights from before healing (held-out distillation "
                                              "loss did not improve)")
        return program

    # -- pieces ------------------------------------------------------------------------------------------
    def _feeds(self, program: Program, ctx: PassContext) -> tuple[list, list, str]:
        n = self.samples + self.eval_samples
        if program.tokenizer_dir:
            feeds = text_feeds(program, self.text_file or None, n_samples=n, seed=self.seed)
            source = f"{n} windows of {self.text_file or 'the calibration text'}"
        elif len(ctx.calibration) >= 2:
            feeds = list(ctx.calibration)
            source = f"the {len(feeds)} calibration feeds of the pipeline"
        else:
            raise UserError("heal needs calibration text (the model has no tokenizer) or at least 2 calibration feeds",
                            "give the model's tokenizer (--tokenizer DIR), calibration token ids "
                            "(--calibration ids.npy), or calibration feeds (Python: PassContext(calibration=[...]))")
        n_eval = min(self.eval_samples, max(1, len(feeds) // 4)) if not program.tokenizer_dir else self.eval_samples
        order = np.random.default_rng(self.seed).permutation(len(feeds))
        feeds = [feeds[i] for i in order]
        return feeds[n_eval:], feeds[:n_eval], source

    def _parameters(self, program: Program) -> dict[str, torch.nn.Parameter]:
        params = {name: p for name, p in program.gm.named_parameters() if p.is_floating_point()}
        if self.train == "all":
            return params
        norm_weights = set()
        for n in program.gm.graph.nodes:  # layer norms are single ops; RMSNorm is found by structure
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if n.op == "call_function" and name in NORM_OPS:
                norm_weights |= {a.target for a in n.all_input_nodes if a.op == "get_attr"}
        info = program.info
        subs = [s for b in (info.blocks if info else []) for s in (b.attention, b.mlp) if s is not None]
        norms = [getattr(s, k) for s in subs for k in ("norm", "out_norm")] + [info and info.final_norm]
        norm_weights |= {nm.weight for nm in norms if nm is not None and nm.weight}
        norm_weights |= {w.rpartition(".")[0] + ".bias" for w in norm_weights}
        return {k: v for k, v in params.items() if k in norm_weights}

    @staticmethod
    def _forward(program: Program, feed: dict, grad: bool, qat: _QuantizedWeights | None = None) -> torch.Tensor:
        args = [torch.from_numpy(s.check(feed[s.name])) for s in program.inputs]
        with torch.set_grad_enabled(grad):
            out = program.gm(*args) if qat is None else _ThroughQuantizer(program.gm, qat).run(*args)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        names = [s.name for s in program.outputs]
        key = next((k for k in ("logits", "last_hidden_state") if k in names), names[0])
        return out[names.index(key)].to(torch.float32)

    def _target(self, teacher: Program, feed: dict, causal: bool) -> torch.Tensor:
        t = self._forward(teacher, feed, grad=False)
        return torch.log_softmax(t, dim=-1) if causal else t

    @staticmethod
    def _loss(out: torch.Tensor, target: torch.Tensor, causal: bool) -> torch.Tensor:
        if causal:
            logp = torch.log_softmax(out, dim=-1).reshape(-1, out.shape[-1])
            return F.kl_div(logp, target.reshape(-1, out.shape[-1]), log_target=True, reduction="batchmean")
        return ((out - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)

    def _measure(self, program: Program, teacher: Program, feeds: list, targets: list, causal: bool) -> dict:
        with torch.no_grad():
            outs = [self._forward(program, f, grad=False) for f in feeds]
            distill = float(np.mean([float(self._loss(o, t, causal)) for o, t in zip(outs, targets)]))
        calib = CalibrationLoss(teacher, feeds)
        loss = calib([{("logits" if causal else "last_hidden_state"): o.numpy()} for o in outs])
        result = {"distill_loss": round(distill, 6)}
        if causal:
            result["perplexity"] = round(math.exp(loss), 4)
        else:
            result["cosine"] = round(1 - loss, 6)
        return result


# -- training through the quantizer --------------------------------------------------------------------

class _Weight:
    """One quantized weight (its codes buffer may feed several nodes): the float master, the grid, scale, zero."""

    def __init__(self, gm, node: fx.Node, kind: str, learn_scale: bool, original: torch.Tensor | None):
        qw_node, scale_node = node.args[1], node.args[2]
        self.codes_target, self.scale_target = qw_node.target, scale_node.target
        self.kind, self.qw, stored = kind, attribute(gm, qw_node.target), attribute(gm, scale_node.target)
        self.stored_scale = stored
        if kind == "w4":
            zero_node, self.group = node.args[3], node.args[4]
            zero = attribute(gm, zero_node.target) if isinstance(zero_node, fx.Node) else None
            self.grid = Grid("int4", sym=zero is None, float_zero=zero is not None and zero.is_floating_point())
            self.zero = None if zero is None else zero.to(torch.float32)
            k = self.qw.shape[1] * 2
            codes = unpack_int4(self.qw, k).to(torch.float32)
        else:
            self.grid, self.zero, self.group = Grid("int8"), None, self.qw.shape[1]
            codes = self.qw.to(torch.float32)
        scale = stored.to(torch.float32).reshape(self.qw.shape[0], -1)
        zero = self.zero if self.zero is not None else torch.full_like(scale, 8.0 if kind == "w4" else 0.0)
        n = scale.shape[0]
        # the master in code units (w / scale): Adam's steps are then a fraction of a code everywhere
        u = codes.reshape(n, scale.shape[1], -1) - zero[..., None]
        if original is not None and original.shape == codes.shape:
            # where the weight before quantization is known (same name and shape in the original program),
            # the master starts at its place within the code's rounding interval: the codes are unchanged,
            # but the weights GPTQ / rounding left near an edge flip first (not all at once)
            w = original.detach().to(torch.float32).reshape(u.shape) / scale[..., None]
            u = u + (w - u).clamp(-0.45, 0.45).nan_to_num(0.0)
        self.master = torch.nn.Parameter(u.reshape(codes.shape))
        self.base_scale = scale
        # scales=learn: a factor per scale (1 at the start), trained at heal's lr
        self.gain = torch.nn.Parameter(torch.ones_like(scale), requires_grad=False) if learn_scale else None

    @property
    def scale(self) -> torch.Tensor:
        return self.base_scale if self.gain is None else self.base_scale * self.gain

    def _weight(self, scale: torch.Tensor) -> torch.Tensor:
        n, groups = scale.shape
        return (self.master.reshape(n, groups, -1) * scale[..., None]).reshape(self.master.shape)

    def value(self) -> torch.Tensor:
        scale = self.scale.clamp_min(1e-12)
        return fake_quantize(self._weight(scale), self.grid, scale, self.zero)

    def write(self) -> int:
        """The master's codes (and, learnt, the scale as stored) into the buffers; how many codes changed."""
        with torch.no_grad():
            self.stored_scale.copy_(self.scale.reshape(self.stored_scale.shape))
            scale = self.stored_scale.to(torch.float32).reshape(self.qw.shape[0], -1)
            rows = scale.numel()
            zero = (self.zero.reshape(-1) if self.zero is not None else
                    torch.full((rows,), 8.0 if self.kind == "w4" else 0.0))
            codes = self.grid.codes(self._weight(scale).reshape(rows, -1), scale.reshape(-1), zero).reshape(self.master.shape)
            new = pack_int4(codes) if self.kind == "w4" else codes.to(torch.int8)
            changed = int((unpack_int4(self.qw, codes.shape[1]) != codes.to(torch.uint8)).sum()) \
                if self.kind == "w4" else int((self.qw != new).sum())
            self.qw.copy_(new)
        return changed


class _QuantizedWeights:
    """Every quantized weight of a program, keyed by its codes buffer (ids of the tensors for the forward)."""

    PREFIX = "<quantized>."

    def __init__(self, program: Program, learn_scales: bool, original: Program | None = None):
        gm, self.weights, self.by_tensor = program.gm, {}, {}
        floats = dict(original.gm.named_parameters()) if original is not None else {}
        for n in gm.graph.nodes:
            kind = QUANTIZED.get(n.target) if n.op == "call_function" else None
            if kind is None or not (isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr"):
                continue
            if n.args[1].target not in self.weights:
                name = n.args[1].target
                w = _Weight(gm, n, kind, learn_scales, floats.get(name.rpartition("_")[0]))
                self.weights[w.codes_target] = w
                self.by_tensor[id(w.qw)] = w
        self.learn_scales = learn_scales

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        out = {self.PREFIX + t: w.master for t, w in self.weights.items()}
        if self.learn_scales:
            out.update({self.PREFIX + t + ".gain": w.gain for t, w in self.weights.items()})
        return out

    def save(self) -> dict:
        return {t: (w.qw.clone(), w.stored_scale.clone()) for t, w in self.weights.items()}

    def restore(self, saved: dict) -> None:
        with torch.no_grad():
            for t, (qw, scale) in saved.items():
                self.weights[t].qw.copy_(qw)
                self.weights[t].stored_scale.copy_(scale)

    def write_codes(self) -> int:
        return sum(w.write() for w in self.weights.values())


class _ThroughQuantizer(fx.Interpreter):
    """Runs the graph with every quantized layer computed from its master, fake-quantized (autograd-able)."""

    def __init__(self, gm, qat: _QuantizedWeights):
        super().__init__(gm)
        self.qat = qat

    def call_function(self, target, args, kwargs):
        kind = QUANTIZED.get(target)
        w = self.qat.by_tensor.get(id(args[1])) if kind else None
        if w is None:
            return super().call_function(target, args, kwargs)
        full = _arguments(target, args, kwargs)
        x, weight = full[0], w.value()
        if kind == "e8":
            return F.embedding(x, weight)
        b = full[BIAS_AT[target.name().replace("::", ".")]]
        if kind == "w4":
            if full[6] == "int8":
                x = _ste(x, quantize_blocks(x.to(torch.float32), full[4]).to(x.dtype))
        elif kind == "a8w8":  # x quantized per token (or with the static x_scale / x_zero), as the op does
            x_scale, x_zero, asym = full[4], full[5], full[6]
            q, s, z = quantize_rows(x.reshape(-1, x.shape[-1]), x_scale, x_zero, asym)
            x = _ste(x, ((q - z) * s).reshape(x.shape).to(x.dtype))
        return F.linear(x, weight.to(x.dtype), b)


def _arguments(target, args, kwargs) -> list:
    """The op's arguments in schema order, defaults filled in."""
    out = []
    for i, a in enumerate(target._schema.arguments):
        out.append(args[i] if i < len(args) else kwargs.get(a.name, a.default_value if a.has_default_value() else None))
    return out


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward, x's gradient in the backward (straight through)."""
    return x + (q - x).detach()
