"""Prints the structural-elimination tables of docs/BENCHMARKS.md (issue 4) and draws their plots.

    python benchmarks/elimination.py [--phase all|accuracy|latency|minilm|table] [--out build/elimination]
                                     [--counts 2 4 8 12 15] [--mlp-counts 2 4 8]
                                     [--block-counts 4 8] [--heal-steps 20]

SmolLM2-135M (30 blocks), for each part and each count N (attention: --counts; MLPs and whole
blocks: --mlp-counts, --block-counts, fewer, since each row costs minutes on 2 cores):
  analysis   `drop-<part>(count=N)` ranked by analyze-redundancy (input/output cosine similarity) on
             8 windows of the calibration text (second half of wikitext-2 valid.txt)
  +heal      the same, then `heal(steps=S)` (distillation from the unpruned model on calibration text)
  random     `drop-<part>(layers=[...])`, N blocks drawn at random from the same candidates
             (blocks 1..28: the first and last are kept, as keep_ends=true does), seeds 0, 1, 2
Perplexity on ../shared/data/wikitext-2/test.txt: the first --max-tokens tokens, windows of 128,
--stride 128 (not overlapping; 64 doubles the cost and lowers every figure a little), measured on the pruned Program in PyTorch (the compiled artifact matches the Program
within 1e-5 relative: `tcc compile` verifies it). Latency: the `analysis` pipeline compiled for
x86 (a healed program has the same graph and weight shapes, so the same latency), batch 1, seq 128,
min and median of --repeats calls after 3 warm-up calls, beside the same pruned Program in PyTorch
eager, and the unpruned model in ONNX Runtime fp32 - all in one process, one after the other.
MiniLM-L6: embedding cosine vs the original on 64 test.txt sentences for prune-heads(ratio=R) and
latency likewise.

Results are appended to OUT/results.jsonl as they come (a rerun skips what is there), the tables
printed as markdown, the plot written to docs/img/elimination_smollm2.png. Run on an idle machine
for the latency phase; accuracy does not depend on load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEST = (ROOT / ".." / "shared" / "data" / "wikitext-2" / "test.txt").resolve()
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))  # as docs/BENCHMARKS.md measured
PARTS = {"attention": "drop-attention", "mlp": "drop-mlp", "block": "drop-blocks"}


from _results import Results  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def counts_of(a, part: str) -> list[int]:
    return list({"attention": a.counts, "mlp": a.mlp_counts, "block": a.block_counts}[part])


# -- SmolLM2 accuracy ----------------------------------------------------------------------------------

def accuracy(res: Results, a) -> None:
    import tcc
    from tcc.evaluate import perplexity
    from tcc.passes.analyze_redundancy import analyze
    from tcc.compress.calibration import text_feeds
    from tcc.pipeline import PassContext, Pipeline

    base = tcc.trace("smollm2", seq_len=128)
    base = Pipeline.parse("dce").run(base)
    n_blocks = len(base.info.blocks)

    def ppl(program):
        return perplexity(program, base.tokenizer_dir, TEST, 128, a.max_tokens, a.stride)

    if not res.get(model="smollm2", part="none"):
        r = ppl(base)
        res.add({"model": "smollm2", "part": "none", "count": 0, "choice": "none", "perplexity": r["value"],
                 "tokens": r["tokens"], "param_bytes": base.param_bytes()})
    report = None
    for part, pass_name in PARTS.items():
        for count in counts_of(a, part):
            todo = [("analysis", f"{pass_name}(count={count})"), ("analysis+heal", f"{pass_name}(count={count}),"
                                                                                    f"heal(steps={a.heal_steps})")]
            rng_layers = {}
            for seed in a.seeds:
                rng = np.random.default_rng(1000 * seed + count)
                layers = sorted(rng.choice(np.arange(1, n_blocks - 1), size=count, replace=False).tolist())
                rng_layers[seed] = layers
                todo.append((f"random-{seed}", f"{pass_name}(layers={layers})"))
            for choice, text in todo:
                if res.get(model="smollm2", part=part, count=count, choice=choice):
                    continue
                if report is None:  # one analysis, shared by every analysis-guided choice
                    feeds = text_feeds(base, n_samples=8)
                    report = analyze(base, feeds, heads=False, loss=False, source="8 windows of valid.txt")
                ctx = PassContext(report={"analyze-redundancy": report}, check_feeds=1)
                t0 = time.perf_counter()
                program = Pipeline.parse(text).run(base.clone(), ctx)
                seconds = time.perf_counter() - t0
                details = {r["pass"]: r["details"] for r in ctx.records}
                dropped = [d["index"] for d in details[pass_name].get("dropped", [])]
                row = {"model": "smollm2", "part": part, "count": count, "choice": choice, "pipeline": text,
                       "dropped": dropped, "perplexity": ppl(program)["value"], "param_bytes": program.param_bytes(),
                       "pipeline_seconds": round(seconds, 1)}
                if "heal" in details:
                    h = details["heal"]
                    row["heal"] = {k: h[k] for k in ("steps", "seconds", "held_out_before", "held_out_after", "result")}
                res.add(row)


# -- latency ---------------------------------------------------------------------------------------------

def time_min(fn, feeds, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.min(times)), float(np.median(times))


def compile_all(a, model: str, configs: list[tuple[str, int, str]]) -> None:
    """Compile every config's artifact (kept when OUT/<model>-<part>-<count> already has one), so
    that the timed phase can run later on an idle machine."""
    import tcc

    for part, count, text in configs:
        out = Path(a.out) / f"{model}-{part}-{count}"
        if (out / "manifest.json").exists():
            continue
        t0 = time.perf_counter()
        tcc.compile(model, "native", out=out, pipeline=text, seq_len=128).close()
        (out / "compile_seconds").write_text(f"{time.perf_counter() - t0:.1f}")


def latency(res: Results, a, model: str, configs: list[tuple[str, int, str]]) -> None:
    """configs: (part, count, pipeline); the compiled artifact timed beside the same pruned Program
    in PyTorch, and the unpruned model in ONNX Runtime."""
    import tcc
    from tcc.backends.onnxruntime import reference_session
    from tcc.pipeline import Pipeline, estimate_flops

    compile_all(a, model, configs)
    base = tcc.trace(model, seq_len=128)
    feeds = base.example_inputs()
    if not res.get(model=model, kind="latency", part="ort"):
        ort = reference_session(base)
        mn, med = time_min(ort, feeds, a.repeats)
        res.add({"model": model, "kind": "latency", "part": "ort", "count": 0, "min_ms": mn, "median_ms": med})
    for part, count, text in configs:
        if res.get(model=model, kind="latency", part=part, count=count):
            continue
        out = Path(a.out) / f"{model}-{part}-{count}"
        manifest = json.loads((out / "manifest.json").read_text())
        program = Pipeline.parse(text).run(base.clone()) if text else base  # one trace per model
        art = tcc.load(out)
        t_mn, t_med = time_min(art, feeds, a.repeats)
        p_mn, p_med = time_min(program, feeds, a.repeats)
        art.close()
        res.add({"model": model, "kind": "latency", "part": part, "count": count, "pipeline": text,
                 "tcc_min_ms": t_mn, "tcc_median_ms": t_med, "pytorch_min_ms": p_mn, "pytorch_median_ms": p_med,
                 "weight_bytes": manifest["sizes"]["weight_bytes"], "flops": estimate_flops(program.gm),
                 "compile_s": float((out / "compile_seconds").read_text()) if (out / "compile_seconds").exists() else None,
                 "verify": manifest.get("run", {}).get("verify")})


# -- MiniLM heads --------------------------------------------------------------------------------------------

MINILM_RATIOS = (0.25, 0.5)


def minilm(res: Results, a) -> None:
    import tcc
    from tcc.evaluate import cosine
    from tcc.pipeline import Pipeline

    base = tcc.trace("minilm", seq_len=128)
    for ratio in (0.0, *MINILM_RATIOS):
        if res.get(model="minilm", part="heads", ratio=ratio):
            continue
        program = Pipeline.parse(f"prune-heads(ratio={ratio})").run(base.clone()) if ratio else base
        r = cosine(program, base, base.tokenizer_dir, TEST, 128, 64)
        res.add({"model": "minilm", "part": "heads", "ratio": ratio, "cosine": r["value"], "cosine_min": r["min"],
                 "param_bytes": program.param_bytes()})


# -- tables and plot ---------------------------------------------------------------------------------------

def tables(res: Results, a) -> str:
    lines = []
    base = res.get(model="smollm2", part="none")
    lat = {(r["part"], r["count"]): r for r in res.rows if r.get("kind") == "latency" and r["model"] == "smollm2"}
    l0 = lat.get(("none", 0))
    ort = res.get(model="smollm2", kind="latency", part="ort")
    if base:
        lines.append(f"SmolLM2-135M, perplexity on test.txt ({base['tokens']} tokens, window 128, stride {a.stride}); "
                     f"unpruned: {base['perplexity']:.2f}" + (f", tcc {l0['tcc_min_ms']:.1f} ms, PyTorch "
                                                              f"{l0['pytorch_min_ms']:.1f} ms, ONNX Runtime "
                                                              f"{ort['min_ms']:.1f} ms" if l0 and ort else ""))
        lines.append("")
    for part in PARTS:
        lines.append(f"| {part}s dropped | analysis | +heal | random (mean of 3; each) | layers (analysis) | "
                     "weights MB | GFLOP | tcc ms (min) | PyTorch ms (min) | FLOPs / latency vs unpruned |")
        lines.append("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for count in counts_of(a, part):
            g = res.get(model="smollm2", part=part, count=count, choice="analysis")
            if not g:
                continue
            h = res.get(model="smollm2", part=part, count=count, choice="analysis+heal")
            rnd = [res.get(model="smollm2", part=part, count=count, choice=f"random-{s}") for s in a.seeds]
            rnd = [r["perplexity"] for r in rnd if r]
            L = lat.get((part, count))
            lat_cells = (f"{L['weight_bytes'] / 1e6:.1f} | {L['flops'] / 1e9:.2f} | {L['tcc_min_ms']:.1f} | "
                         f"{L['pytorch_min_ms']:.1f} | {L['flops'] / l0['flops']:.2f}× / "
                         f"{L['tcc_min_ms'] / l0['tcc_min_ms']:.2f}×") if L and l0 else \
                f"{g['param_bytes'] / 1e6:.1f} | – | – | – | –"
            lines.append(f"| {count} | {_p(g['perplexity'])} | {_p(h['perplexity']) if h else '–'} | "
                         f"{_p(np.mean(rnd)) if rnd else '–'} ({', '.join(_p(x) for x in rnd)}) | "
                         f"{g['dropped']} | {lat_cells} |")
        lines.append("")
    m = [res.get(model="minilm", part="heads", ratio=r) for r in (0.0, *MINILM_RATIOS)]
    mlat = {r["count"]: r for r in res.rows if r.get("kind") == "latency" and r["model"] == "minilm" and r["part"] == "heads"}
    mort = res.get(model="minilm", kind="latency", part="ort")
    if all(m):
        lines.append("| MiniLM heads pruned | cosine vs original (mean / min, 64 sentences) | weights MB | GFLOP | "
                     "tcc ms (min) | PyTorch ms (min) | FLOPs / latency vs unpruned |")
        lines.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in m:
            L, L0 = mlat.get(int(r["ratio"] * 100)), mlat.get(0)
            cells = (f"{L['weight_bytes'] / 1e6:.1f} | {L['flops'] / 1e9:.2f} | {L['tcc_min_ms']:.1f} | "
                     f"{L['pytorch_min_ms']:.1f} | {L['flops'] / L0['flops']:.2f}× / "
                     f"{L['tcc_min_ms'] / L0['tcc_min_ms']:.2f}×") if L and L0 else "– | – | – | – | –"
            lines.append(f"| {r['ratio']:.0%} | {r['cosine']:.4f} / {r['cosine_min']:.4f} | {cells} |")
        if mort:
            lines.append(f"\nMiniLM unpruned in ONNX Runtime fp32, same run: {mort['min_ms']:.1f} ms (min).")
    return "\n".join(lines)


def _p(v: float) -> str:
    return f"{v:.2f}" if v < 1000 else f"{v:.3g}"


def plot(res: Results, a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = res.get(model="smollm2", part="none")
    if not base:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, part in zip(axes, PARTS):
        counts = [0] + counts_of(a, part)
        for choice, style in (("analysis", "o-"), ("analysis+heal", "s-"), ("random", "x--")):
            ys = []
            for c in counts:
                if c == 0:
                    ys.append(base["perplexity"])
                    continue
                if choice == "random":
                    vals = [res.get(model="smollm2", part=part, count=c, choice=f"random-{s}") for s in a.seeds]
                    vals = [v["perplexity"] for v in vals if v]
                    ys.append(np.mean(vals) if vals else np.nan)
                else:
                    r = res.get(model="smollm2", part=part, count=c, choice=choice)
                    ys.append(r["perplexity"] if r else np.nan)
            ax.plot(counts, ys, style, label=choice if choice != "random" else "random (mean of 3)")
        ax.set_yscale("log")
        ax.set_title(f"SmolLM2-135M: {part}s dropped (of 30)")
        ax.set_xlabel("dropped")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test.txt perplexity (log)")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", default="all", choices=("all", "accuracy", "compile", "latency", "minilm", "table"))
    ap.add_argument("--out", default="build/elimination")
    ap.add_argument("--counts", nargs="+", type=int, default=[2, 4, 8, 12, 15])
    ap.add_argument("--mlp-counts", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--block-counts", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--heal-steps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=128, help="perplexity window stride (128: windows do not overlap)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    if a.phase in ("all", "accuracy"):
        accuracy(res, a)
    if a.phase in ("all", "minilm"):
        minilm(res, a)
    smollm2 = [("none", 0, "")] + [(p, c, f"{PARTS[p]}(count={c})") for p in PARTS for c in counts_of(a, p)]
    minilm_cfgs = [("heads", int(r * 100), f"prune-heads(ratio={r})" if r else "") for r in (0.0, *MINILM_RATIOS)]
    if a.phase == "compile":
        compile_all(a, "smollm2", smollm2)
        compile_all(a, "minilm", minilm_cfgs)
    if a.phase in ("all", "latency"):
        latency(res, a, "smollm2", smollm2)
        latency(res, a, "minilm", minilm_cfgs)
    print(tables(res, a))
    plot(res, a, ROOT / "docs" / "img" / "elimination_smollm2.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
