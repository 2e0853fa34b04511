"""Passes, the pass registry, pipeline text and the pass manager.

A pass is a small class (`Pass`) with a CLI `name`, a `kind` ("analysis" | "transform" |
"cleanup"), typed `options` and a docstring that states its contract; `run(program, ctx)` rewrites
`program` in place and returns whether it changed it (True/False; returning the Program, as passes
written before this contract do, is still accepted: such a pass cleans up after itself). The
manager owns the rest of the contract (Pass.apply): after a pass that changed the program it
removes dead code (tcc.ir.graph.remove_dead), recovers ModelInfo (unless the pass sets `keeps_info`)
and checks every tcc op's operands against its spec (tcc.ir.ops.check_operands); passes do not clone.
Built-in passes live in `tcc.passes` (the
`passes/` folder), one file each; third-party passes register through the entry-point group
"tcc.passes" and are loaded lazily, the first time a name is looked up that no built-in has.

Pipeline text is MLIR/LLVM style:

    dce,fold-constants,quantize-weights(bits=8)
    drop-attention(max=25%,layers=[1,2]),quantize(weights=int8,acts=int8)

Values are ints, floats, percentages (`1%` -> 0.01), bools (`true`/`false`), bare or quoted strings
and flat lists `[a,b]`. `str(pipeline)` prints the non-default options, `pipeline.canonical()`
prints every option (for manifests); both parse back to an equal Pipeline.

`Pipeline.run(program, ctx)` runs the passes in order and checks each one: graph lint and
recompile, output shapes and NaN/inf on the first check feed, drift against the program before the
pass on the check feeds (the calibration feeds, or `program.example_inputs()` when there are none;
a pass that left the computation the outputs need unchanged, e.g. dce removing dead nodes, reuses
the outputs before it instead of running the program again), and appends one JSON-able record per
pass to `ctx.records`. `ctx.print_after` ({pass names} or {"all"}; `tcc compile --print-after`)
prints the graph after those passes; a pass that fails leaves `ctx.reproducer` (the pipeline text
up to and including it, and the program it was given, as text) for the report.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..ir import ops  # noqa: F401  (registers torch.ops.tcc.* so graphs with them run)
from ..errors import AccuracyBudgetError, InternalError, UserError
from ..plugins import PluginWarning, load_entry_points  # noqa: F401  (PluginWarning: a plugin was skipped)
from ..ir.graph import set_val  # noqa: F401  (passes import it from here)
from ..ir.program import Program, attribute

KINDS = ("analysis", "transform", "cleanup")
ENTRY_POINT_GROUP = "tcc.passes"


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", list[int]: "list[int]", list[str]: "list[str]",
               list[float]: "list[float]"}
_ITEM_TYPE = {list[int]: int, list[str]: str, list[float]: float}


@dataclasses.dataclass(frozen=True)
class Option:
    """One typed pass option. `validator(value)` returns an error message, or None when fine."""

    type: Any  # int | float | bool | str | list[int] | list[str] | list[float]
    default: Any
    help: str
    choices: tuple | None = None
    validator: Callable[[Any], str | None] | None = None

    def __post_init__(self):
        if self.type not in _TYPE_NAMES:
            raise TypeError(f"option type must be one of {list(_TYPE_NAMES.values())}, got {self.type!r}")

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.type]

    def coerce(self, value: Any) -> Any:
        """`value` converted to this option's type; ValueError with a readable reason otherwise."""
        value = _convert(value, self.type)
        items = value if isinstance(value, list) else [value]
        if self.choices is not None:
            bad = [v for v in items if v not in self.choices]
            if bad:
                raise ValueError(f"must be one of {list(self.choices)}, got {format_value(bad[0])}")
        if self.validator is not None:
            problem = self.validator(value)
            if problem:
                raise ValueError(problem)
        return value


def _convert(value: Any, typ: Any) -> Any:
    if typ in _ITEM_TYPE:
        inner = _ITEM_TYPE[typ]
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_convert(v, inner) for v in items]
    if isinstance(value, (list, tuple)):
        raise ValueError(f"expects a single {_TYPE_NAMES[typ]}, got a list")
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        return value if isinstance(value, str) else format_value(value)
    raise ValueError(f"expects {_TYPE_NAMES[typ]}, got {format_value(value)}")


