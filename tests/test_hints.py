"""Every command and flag that tcc's help and hints name exists.

Collected texts: the help of every parser argument and sub-command, the `tcc` usage in tcc.cli's
docstring, the pass docs and option help that `tcc passes` prints, and every string literal given
to an error class (UserError, AccuracyBudgetError, ...) or a pass Option in the tcc, passes and
backends sources (found with ast, f-strings included). In each text, a command is a `tcc CMD`
mention (in backquotes, or followed by a flag or an upper-case placeholder: `tcc compile MODEL`);
it must be a sub-command of build_parser(), and the flags written after it in the same mention
must be that command's. Any other `--flag` must be a flag of some command (or a global one),
except flags of other programs named just before it (nvcc, pip, gcc...).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import pytest

from tcc.cli import _text, build_parser

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("tcc", "passes", "backends") for p in sorted((ROOT / d).rglob("*.py"))]
FOREIGN = ("nvcc", "pip", "gcc", "g++", "clang", "apt-get", "python", "qemu", "ld ")
MENTION = re.compile(r"`tcc ([a-z][a-z-]*)([^`]*)`"  # in backquotes, or bare with flags / PLACEHOLDERS after it
                     r"|\btcc ([a-z][a-z-]*)((?: (?:--?[a-z][\w-]*|[A-Z][A-Z0-9_.]*\b|\d[\w.%]*))+)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _commands() -> tuple[dict[str, set[str]], set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}
    return flags, {o for a in parser._actions for o in a.option_strings}


def _help_texts() -> list[tuple[str, str]]:
    """(where, text) for the parsers' help and the usage in tcc.cli's docstring."""
    import tcc.cli
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [("tcc.cli docstring", tcc.cli.__doc__)]
    out += [(f"tcc --help ({a.dest})", _text(a.help)) for a in parser._actions if a.help]
    out += [(f"tcc {c.dest} (help)", c.help) for c in sub._choices_actions]
    for name, p in sub.choices.items():
        out += [(f"tcc {name} {'/'.join(a.option_strings) or a.dest}", _text(a.help)) for a in p._actions
                if a.help and a.help != argparse.SUPPRESS]
    return out


def _pass_texts() -> list[tuple[str, str]]:
    from tcc.pipeline import all_passes
    out = []
    for name, cls in all_passes().items():
        out.append((f"pass {name} (module doc)", sys.modules[cls.__module__].__doc__ or ""))
        out.append((f"pass {name} (doc)", cls.__doc__ or ""))
        out += [(f"pass {name} option {k}", o.help) for k, o in cls.options.items()]
    return out


def _strings(node) -> list[str]:
    """String literals under `node`, an f-string's constant parts joined with a placeholder."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in n.values))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.append(n.value)
    return out


def _error_texts() -> list[tuple[str, str]]:
    """(file:line, text) of the string literals given to error classes and pass Options."""
    out = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name.endswith("Error") or name == "Option":
                text = "\n".join(s for a in [*node.args, *(k.value for k in node.keywords)] for s in _strings(a))
                out.append((f"{path.relative_to(ROOT)}:{node.lineno}", text))
    return out


def _problems(texts: list[tuple[str, str]]) -> list[str]:
    flags, global_flags = _commands()
    every = set().union(*flags.values()) | global_flags
    bad = []
    for where, text in texts:
        if not text:
            continue
        for m in MENTION.finditer(text):
            cmd, rest = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            if cmd not in flags:
                bad.append(f"{where}: names `tcc {cmd}`, which is not a command ({sorted(flags)})")
                continue
            bad += [f"{where}: names `tcc {cmd} {f}`, which `tcc {cmd}` does not have"
                    for f in FLAG.findall(rest) if f not in flags[cmd] | global_flags]
        for m in FLAG.finditer(text):
            before = text[max(0, m.start() - 40):m.start()]
            if m.group(1) not in every and not any(t in before for t in FOREIGN):
                bad.append(f"{where}: names {m.group(1)}, which no tcc command has")
    return bad


def test_the_checker_catches_what_the_issue_found():
    """The check fails on the hints that named `tcc inspect` and an unknown flag (so it can fail)."""
    assert _problems([("x", "run `tcc inspect MODEL` to see what tcc recovers")])
    assert _problems([("x", "pass --tokenizers DIR")])
    assert _problems([("x", "run `tcc generate A --text T`")])  # a flag of another command
    assert _problems([("x", "give the folder tcc build -o DIR wrote")])
    assert not _problems([("x", "run `tcc analyze MODEL --structure`; e.g. tcc compile MODEL --seq-len 8, "
                                "or nvcc --dryrun; tcc cannot do that")])


@pytest.mark.parametrize("source", ["help", "passes", "errors"])
def test_named_commands_and_flags_exist(source):
    texts = {"help": _help_texts, "passes": _pass_texts, "errors": _error_texts}[source]()
    assert len(texts) > 20
    problems = _problems(texts)
    assert not problems, "\n".join(problems)
