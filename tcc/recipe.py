"""Recipes: the settings of one compile in a TOML file, for `tcc compile --recipe FILE.toml [MODEL] [flags]`.

    model = "minilm"              # optional: an alias, a Hugging Face folder or a .gguf file
    target = "x86"                # the --flags of `tcc compile`, spelled with underscores
    seq_len = 128
    batch = 1
    task = "feature-extraction"
    backend = "tvm"
    output = "build/minilm-w8a8"
    max_drift = 0.05
    pipeline = "quantize(weights=int8,acts=int8)"   # pipeline text, or a list of pass tables:
    #   [[pipeline]]
    #   pass = "quantize"
    #   weights = "int8"
    [calibration]
    text = "data/calibration.txt"
    samples = 8
    [budget]                      # handed to the accuracy-budget search, as its flags would be
    max_accuracy_drop = "1%"      # --max-accuracy-drop
    objective = "latency"         # --objective
    time = "20m"                  # --time-limit

Relative paths (model when it is not an alias, output, calibration.text) are relative to the
directory holding the recipe, so a recipe means the same from any working directory.

load(path) -> Recipe reads and validates a file: a missing or malformed file, an unknown key (named,
with the valid ones), a value of the wrong type, or a pipeline that does not parse (unknown pass or
option) raises UserError naming the recipe and the key.
Recipe.model      the model, or None
Recipe.settings   {`tcc compile` flag: value as text}, e.g. {"--seq-len": "128", "--max-accuracy-drop": "1%"};
                  the CLI parses them in front of the flags on the command line, so flags given
                  explicitly win and recipe values get the flags' own parsing and checks.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError
from .frontends.models import ALIASES

# key -> (flag, type, description); None flag = handled specially
TOP = {
    "model": (None, str, "a model alias, Hugging Face folder or .gguf file"),
    "target": ("--target", str, "a target name, e.g. x86 or arm64"),
    "seq_len": ("--seq-len", int, "a positive integer"),
    "batch": ("--batch", int, "a positive integer"),
    "task": ("--task", str, "feature-extraction, causal-lm or image-feature-extraction"),
    "backend": ("--backend", str, "tvm or onnxruntime"),
    "output": ("--output", str, "an artifact directory"),
    "max_drift": ("--max-drift", float, "a number >= 0 (max relative error vs the source model)"),
    "max_context": ("--max-context", int, "a positive integer (KV-cache positions of a causal LM's prefill/decode)"),
    "dtype": ("--dtype", str, "fp32 or bf16 (the float weights' storage; default: the checkpoint's)"),
    "pipeline": (None, (str, list), "pipeline text or a list of pass tables"),
    "calibration": (None, dict, "a table with text and samples"),
    "budget": (None, dict, "a table with max_accuracy_drop, objective and time"),
}
CALIBRATION = {"text": ("--calibration", str, "a text file"), "samples": ("--calibration-samples", int, "a positive integer")}
BUDGET = {"max_accuracy_drop": ("--max-accuracy-drop", (str, float, int), "an accuracy drop, e.g. 0.01 or \"1%\""),
          "objective": ("--objective", str, "latency or size"),
          "time": ("--time-limit", (str, float, int), "a time limit, e.g. \"20m\" or seconds"),
          "heal_steps": ("--heal-steps", int, "heal steps in the search's trials, e.g. 50")}
PATHS = ("output", "calibration.text")


@dataclasses.dataclass
class Recipe:
    path: Path
    model: str | None
    settings: dict[str, str]


def load(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe '{path}' not found", "give a .toml file (examples/recipes/encoder.toml shows the keys)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}", "check the line it names")
    where = path.name
    _check_keys(data, TOP, where, "")
    settings: dict[str, str] = {}
    for key, value in data.items():
        flag, typ, what = TOP[key]
        _check_type(value, typ, where, key, what)
        if flag:
            settings[flag] = _text(_relative(path, value) if key in PATHS else value)
    for table, spec in (("calibration", CALIBRATION), ("budget", BUDGET)):
        if table in data:
            _check_keys(data[table], spec, where, table + ".")
            for key, value in data[table].items():
                flag, typ, what = spec[key]
                _check_type(value, typ, where, f"{table}.{key}", what)
                settings[flag] = _text(_relative(path, value) if f"{table}.{key}" in PATHS else value)
    for key in ("seq_len", "batch"):
        if key in data and data[key] < 1:
            raise UserError(f"recipe {where}: '{key}' must be a positive integer, got {data[key]}")
    if "pipeline" in data:
        settings["--pipeline"] = _pipeline(data["pipeline"], where)
    model = data.get("model")
    if model is not None and model not in ALIASES:
        model = _relative(path, model)
    return Recipe(path, model, settings)


def _check_keys(table: dict, spec: dict, where: str, prefix: str) -> None:
    for key in table:
        if key not in spec:
            raise UserError(f"recipe {where}: unknown key '{prefix}{key}'",
                            f"valid keys{' in [' + prefix[:-1] + ']' if prefix else ''}: {', '.join(spec)}")


def _check_type(value: Any, typ, where: str, key: str, what: str) -> None:
    types = typ if isinstance(typ, tuple) else (typ,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise UserError(f"recipe {where}: '{key}' must be {what}, got {value!r}")


def _relative(recipe: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (recipe.parent / p).resolve())


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _pipeline(value, where: str) -> str:
    """Pipeline text (validated) from text or a list of {pass = NAME, option = value...} tables."""
    from .pipeline import Pipeline, get_pass
    try:
        if isinstance(value, str):
            return str(Pipeline.parse(value))
        passes = []
        for i, table in enumerate(value):
            if not isinstance(table, dict) or not isinstance(table.get("pass"), str):
                raise UserError(f"pipeline item {i + 1} must be a table with pass = \"NAME\", got {table!r}",
                                "write [[pipeline]] tables: pass = \"quantize\" and the pass's options")
            options = {k: v for k, v in table.items() if k != "pass"}
            passes.append(get_pass(table["pass"])(**options))
        return str(Pipeline(passes))
    except UserError as e:
        raise UserError(f"recipe {where}: 'pipeline': {e.message}", e.hint) from None