# ---------------------------------------------------------------------------------------------
# Pass and context
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PassContext:
    """What passes share while a pipeline runs.

    calibration     feeds ({input name: array}) for calibrating passes and numeric checks; may be empty
    report          analysis results, by pass name
    annotations     facts passes leave for later passes (e.g. per-node sensitivities)
    records         one dict per pass run by a Pipeline (see Pipeline.run)
    check_numerics  compare outputs before/after each pass on up to `check_feeds` feeds (else only
                    the first feed's shape/NaN check)
    tolerance       max relative drift a single pass may cause (AccuracyBudgetError), None = no limit
    cleanup_tolerance  cleanup and analysis passes must not change outputs by more than this
    original        the program as it entered the pipeline (a copy), kept when a pass declares
                    `needs_original` (heal distils from it); None otherwise
    force           passes may replace what is at a user-given output path even when tcc did not
                    write it (`--force`; Pass.check_outputs)
    shared          the tensors (by id) another Program shares with this one (Program.clone(
                    share_weights=True)): a pass that is not `writes_weights` must not write into them
    later           while a Pipeline runs a pass: the passes after it (an analysis measures only what
                    they read, Pass.reads); None when the pass runs on its own
    print_after     names of passes (or "all") after which Pipeline.run prints the graph
                    (`tcc compile --print-after`)
    reproducer      after a pass failed in Pipeline.run: {"pipeline": the text up to and including
                    the failing pass, "pass", "error", "program": the graph it was given (fx code)}
    """

    calibration: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
    report: dict = dataclasses.field(default_factory=dict)
    annotations: dict = dataclasses.field(default_factory=dict)
    records: list = dataclasses.field(default_factory=list)
    logger: logging.Logger = dataclasses.field(default_factory=lambda: logging.getLogger("tcc.pipeline"))
    check_numerics: bool = True
    tolerance: float | None = None
    cleanup_tolerance: float = 1e-4
    check_feeds: int = 4
    verbose: bool = False
    details: dict = dataclasses.field(default_factory=dict)  # the running pass's notes
    original: Program | None = None
    force: bool = False
    shared: frozenset = frozenset()
    later: list | None = None
    print_after: frozenset = frozenset()  # pass names (or "all") whose result Pipeline.run prints
    reproducer: dict | None = None  # set by Pipeline.run when a pass fails (see the module docstring)

    def reads_of(self, analysis: str) -> set[str] | None:
        """What the passes after the running one read of the analysis pass named `analysis`
        (Pass.reads; up to the next run of that analysis, which they read instead); None when no
        later pass reads it or the pass runs outside a Pipeline."""
        wanted = set()
        for p in self.later or ():
            if p.name == analysis:
                break
            wanted |= p.reads(analysis)
        return wanted or None

    def refresh_info(self, program: Program) -> None:
        """Recover ModelInfo again after a pass changed the structure."""
        from ..ir.structure import recover
        vocab = getattr(program.info, "vocab_size", None)
        program.info = recover(program.gm)
        if vocab is not None and getattr(program.info, "vocab_size", None) is None:
            program.info.vocab_size = vocab

    def note(self, **details: Any) -> None:
        """Add JSON-able facts about what the running pass did; they land in its record."""
        self.details.update(details)


