"""The calibration-statistics cache (tcc.cache describes its key): InputStats of named graph nodes
(tcc.compress.quantization) stored in safetensors, keyed by the Program, the feeds and what is collected.
"""
from __future__ import annotations

from pathlib import Path

from ..store import _load_tensors, _read, _save_tensors, _write, enabled, feeds_hash, key, source_hash


_STAT_FIELDS = ("abs_sum", "abs_max", "sq_sum", "H", "H_blocks", "top", "bottom")


def stats_key(program, feeds: list[dict], stats: dict) -> str:
    spec = {name: [st.k, st.H is not None, st.blocks, st.percentile, st.signed, st.feeds] for name, st in stats.items()}
    return key("stats", program.fingerprint(), feeds_hash(feeds), spec, source_hash("stats"))


def load_stats(program, feeds: list[dict], stats: dict) -> bool:
    """Fill `stats` ({node name: InputStats}, freshly made) from the cache; True on a hit."""
    if not enabled():
        return False

    def load(d: Path, meta: dict) -> bool:
        groups = _load_tensors(d / "stats.safetensors", meta["layout"])
        for name, st in stats.items():
            for field in _STAT_FIELDS:
                if f"{name}.{field}" in groups.get("stats", {}):
                    setattr(st, field, groups["stats"][f"{name}.{field}"])
            st.tokens, st.topk = meta["counts"][name]
        return True
    return bool(_read("stats", stats_key(program, feeds, stats), load))


def save_stats(program, feeds: list[dict], stats: dict) -> None:
    """Store `stats` after they were collected on `feeds` with `program`."""
    if not enabled():
        return

    def save(d: Path) -> dict:
        tensors = {f"{name}.{field}": getattr(st, field) for name, st in stats.items() for field in _STAT_FIELDS
                   if getattr(st, field) is not None}
        layout = _save_tensors(d / "stats.safetensors", {"stats": tensors})
        return {"layout": layout, "counts": {name: [st.tokens, st.topk] for name, st in stats.items()}}
    _write("stats", stats_key(program, feeds, stats), save)
