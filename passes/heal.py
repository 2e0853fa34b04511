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

Time: stops after `steps` steps or `max_seconds` seconds of training, whichever comes first (the
record says which; a run stopped by time is not reproducible, one stopped by steps is). Progress
bar per step. Needs the teacher: run it in a Pipeline, after the passes whose damage it heals and
before quantization (quantized layers have no float weights to train; a UserError says so).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from tcc.compress.calibration import CalibrationLoss, text_feeds
from tcc.ir.structure import is_causal_lm
from tcc.errors import UserError
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program
from tcc.progress import track

NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm"}


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
    }

    # -- contract -----------------------------------------------------------------------------------
    def requires(self, program: Program) -> None:
        quantized = sorted({n.target.name() for n in program.gm.graph.nodes
                            if n.op == "call_function" and hasattr(n.target, "name")
                            and n.target.name().startswith("tcc::dense_")})
        if quantized:
            raise UserError(f"heal found quantized layers ({', '.join(quantized)}) that have no float weights to train",
                            "put heal before the quantization pass in the pipeline")

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
        if not params:
            raise UserError(f"heal(train={self.train}) found no float parameters to train")
        causal = is_causal_lm(program)
        targets = [self._target(teacher, f, causal) for f in eval_feeds]
        before = self._measure(program, teacher, eval_feeds, targets, causal)
        saved = {name: p.detach().clone() for name, p in params.items()}
        sparse = {name: p != 0 for name, p in params.items() if "sparsity" in program.annotations.get(name, {})}

        # -- rewrite: train ---------------------------------------------------------------------------
        torch.manual_seed(self.seed)
        opt = torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        for p in params.values():
            p.requires_grad_(True)
        t0, steps_done, stopped, losses = time.perf_counter(), 0, "steps", []
        try:
            for step in track(range(self.steps), f"heal: distilling ({self.train} parameters)", total=self.steps):
                feed = train_feeds[step % len(train_feeds)]
                target = self._target(teacher, feed, causal)
                loss = self._loss(self._forward(program, feed, grad=True), target, causal)
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

        # -- verify: measure on held-out windows, keep only an improvement -----------------------------
        after = self._measure(program, teacher, eval_feeds, targets, causal)
        kept = stopped != "non-finite loss" and math.isfinite(after["distill_loss"]) \
            and after["distill_loss"] < before["distill_loss"]
        if not kept:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
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
    def _forward(program: Program, feed: dict, grad: bool) -> torch.Tensor:
        args = [torch.from_numpy(s.check(feed[s.name])) for s in program.inputs]
        with torch.set_grad_enabled(grad):
            out = program.gm(*args)
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