class Pass:
    """Base class. Subclasses set `name`, `kind`, `options` and a docstring (the contract), and
    implement `run`. Options are validated in `__init__` and readable as attributes."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "transform"
    options: ClassVar[dict[str, Option]] = {}
    needs_original: ClassVar[bool] = False  # Pipeline.run keeps a copy of its input in ctx.original
    # writes into existing tensors in place (else it only replaces them: a copy of the Program made
    # with clone(share_weights=True) stays as it was; Pipeline.run checks this). None: not said
    # (tcc's own passes: False; a plugin's: True, see may_write_weights)
    writes_weights: ClassVar[bool | None] = None
    # takes a Program whose linear weights and embedding tables are a bf16 checkpoint's own tensors
    # (tcc::dense_bf16 / tcc::embedding_bf16: tcc.frontends.frontend.trace(weights="bf16")); a compile whose
    # passes all do never holds the weights in float32 (issue 15), else it loads them as float32
    reads_bf16_weights: ClassVar[bool] = False
    # options renamed since: {old name: new name}; text with the old name still works (a warning
    # says so) and the option is kept under its new name
    renamed: ClassVar[dict[str, str]] = {}
    # keeps program.info true itself (e.g. the drop-* passes edit it where recovery cannot see the
    # result): the manager does not recover ModelInfo after it
    keeps_info: ClassVar[bool] = False

    @property
    def may_write_weights(self) -> bool:
        """Whether this pass may write into existing tensors: its `writes_weights`; for a pass from
        outside tcc that does not say (a plugin written before the flag), True, so the copies of the
        Program made around it are deep copies."""
        w = type(self).writes_weights
        return bool(w) if w is not None or type(self).__module__.startswith("tcc.") else True

    def __init__(self, **opts: Any):
        opts = self._renamed(opts)
        unknown = [k for k in opts if k not in self.options]
        if unknown:
            valid = ", ".join(f"{k} ({o.type_name})" for k, o in self.options.items()) or "none"
            raise UserError(f"pass '{self.name}' has no option '{unknown[0]}'", f"valid options: {valid}")
        self.opts: dict[str, Any] = {}
        for key, opt in self.options.items():
            value = opts.get(key, opt.default)
            try:
                self.opts[key] = opt.coerce(value)
            except ValueError as e:
                raise UserError(f"pass '{self.name}' option '{key}' {e}", f"{key}: {opt.help}") from None
            setattr(self, key, self.opts[key])

    def _renamed(self, opts: dict) -> dict:
        for old, new in self.renamed.items():
            if old in opts:
                if new in opts:
                    raise UserError(f"pass '{self.name}' got both '{new}' and '{old}', its old name", f"give {new} only")
                from ..progress import console
                console.print(f"tcc: warning: pass '{self.name}' option '{old}' is now '{new}'; the old name will go",
                              markup=False)
                opts = {(new if k == old else k): v for k, v in opts.items()}
        return opts

    # -- contract ------------------------------------------------------------------------------
    def requires(self, program: Program) -> None:
        """Raise UserError when `program` does not meet this pass's preconditions."""

    def run(self, program: Program, ctx: PassContext) -> "bool | Program":
        """Rewrite `program` in place; return whether it changed (see the module docstring)."""
        raise NotImplementedError

    def ensures(self, program: Program) -> None:
        """Raise when the result breaks this pass's postconditions."""

    def check_outputs(self, force: bool = False) -> None:
        """Raise UserError when a user-given path this pass writes holds something tcc did not write
        (tcc.paths), unless `force`. Called before the slow work starts (Pipeline.check_outputs)."""

    def reads(self, analysis: str) -> set[str]:
        """Which results of the analysis pass named `analysis` (its ctx.report entry) this pass, as
        configured, reads; an analysis earlier in the pipeline measures only those
        (PassContext.reads_of). Default: nothing."""
        return set()

    def __call__(self, program: Program, ctx: PassContext | None = None) -> Program:
        return self.apply(program, ctx)[0]

    def apply(self, program: Program, ctx: PassContext | None = None) -> tuple[Program, bool]:
        """requires -> run -> the manager's part of the contract -> ensures; returns (the program,
        whether the pass changed it). After a run that returned True: dead code removed (what went is
        noted as removed_nodes / removed_attributes), ModelInfo recovered unless `keeps_info`; after
        any transform or cleanup pass: every tcc op's operands checked against its spec."""
        ctx = ctx if ctx is not None else PassContext()
        self.requires(program)
        out = self.run(program, ctx)
        if isinstance(out, bool):
            changed, out = out, program
            if changed:
                _clean_up(self, out, ctx)
        elif isinstance(out, Program):
            changed = True  # a pass written before the contract: it cleaned up itself
        else:
            raise InternalError(f"pass '{self.name}' returned {type(out).__name__}, not a bool (changed) or a Program")
        if self.kind != "analysis":
            check_operands(out.gm, f"pass '{self.name}'")
        self.ensures(out)
        return out, changed

    # -- text ------------------------------------------------------------------------------------
    def text(self, all_options: bool = False) -> str:
        shown = {k: v for k, v in self.opts.items() if all_options or v != self.options[k].coerce(self.options[k].default)}
        if not shown:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={format_value(v)}" for k, v in shown.items()) + ")"

    def canonical(self) -> str:
        return self.text(all_options=True)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<pass {self.canonical()}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.opts == other.opts  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.canonical()))


def _clean_up(p: Pass, program: Program, ctx: PassContext) -> None:
    """The manager's work after a pass changed the program: dead code, then ModelInfo."""
    from ..ir.graph import remove_dead
    nodes, attributes = remove_dead(program.gm)
    if nodes or attributes:
        for key, new in (("removed_nodes", nodes), ("removed_attributes", attributes)):
            ctx.details[key] = list(ctx.details.get(key) or []) + new
    if not p.keeps_info:
        ctx.refresh_info(program)


def check_operands(gm: torch.fx.GraphModule, who: str) -> None:
    """InternalError naming the node, op and operand when a tcc op's operand breaks its spec
    (tcc.ir.ops.OPERANDS: dtype, rank, and the scale lengths of the quantized ops)."""
    problems = ops.operand_problems(gm)
    if problems:
        raise InternalError(f"{who} left tcc ops whose operands break their spec: " + "; ".join(problems[:5]))


