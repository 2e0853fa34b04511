"""Presets: named pipelines, the way llama-quantize, olive and optimum name their formats.

`tcc compile MODEL --preset q4` compiles with the preset's pipeline. A preset's name also stands
for its pipeline inside pipeline text, alone or among passes (`-p 'drop-blocks(count=2),q4'`):
Pipeline.parse expands it, so the manifest and the report hold the expanded passes (what ran).
A pass can never be named like a preset (pipeline.register refuses it). `tcc presets` lists them;
docs/PIPELINES.md "Presets" gives each one's measured trade-off with the docs/BENCHMARKS.md row
it comes from.
"""
from __future__ import annotations

import dataclasses
import difflib

from ..errors import UserError


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    pipeline: str          # pipeline text it expands to
    summary: str           # what it does, one line
    tradeoff: str          # what it costs and gains, measured (docs/BENCHMARKS.md), one line
    aliases: tuple = ()    # other names for it (llama.cpp's format names)


PRESETS = {p.name: p for p in (
    Preset("q8", "quantize(weights=int8,embeddings=true)",
           "int8 weights, one scale per output channel (rtn), fp32 activations; int8 embedding table",
           "0.25x the fp32 bytes at unchanged accuracy (SmolLM2 perplexity -0.3 %, MiniLM cosine 0.9995); "
           "not faster on CPU"),
    Preset("w8a8", "quantize(acts=int8,method=smoothquant,embeddings=true)",
           "int8 weights and per-token int8 activations after SmoothQuant (alpha picked on the calibration "
           "text): integer matrix products; int8 embedding table",
           "the fastest on x86: 2.2x (MiniLM) to 3.0x (SmolLM2) tcc fp32, 0.25-0.31x the bytes, "
           "SmolLM2 perplexity +1.9 %, MiniLM cosine 0.9975"),
    Preset("q4", "quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)",
           "int4 weights in groups of 32, asymmetric with fractional zero points (llama.cpp Q4_1's grid), "
           "fp32 activations; int8 embedding table",
           "0.19x the bytes, SmolLM2 decode 2.5x fp32 at its perplexity (its weights come from a Q4_1 file: "
           "this grid gives them back), MiniLM cosine 0.966; prefill not faster", aliases=("q4_1",)),
    Preset("q4-fast", "quantize(weights=int4,group=128,sym=false,method=gptq,embeddings=true)",
           "int4 weights in groups of 128 with zero points, fitted by GPTQ on the calibration text; "
           "int8 embedding table",
           "weight-only 4-bit for any target: SmolLM2 decode 3.7x fp32 (1.5x q4; w4a8 is 1.4x faster on a CPU), "
           "the smallest (0.16-0.20x the bytes); SmolLM2 perplexity +10 %, MiniLM cosine 0.977; compiles slower (GPTQ)"),
    Preset("w4a8", "quantize(weights=int4,group=128,sym=false,method=gptq,acts=int8,embeddings=true)",
           "int4 weights in groups of 128 with zero points, fitted by GPTQ, and per-block int8 activations: "
           "int4 x int8 integer dot products (AVX-512 VNNI or AVX2 on x86, sdot on arm64); int8 embedding table",
           "the fastest decode on a CPU (not CUDA): SmolLM2 decode 1.38x q4-fast and 1.27x w8a8, prefill as fast as "
           "w8a8 (2.9x q4-fast), q4-fast's bytes; SmolLM2 perplexity +13 %, MiniLM cosine 0.976; compiles slower (GPTQ)"),
    Preset("q4_0", "quantize(weights=int4,group=32,embeddings=true)",
           "int4 weights in groups of 32, symmetric: one scale per group, no zero point (llama.cpp Q4_0's grid); "
           "int8 embedding table",
           "0.16-0.20x the bytes, less accurate than q4: SmolLM2 perplexity +27 %, MiniLM cosine 0.956 (q4: 0.966)"),
)}
_BY_NAME = {n: p for p in PRESETS.values() for n in (p.name, *p.aliases)}


def names() -> list[str]:
    """Every preset name and alias."""
    return list(_BY_NAME)


def lookup(name: str) -> Preset | None:
    """The preset called `name` (or one of its aliases); None when there is none."""
    return _BY_NAME.get(name)


def get(name: str) -> Preset:
    """The preset called `name`; UserError listing the known ones otherwise."""
    preset = lookup(name)
    if preset is None:
        close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
        raise UserError(f"unknown preset '{name}'" + (f" (did you mean {close[0]}?)" if close else ""),
                        f"presets: {', '.join(names())}; `tcc presets` shows what each expands to")
    return preset


def matching(pipeline) -> str | None:
    """The name of the preset whose passes equal `pipeline`'s (a Pipeline or text) after the
    leading `dce`, if any: what `tcc info` shows beside an artifact's pipeline."""
    from . import Pipeline
    passes = [p for p in (Pipeline.parse(pipeline) if isinstance(pipeline, str) else pipeline) if p.name != "dce"]
    for preset in PRESETS.values():
        if passes == list(Pipeline.parse(preset.pipeline)):
            return preset.name
    return None