# ---------------------------------------------------------------------------------------------
# Registry and plugins
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Pass]] = {}
_builtins_loaded = False
_plugins_tried: set[str] = set()


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a Pass findable by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"@register expects a Pass subclass, got {cls!r}")
    if not re.fullmatch(_NAME_RE, cls.name or ""):
        raise ValueError(f"{cls.__qualname__}: pass name {cls.name!r} must match {_NAME_RE}")
    if cls.kind not in KINDS:
        raise ValueError(f"pass '{cls.name}': kind must be one of {KINDS}, got {cls.kind!r}")
    if not (cls.__doc__ or "").strip():
        raise ValueError(f"pass '{cls.name}' needs a docstring stating its contract")
    for key, opt in cls.options.items():
        if not isinstance(opt, Option):
            raise TypeError(f"pass '{cls.name}' option '{key}' must be an Option")
        if not key.isidentifier() or hasattr(Pass, key):
            raise ValueError(f"pass '{cls.name}': '{key}' cannot be an option name")
        opt.coerce(opt.default)  # a bad default is the pass author's bug: fail at import
    from . import presets
    if presets.lookup(cls.name) is not None:
        raise ValueError(f"pass name '{cls.name}' is a preset's (tcc.pipeline.presets); choose another")
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ + old.__module__ != cls.__qualname__ + cls.__module__:
        raise ValueError(f"pass name '{cls.name}' is taken by {old.__module__}.{old.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    """The Pass class registered as `name`: built-ins first, then plugins (loaded on demand)."""
    _load_builtins()
    if name not in _REGISTRY:
        _load_plugins(only=name)
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        from . import presets
        close = difflib.get_close_matches(name, list(_REGISTRY) + presets.names(), n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(close)}?" if close else
                "`tcc passes` lists the passes, `tcc presets` the presets (named pipelines)")
        raise UserError(f"unknown pass '{name}'", hint)
    return _REGISTRY[name]


def all_passes() -> dict[str, type[Pass]]:
    """Every pass, built-in and plugin, by name (sorted)."""
    _load_builtins()
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    try:
        module = importlib.import_module("tcc.passes")
    except ModuleNotFoundError as e:
        if e.name != "tcc.passes":
            raise
        module = None
    if module is None or getattr(module, "__file__", None) is None:
        # A source checkout that is not pip-installed, or was installed (editable) before
        # passes/__init__.py existed, which makes tcc.passes an empty namespace: load passes/ by path.
        src = Path(__file__).resolve().parents[2] / "passes" / "__init__.py"
        spec = importlib.util.spec_from_file_location("tcc.passes", src, submodule_search_locations=[str(src.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["tcc.passes"] = module
        spec.loader.exec_module(module)


def _load_plugins(only: str | None = None) -> None:
    def skip(name: str) -> bool:
        if name in _plugins_tried or (only is not None and name != only):
            return True
        _plugins_tried.add(name)
        return False

    def use(obj) -> None:
        if isinstance(obj, type) and issubclass(obj, Pass):
            register(obj)
        elif not hasattr(obj, "__path__") and not hasattr(obj, "__file__"):
            raise TypeError(f"entry point gives {type(obj).__name__}, expected a Pass subclass or a module")

    load_entry_points(ENTRY_POINT_GROUP, "pass", use, skip)


# ---------------------------------------------------------------------------------------------
# Pipeline text
# ---------------------------------------------------------------------------------------------

_NAME_RE = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_KEY_RE = r"[A-Za-z_][A-Za-z0-9_\-]*"
_BARE_RE = r"[^\s,()\[\]=\"']+"
_NUMBER_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INT_RE = re.compile(r"[+-]?\d+")


@dataclasses.dataclass
class PassSpec:
    """One `name(key=value,...)` item of pipeline text, before option validation."""

    name: str
    options: dict[str, Any]
    column: int  # 1-based column of the name


def parse_text(text: str) -> list[PassSpec]:
    """Pipeline text -> PassSpecs; malformed text raises UserError with the column and a caret."""
    return _Parser(text).pipeline()


def format_value(value: Any) -> str:
    """The pipeline-text spelling of an option value (parses back to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written in pipeline text")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    value = str(value)
    if re.fullmatch(_BARE_RE, value) and isinstance(_scalar(value), str):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _scalar(token: str) -> Any:
    if token.lower() in ("true", "false"):
        return token.lower() == "true"
    body, percent = (token[:-1], True) if token.endswith("%") else (token, False)
    if _NUMBER_RE.fullmatch(body):
        if percent:
            return float(body) / 100
        return int(body) if _INT_RE.fullmatch(body) else float(body)
    return token


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def fail(self, what: str, at: int | None = None):
        col = (self.i if at is None else at) + 1
        raise UserError(f"pipeline text, column {col}: {what}\n    {self.text}\n    {' ' * (col - 1)}^",
                        "write passes as name or name(key=value,...), separated by commas")

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str, what: str) -> None:
        if self.peek() != ch:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            self.fail(f"expected {what}, found {found}")
        self.i += 1

    def match(self, pattern: str, what: str) -> str:
        self.skip_ws()
        m = re.compile(pattern).match(self.text, self.i)
        if not m:
            found = repr(self.text[self.i]) if self.i < len(self.text) else "end of text"
            self.fail(f"expected {what}, found {found}")
        self.i = m.end()
        return m.group(0)

    def pipeline(self) -> list[PassSpec]:
        specs: list[PassSpec] = []
        if self.peek() == "":
            return specs
        while True:
            specs.append(self.item())
            if self.peek() == "":
                return specs
            self.expect(",", "',' between passes")

    def item(self) -> PassSpec:
        self.skip_ws()
        col = self.i + 1
        spec = PassSpec(self.match(_NAME_RE, "a pass name"), {}, col)
        if self.peek() != "(":
            return spec
        self.i += 1
        if self.peek() == ")":
            self.i += 1
            return spec
        while True:
            self.skip_ws()
            key_at = self.i
            key = self.match(_KEY_RE, "an option name").replace("-", "_")
            if key in spec.options:
                self.fail(f"option '{key}' given twice", at=key_at)
            self.expect("=", f"'=' after option '{key}'")
            spec.options[key] = self.value()
            if self.peek() == ")":
                self.i += 1
                return spec
            self.expect(",", "',' or ')' after an option value")

    def value(self) -> Any:
        if self.peek() != "[":
            return self.scalar()
        self.i += 1
        items = []
        if self.peek() == "]":
            self.i += 1
            return items
        while True:
            if self.peek() == "[":
                self.fail("lists cannot be nested")
            items.append(self.scalar())
            if self.peek() == "]":
                self.i += 1
                return items
            self.expect(",", "',' or ']' in a list")

    def scalar(self) -> Any:
        q = self.peek()
        if q in ("'", '"'):
            start, self.i, out = self.i, self.i + 1, []
            while self.i < len(self.text) and self.text[self.i] != q:
                if self.text[self.i] == "\\" and self.i + 1 < len(self.text):
                    self.i += 1
                out.append(self.text[self.i])
                self.i += 1
            if self.i >= len(self.text):
                self.fail("unterminated string", at=start)
            self.i += 1
            return "".join(out)
        return _scalar(self.match(_BARE_RE, "a value"))


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------

class Pipeline:
    """An ordered list of configured passes."""

    def __init__(self, passes: list[Pass] | None = None):
        self.passes = list(passes or [])

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        from . import presets
        passes = []
        for spec in parse_text(text):
            preset = presets.lookup(spec.name)
            if preset is not None:  # a named pipeline stands for its passes
                if spec.options:
                    _with_caret(text, spec.column, lambda: _preset_options(preset))
                passes += cls.parse(preset.pipeline).passes
                continue
            pass_cls = _with_caret(text, spec.column, lambda: get_pass(spec.name))
            passes.append(_with_caret(text, spec.column, lambda: pass_cls(**spec.options)))
        return cls(passes)

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def canonical(self) -> str:
        return ",".join(p.canonical() for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({self.canonical()!r})"

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.passes == other.passes

    def check_outputs(self, force: bool = False) -> None:
        """Every pass's Pass.check_outputs: the paths the pipeline writes, checked before it runs."""
        for p in self.passes:
            p.check_outputs(force)

    def run(self, program: Program, ctx: PassContext | None = None, *, in_place: bool = False) -> Program:
        """Run every pass in order, checking and recording each (see the module docstring); returns
        the new Program. Passes rewrite the Program they are given, so the input is cloned first
        unless `in_place` (callers that no longer need it save a copy of the weights).

        Each record: {pass, text, kind, options, seconds, param_bytes, flops, int_flops (the part of
        flops done in integer arithmetic), nodes (each {before, after}), drift {max_abs, rel, output,
        feeds}, details (what the pass noted)}.
        """
        ctx = ctx if ctx is not None else PassContext()
        if not in_place and self.passes:
            program = program.clone()
        feeds = ctx.calibration[: max(1, ctx.check_feeds)] or [program.example_inputs()]
        if not ctx.check_numerics:
            feeds = feeds[:1]
        before = _observe_once(program, feeds, None)
        if ctx.original is None and any(p.needs_original for p in self.passes):
            ctx.original = program.clone()
        for index, p in enumerate(self.passes, 1):
            ctx.details, ctx.later = {}, self.passes[index:]
            versions = None if p.may_write_weights or not ctx.shared else {
                id(t): t._version for t in program.named_tensors().values() if id(t) in ctx.shared}
            t0 = time.perf_counter()
            given = program.gm.code  # the program the pass is given (cached by recompile): the reproducer's
            try:
                if ctx.verbose:
                    from ..progress import console
                    with console.status(f"[{index}/{len(self)}] {p}"):
                        program, _ = p.apply(program, ctx)
                else:
                    program, _ = p.apply(program, ctx)
            except Exception as e:
                ctx.reproducer = reproducer(self.passes[:index], given, e)
                e.tcc_reproducer = ctx.reproducer  # the compile's report carries it (tcc.report.error_json)
                raise
            seconds = time.perf_counter() - t0
            if ctx.print_after and (p.name in ctx.print_after or "all" in ctx.print_after):
                print_graph(program, f"after pass {index}/{len(self)} {p.canonical()}")
            try:
                program.gm.graph.lint()
                program.gm.recompile()
            except Exception as e:
                raise InternalError(f"pass '{p.name}' left an invalid graph: {type(e).__name__}: {e}") from e
            written = [n for n, t in program.named_tensors().items() if versions and versions.get(id(t), t._version)
                       != t._version]
            if written:
                raise InternalError(f"pass '{p.name}' wrote into {written[:3]} in place, which another copy of the "
                                    "Program shares; a pass that does must set writes_weights = True")
            after = _observe_once(program, feeds, p, before)
            drift = _drift(before["outputs"], after["outputs"], [s.name for s in program.outputs])
            if after["outputs"] is before["outputs"]:
                drift["reused"] = True  # same computation: the outputs before the pass, not run again
            record = {
                "pass": p.name, "text": p.canonical(), "kind": p.kind, "options": dict(p.opts),
                "seconds": round(seconds, 4),
                "param_bytes": {"before": before["param_bytes"], "after": after["param_bytes"]},
                "flops": {"before": before["flops"], "after": after["flops"]},
                "int_flops": {"before": before["int_flops"], "after": after["int_flops"]},
                "nodes": {"before": before["nodes"], "after": after["nodes"]},
                "drift": drift, "details": ctx.details,
            }
            ctx.records.append(record)
            ctx.logger.info("pass %s: %s", p.name, record)
            if ctx.verbose:
                _print_record(index, len(self), record)
            _enforce_tolerance(p, drift, ctx)
            before = after
        ctx.later = None
        return program


def reproducer(passes: list, program_code: str, error: BaseException) -> dict:
    """What reproduces a failing pass: the pipeline up to it, and the program it was given."""
    return {"pipeline": ",".join(p.canonical() for p in passes), "pass": passes[-1].name,
            "error": f"{type(error).__name__}: {error}", "program": program_code}


def print_graph(program: Program, title: str) -> None:
    """The program's graph as torch.fx prints it (one node a line), under `title` (--print-after)."""
    print(f"// ----- {title} -----\n{program.gm.graph}", flush=True)


def _preset_options(preset) -> None:
    raise UserError(f"preset '{preset.name}' takes no options",
                    f"write out its pipeline with the options changed: {preset.pipeline}")


def _with_caret(text: str, column: int, make: Callable[[], Any]) -> Any:
    try:
        return make()
    except UserError as e:
        raise UserError(f"{e.message}\n    {text}\n    {' ' * (column - 1)}^", e.hint) from None


# ---------------------------------------------------------------------------------------------
# Checks and measurements
# ---------------------------------------------------------------------------------------------

def _observe(program: Program, feeds: list[dict], after_pass: Pass | None) -> dict:
    """Run the program on the feeds: shape and NaN/inf check, outputs, FLOPs, bytes, node count.
    The first feed runs through `propagate_shapes` so every node gets a fresh meta['tensor_meta']."""
    who = f"pass '{after_pass.name}'" if after_pass else "the program (before any pass)"
    names = [s.name for s in program.outputs]
    args = [torch.from_numpy(s.check(feeds[0][s.name])) for s in program.inputs]
    try:
        first = torch.utils._pytree.tree_leaves(propagate_shapes(program.gm, args))
    except NodeError as e:
        raise UserError(f"{who} gives a graph that does not run: {e}",
                        "check the inputs, or run the passes one by one to find the culprit") from e
    if len(first) != len(names):
        raise UserError(f"{who} changed the number of outputs from {len(names)} to {len(first)}")
    outputs = [{n: o.detach().numpy() for n, o in zip(names, first)}]
    for spec, out in zip(program.outputs, first):
        if tuple(out.shape) != tuple(spec.shape):
            raise UserError(f"{who} changed the shape of output '{spec.name}' from {list(spec.shape)} to {list(out.shape)}")
    outputs += [program(feed) for feed in feeds[1:]]
    for feed_outputs in outputs:
        for name, value in feed_outputs.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                bad = "NaN" if np.isnan(value).any() else "inf"
                raise UserError(f"{who} produced {bad} in output '{name}'; the program before it did not"
                                if after_pass else f"{who} produces {bad} in output '{name}'",
                                "check the pass's options, or the calibration/input data")
    return {"outputs": outputs, **_counts(program)}


def _counts(program: Program) -> dict:
    """An observation's sizes: FLOPs (shapes from the nodes' meta), bytes, node count."""
    return {"flops": estimate_flops(program.gm), "int_flops": estimate_flops(program.gm, integer=True),
            "param_bytes": program.param_bytes(), "nodes": len(program.gm.graph.nodes)}


def _observe_once(program: Program, feeds: list[dict], after_pass: Pass | None, before: dict | None = None) -> dict:
    """_observe, plus the computation's key (_computation_key). When `before` (the observation
    before `after_pass`) has the same key, the pass left every node the outputs depend on and every
    tensor they read as it was (a cleanup that only removed dead nodes, a pass that found nothing to
    do): its outputs are `before`'s, exactly, and the program is not run again; sizes, FLOPs and
    nodes are counted afresh."""
    key, refs = _computation_key(program)
    if (before is not None and key is not None and key == before.get("key")
            and all(r() is not None for r in before["refs"])):  # (ids of live tensors name them)
        try:
            return {**before, **_counts(program), "refs": refs}
        except InternalError:  # a node without shapes (estimate_flops): run the program
            pass
    return {**_observe(program, feeds, after_pass), "key": key, "refs": refs}


def _computation_key(program: Program) -> tuple[tuple | None, list]:
    """What a program's outputs depend on, comparable with ==: its inputs' and outputs' specs, and in
    graph order every node the outputs (or an impure node) need, with its target, its arguments and,
    for a tensor (attribute or constant argument), the tensor's id and version counter (an in-place
    write bumps it); and weak references to those tensors (an id names a tensor only while it lives).
    (None, []) when that cannot be told from the graph (a call_module node: its module's state)."""
    import weakref
    graph = program.gm.graph
    roots = [n for n in graph.nodes if n.op in ("output", "placeholder") or
             (n.op == "call_function" and n.is_impure())]
    live, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    index: dict = {}
    refs: list = []

    def tensor(t):
        if not isinstance(t, torch.Tensor):
            return t
        refs.append(weakref.ref(t))
        return ("%tensor", id(t), t._version)

    key: list = [tuple((s.name, tuple(s.shape), str(s.dtype)) for s in [*program.inputs, *program.outputs])]
    try:
        for n in graph.nodes:
            if n not in live:
                continue
            if n.op == "call_module":
                return None, []
            attr = attribute(program.gm, n.target) if n.op == "get_attr" else None
            attr = tensor(attr) if isinstance(attr, torch.Tensor) else ("%object", id(attr))
            args = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: ("%node", index[a]))
            index[n] = len(index)
            key.append((n.op, n.target, repr(torch.utils._pytree.tree_map(tensor, args)), repr(attr)))
    except (RuntimeError, TypeError):  # a tensor without a version counter (inference mode), or no weakref
        return None, []
    return tuple(key), refs


def _drift(before: list[dict], after: list[dict], names: list[str]) -> dict:
    """Largest abs difference of any output over the feeds, and that / max |reference| (float64,
    a slice at a time: no float64 copy of every feed's logits at once)."""
    worst = {"max_abs": 0.0, "rel": 0.0, "output": None, "feeds": len(after)}
    for name in names:
        max_abs = scale = 0.0
        for b, a in zip(before, after):
            ref, new = b[name].ravel(), a[name].ravel()
            for i in range(0, ref.size, 1 << 20):
                r, x = ref[i:i + (1 << 20)].astype(np.float64), new[i:i + (1 << 20)].astype(np.float64)
                max_abs = max(max_abs, float(np.abs(x - r).max()))
                scale = max(scale, float(np.abs(r).max()))
        rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if worst["output"] is None or rel > worst["rel"]:
            worst.update(max_abs=max_abs, rel=rel, output=name)
    return worst


def _enforce_tolerance(p: Pass, drift: dict, ctx: PassContext) -> None:
    if not ctx.check_numerics:
        return
    if p.kind in ("analysis", "cleanup") and drift["rel"] > ctx.cleanup_tolerance:
        raise InternalError(f"{p.kind} pass '{p.name}' changed output '{drift['output']}' by {drift['rel']:.2e} "
                            f"(relative); {p.kind} passes must keep outputs within {ctx.cleanup_tolerance:g}")
    if ctx.tolerance is not None and drift["rel"] > ctx.tolerance:
        raise AccuracyBudgetError(f"pass '{p.name}' changed output '{drift['output']}' by {drift['rel']:.2e} (relative), "
                                  f"more than the tolerance {ctx.tolerance:g}",
                                  "loosen the pass's options or raise the tolerance")


def _print_record(index: int, total: int, r: dict) -> None:
    from ..progress import info
    pb, fl, nd = r["param_bytes"], r["flops"], r["nodes"]
    info(f"[{index}/{total}] [bold]{r['pass']}[/bold] {r['seconds']:.2f} s, "
                  f"params {pb['before'] / 1e6:.3g}->{pb['after'] / 1e6:.3g} MB, "
                  f"{fl['before'] / 1e9:.3g}->{fl['after'] / 1e9:.3g} GFLOP, "
                  f"nodes {nd['before']}->{nd['after']}, drift {r['drift']['rel']:.1e}")


class NodeError(Exception):
    """A node failed while running the graph node by node."""


class _ShapeProp(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise NodeError(f"node '{n.name}' ({n.format_node()[:120]}): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple | list) -> Any:
    """Run the graph node by node on real `args` (like torch.fx ShapeProp, which prints tracebacks
    on failure), set meta['tensor_meta'] on every tensor node and return the output node's value;
    a failing node raises NodeError naming it."""
    with torch.no_grad():
        return _ShapeProp(gm).run(*args)


_aten, _tcc = torch.ops.aten, torch.ops.tcc
_LAST_DIM_OF_FIRST = {_aten.linear, _aten.matmul, _aten.mm, _aten.bmm, _tcc.dense, _tcc.dense_w8, _tcc.dense_a8w8,
                      _tcc.dense_w4, _tcc.dense_bf16}
_LAST_DIM_OF_SECOND = {_aten.addmm, _aten.baddbmm}
_ATTENTION = {_tcc.sdpa, _aten.scaled_dot_product_attention}


def estimate_flops(gm: torch.fx.GraphModule, example_args: tuple | None = None, integer: bool = False) -> int:
    """2*M*K*N for every linear/matmul/dense/dense_w8 node, both products of every attention node
    and 2*out*Cin*k for convolutions; shapes from meta['tensor_meta'] or meta['val'], or from
    running `propagate_shapes` on `example_args` when a node has neither. `integer`: only the work
    done in integer arithmetic (int8 x int8 products: dense_a8w8, dense_w4 with acts="int8"); the
    rest is float work (a weight-only int8/int4 layer dequantizes and multiplies in float)."""
    def shape(arg):
        if not isinstance(arg, torch.fx.Node):
            return None
        m = arg.meta.get("tensor_meta", arg.meta.get("val"))
        return tuple(m.shape) if hasattr(m, "shape") else None

    def node_flops(n) -> int | None:
        packet = getattr(n.target, "overloadpacket", None)
        out = shape(n)
        if packet in _LAST_DIM_OF_FIRST or packet in _LAST_DIM_OF_SECOND:
            a = shape(n.args[1 if packet in _LAST_DIM_OF_SECOND else 0])
            return None if out is None or a is None else 2 * math.prod(out) * a[-1]
        if packet in _ATTENTION:
            q, k, v = (shape(a) for a in n.args[:3])
            if None in (q, k, v):
                return None
            rows = math.prod(q[:-1])  # B*H*Sq
            return 2 * rows * k[-2] * q[-1] + 2 * rows * k[-2] * v[-1]
        if packet is _aten.convolution or packet is _aten.conv2d or packet is _aten.conv1d:
            w = shape(n.args[1])
            return None if out is None or w is None else 2 * math.prod(out) * math.prod(w[1:])
        return 0

    def is_integer(n) -> bool:
        packet = getattr(n.target, "overloadpacket", None)
        return packet is _tcc.dense_a8w8 or (packet is _tcc.dense_w4 and (
            n.kwargs.get("acts", n.args[6] if len(n.args) > 6 else "none") == "int8"))

    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or (integer and not is_integer(n)):
            continue
        f = node_flops(n)
        if f is None:
            if example_args is None:
                raise InternalError(f"no shapes on node '{n.name}' for the FLOPs estimate; pass example_args")
            propagate_shapes(gm, example_args)
            return estimate_flops(gm, integer=integer)
        total += f
    return int(total)


# ---------------------------------------------------------------------------------------------
# Helpers for pass authors
# ---------------------------------------------------------------------------------------------

def check_runs(program, what: str, hint: str) -> None:
    """Run `program`'s graph on fake tensors of its example inputs; a node that fails -> UserError
    "`what` left a graph that does not run: ..." with `hint` (a structural pass checking its rewrite)."""
    feeds = program.example_inputs()
    try:
        propagate_shapes(program.gm, [torch.from_numpy(s.check(feeds[s.name])) for s in program.inputs])
    except NodeError as e:
        raise UserError(f"{what} left a graph that does not run: {e}", hint) from e

