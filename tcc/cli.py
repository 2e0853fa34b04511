"""The `tcc` command.

  tcc compile MODEL --target {x86,arm64,...} [-o DIR] [--seq-len N] [--pipeline TEXT] [--report PATH] [--force]
  tcc compile MODEL --preset {q8,w8a8,q4,q4-fast,w4a8,q4_0}   (a named pipeline; `tcc presets` lists them)
  tcc compile --recipe FILE.toml [MODEL] [flags: given explicitly, they win over the recipe]
  tcc compile MODEL --max-accuracy-drop 1% [--objective latency|size] [--time-limit 20m] [--heal-steps N] [--search-dir DIR]
  tcc run ARTIFACT --inputs in.npz -o out.npz [--force]
  tcc eval ARTIFACT --text FILE [--max-tokens N] [--json]
  tcc generate ARTIFACT (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S] [--speculate lookup|draft|auto [--compare]] [--json]
  tcc bench ARTIFACT [--repeats N] [--json]
  tcc analyze MODEL --structure | -o DIR [--force]
  tcc passes [--json]
  tcc presets [--json]
  tcc targets [--json]
  tcc info ARTIFACT [--json]
  tcc completion {bash,zsh,fish}   (shell completion: eval "$(tcc completion bash)")
  tcc --version

Global flags (--debug, -q/--quiet) go before or after the command.

Exit codes: 0 ok, 1 internal error, 2 user error (bad path, model, option, input), 3 accuracy
budget not met, 130 interrupted. User errors print one line (and a hint), no traceback unless --debug.
Output paths (-o, --report, --search-dir) may hold only what tcc wrote there before (an artifact, a
report, a search directory, an .npz from `tcc run`, an analysis); anything else exits 2 unless
--force (tcc.paths).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no model hub, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too (set before it is imported)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _default_out(model: str, target: str) -> str:
    return str(Path("build") / f"{Path(model).stem or 'model'}-{target}")


def _apply_recipe(a):
    """The compile arguments with the recipe's settings parsed in front of the command line's flags
    (so explicit flags win); the recipe's model when no MODEL was given."""
    from tcc import recipe
    from tcc.errors import UserError
    r = recipe.load(a.recipe)
    flags = {o for action in _compile_parser(build_parser())._actions for o in action.option_strings}
    missing = [f for f in r.settings if f not in flags]
    if missing:
        raise UserError(f"recipe {r.path.name} sets {missing[0]}, which this tcc compile does not have",
                        "remove the key (the [budget] table needs the accuracy-budget search)")
    argv = list(a.argv)
    at = argv.index("compile") + 1
    args = build_parser().parse_args(argv[:at] + [f"{k}={v}" for k, v in r.settings.items()] + argv[at:])
    args.model = args.model or r.model
    return args


def cmd_compile(a) -> int:
    import tcc
    from tcc.errors import UserError
    if a.recipe:
        a = _apply_recipe(a)
    if a.preset:
        _use_preset(a)
    for key, value in COMPILE_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not a.model:
        raise UserError("no model given", "tcc compile MODEL, or a recipe with model = \"...\"")
    if a.max_accuracy_drop is not None and a.bundle:
        raise UserError("--bundle is not made by the accuracy-budget search",
                        "bundle the artifact it writes afterwards: tcc export ARTIFACT --bundle DIR")
    if a.max_accuracy_drop is not None:
        from tcc import cache

        with cache.use(not a.no_cache):
            return _search_compile(a)
    if a.objective or a.budget or a.search_dir or a.heal_steps is not None:
        from tcc.errors import UserError
        raise UserError("--objective, --time-limit, --heal-steps and --search-dir set up the accuracy-budget search",
                        "add --max-accuracy-drop (e.g. 1%)")
    out = a.output or _default_out(a.model, a.target)
    art = tcc.compile(a.model, a.target, out=out, pipeline=a.pipeline or "", seq_len=a.seq_len,
                      batch=a.batch, task=a.task, verify=not a.no_verify, backend=a.backend,
                      calibration_text=a.calibration, calibration_samples=a.calibration_samples,
                      max_drift=a.max_drift, latency=False if a.no_latency else None, cache=not a.no_cache, report=a.report,
                      evaluate=False if a.no_eval else None, max_seq_len=a.max_seq_len, generate=False if a.no_generate else None,
                      max_context=a.max_context, force=a.force, tokenizer=a.tokenizer, dtype=a.dtype, kv_cache=a.kv_cache,
                      draft=a.draft, print_after=_names(a.print_after))
    m = art.manifest
    art.close()
    bundle = _bundle(out, a.bundle, a.force) if a.bundle else None
    if bundle and not a.json:
        _print_bundle(bundle, False)
    summary = {**({"bundle": bundle} if bundle else {}), "artifact": str(Path(out).resolve()), "target": m["target"]["name"], "pipeline": m["pipeline"],
               "weight_bytes": m["sizes"]["weight_bytes"], "verify": m["run"].get("verify"),
               "drift_vs_source": m["run"].get("drift_vs_source"),
               "seconds": m["run"]["seconds"]}
    if a.json:
        print(json.dumps(summary))
    else:
        verify = summary["verify"]
        if isinstance(verify, str):  # e.g. "not run: no GPU on this host"
            print(f"verify: {verify}")
        for name, v in (verify if isinstance(verify, dict) else {}).items():
            print(f"{name}: max abs error vs the compiled program in PyTorch {v['max_abs_err']:.2e} (relative "
                  f"{v['max_rel_err']:.2e}: the backend's fidelity, the artifact's kernels against the pass "
                  "pipeline's ops in PyTorch)")
        for name, v in (m["run"].get("drift_vs_source") or {}).items():
            if a.pipeline:
                print(f"{name}: max abs change vs the source model {v['max_abs_err']:.2e} (relative "
                      f"{v['max_rel_err']:.2e}: what the passes and the backend changed together; relative = max abs / "
                      "max |reference|; the task accuracy above is the measure to judge by)")
    return 0


def _use_preset(a) -> None:
    """--preset NAME: the pipeline is the preset (its name is pipeline text that expands to it)."""
    from tcc.pipeline import presets
    from tcc.errors import UserError
    preset = presets.get(a.preset)
    if a.pipeline:
        raise UserError("give --preset or --pipeline, not both",
                        f"a preset's name stands for its pipeline inside -p too: -p '{a.pipeline},{preset.name}'")
    a.pipeline = preset.name


def _search_compile(a) -> int:
    """`tcc compile MODEL --max-accuracy-drop D [--objective] [--time-limit] [--search-dir]`."""
    from tcc import report as reports
    from tcc.errors import AccuracyBudgetError, UserError
    from tcc.search import parse_drop, parse_duration, search
    if a.pipeline:
        raise UserError("--pipeline and --max-accuracy-drop do not go together: the search chooses the pipeline",
                        "drop --pipeline, or drop --max-accuracy-drop to compile a pipeline of your own")
    if a.backend != "tvm":
        raise UserError("the accuracy search compiles with the tvm backend", "drop --backend")
    max_drop = parse_drop(a.max_accuracy_drop)
    budget = parse_duration(a.budget) if a.budget else None
    out = Path(a.output or _default_out(a.model, a.target))
    work = Path(a.search_dir) if a.search_dir else out.with_name(out.name + "-search")
    if a.report:
        reports.check_path(a.report, a.force)
    try:
        result = search(a.model, a.target, max_drop=max_drop, objective=a.objective or "latency", budget_s=budget,
                        work_dir=work, out=out, calibration_text=a.calibration,
                        calibration_samples=a.calibration_samples, seq_len=a.seq_len, batch=a.batch, task=a.task,
                        force=a.force, tokenizer=a.tokenizer, heal_steps=a.heal_steps or 0)
    except AccuracyBudgetError as e:
        if a.report and (work / "search.json").exists():
            failed = reports.build({}, [], {"exit_status": e.exit_code, "error": reports.error_json(e)}, {})
            reports.write_json(a.report, failed | {"search": json.loads((work / "search.json").read_text())})
        raise
    if a.report:
        reports.write_json(a.report, reports.read(result.artifact))
    c = result.chosen
    summary = {"artifact": str(result.artifact), "pipeline": c["pipeline"], "drop": c["drop"],
               "held_out_drop": c["held_out"]["drop"],
               "latency_ms": c.get("measured", {}).get("latency_ms", c["latency_ms"]),
               "size_bytes": c["size_bytes"], "cost_source": "measured" if c.get("measured") else "model",
               "trials": len(result.trials), "search_dir": str(work), "stopped": result.stopped}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"chosen pipeline: {c['pipeline']}")
        print(f"accuracy drop: {c['drop']:.3%} (search), {c['held_out']['drop']:.3%} (held-out, "
              f"{c['held_out']['measured_on']}); budget {max_drop:.2%}")
        print(f"latency {summary['latency_ms']:.2f} ms ({summary['cost_source']}), "
              f"weights {c['size_bytes'] / 1e6:.1f} MB")
        print(f"artifact: {result.artifact}; {len(result.trials)} trials, front and plot in {work}")
    return 0


def _bundle(artifact, out, force: bool) -> dict:
    from tcc.pipeline.backend import get_backend
    return get_backend("tvm").bundle(artifact, out, force=force)  # backends/tvm/bundle.py


def _print_bundle(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    print(f"bundle: {info['bundle']} ({info['arch']}, {info['bytes'] / 1e6:.1f} MB; runtime libraries "
          f"{info['runtime_bytes'] / 1e6:.1f} MB of it): bin/tcc-run, include/tcc.h, lib/pkgconfig/tcc.pc (README.md)")


def cmd_export(a) -> int:
    from tcc.errors import UserError
    if not a.bundle:
        raise UserError("tcc export needs --bundle DIR", "tcc export ARTIFACT --bundle DIR")
    _print_bundle(_bundle(a.artifact, a.bundle, a.force), a.json)
    return 0


def cmd_run(a) -> int:
    import numpy as np

    from tcc.errors import UserError
    from tcc.paths import check_file, is_tcc_npz, save_npz
    from tcc.runtime import load
    check_file(a.output, "outputs file (-o)", is_tcc_npz, a.force)
    if not Path(a.inputs).exists():
        raise UserError(f"inputs file '{a.inputs}' not found", "give an .npz with one array per input name")
    try:
        with np.load(a.inputs, allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"cannot read '{a.inputs}' as .npz: {e}", "save inputs with numpy.savez")
    with load(a.artifact) as art:
        outs = art(feeds)
    check_file(a.output, "outputs file (-o)", is_tcc_npz, a.force)  # nothing new appeared there meanwhile
    save_npz(a.output, outs)
    for k, v in outs.items():
        print(f"{k}: {v.dtype} {list(v.shape)}")
    return 0


def cmd_eval(a) -> int:
    from tcc import evaluate
    result = evaluate.evaluate_artifact(a.artifact, a.text, max_tokens=a.max_tokens, stride=a.stride,
                                        max_samples=a.max_samples, tokenizer=a.tokenizer, kv_cache=a.kv_cache,
                                        window=a.window)
    if a.json:
        print(json.dumps(result))
    else:
        print(" ".join(f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_generate(a) -> int:
    import tcc
    from tcc.errors import UserError
    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    prompt = a.prompt if a.prompt_ids is None else _token_ids(a.prompt_ids)
    shown = [0]

    def stream(token, text):  # the text as it grows, or the new ids when there is no tokenizer
        if a.json:
            return
        if text is None:
            sys.stdout.write(f"{token} ")
        else:
            sys.stdout.write(text[shown[0]:])
            shown[0] = len(text)
        sys.stdout.flush()

    with tcc.load(a.artifact) as art:
        from .speculative import verify_warning
        warning = verify_warning(art.manifest) if a.speculate != "off" else None
        if warning:
            print(f"tcc: warning: this artifact's greedy speculation may not be exact: {warning}", file=sys.stderr)
        r = art.generate(prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                         seed=a.seed, stream=stream, speculate=a.speculate)
        if a.compare and a.speculate != "off":
            _compare_plain(art, prompt, a, r)
    if a.json:
        print(json.dumps(r))
    else:
        print()
        print(f"[{len(r['token_ids'])} tokens; prefill {r['prompt_tokens']} tokens at {r['prefill_tokens_per_s']} tok/s, "
              f"decode {r['decode_tokens_per_s']} tok/s]", file=sys.stderr)
        if "speculative" in r:
            sp = r["speculative"]
            print(f"[speculate {sp['mode']} ({sp.get('draft')}): acceptance {sp['acceptance_rate']}, k {sp.get('k_mean')}, "
                  f"{sp['tokens_per_target_call']} tokens per target call" + (f", {sp['speed_up']}x the target alone's decode" if sp.get("speed_up") else "")
                  + ({True: ", the same tokens", False: ", NOT the same tokens"}.get(sp.get("same_tokens"), "") if a.temperature == 0 else "")
                  + "]", file=sys.stderr)
    return 0


def _compare_plain(art, prompt, a, r: dict) -> None:
    """r["speculative"] gets the target alone's decode tok/s on the same prompt, the speed-up, and
    whether its tokens are the same (greedy: they must be)."""
    plain = art.generate(prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                         seed=a.seed)
    spec, base = r["decode_tokens_per_s"], plain["decode_tokens_per_s"]
    r["speculative"].update(plain_decode_tokens_per_s=base, speed_up=round(spec / base, 3) if spec and base else None,
                            same_tokens=plain["token_ids"] == r["token_ids"])


def _token_ids(text: str) -> list[int]:
    from tcc.errors import UserError
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--prompt-ids takes integer token ids, got {text!r}", "e.g. --prompt-ids 1,2,3")
    if not ids or min(ids) < 0:
        raise UserError(f"--prompt-ids needs at least one token id >= 0, got {text!r}", "e.g. --prompt-ids 1,2,3")
    return ids


def cmd_bench(a) -> int:
    from tcc import bench
    result = bench.bench(a.artifact, repeats=a.repeats, warmup=a.warmup)
    print(json.dumps(result) if a.json else bench.format_table(result))
    return 0


def _names(text: str) -> frozenset:
    """--print-after's comma-separated pass names (or "all"); each must name a pass."""
    names = frozenset(t.strip() for t in (text or "").split(",") if t.strip())
    if names - {"all"}:
        from tcc.pipeline import get_pass
        for name in sorted(names - {"all"}):
            get_pass(name)  # UserError naming the unknown pass, with the closest names
    return names


def cmd_analyze(a) -> int:
    import tcc
    from tcc.pipeline import Pipeline
    analysis = Pipeline.parse(f"analyze-redundancy(out={a.output})") if a.output else None
    if analysis is not None:
        analysis.check_outputs(a.force)  # before tracing
    program = tcc.trace(a.model, task=a.task, seq_len=a.seq_len)
    if a.tokenizer:
        from tcc.evaluate import attach_tokenizer
        attach_tokenizer(program, a.tokenizer)
    if analysis is not None:
        from tcc.compress.calibration import calibration_data
        from tcc.pipeline import PassContext
        ctx = PassContext(calibration=calibration_data(program, a.calibration, n_samples=a.calibration_samples),
                          verbose=True, force=a.force)
        analysis.run(program, ctx)
        print(f"redundancy analysis written to {a.output}")
        return 0
    if a.json:
        print(json.dumps(program.info.to_json(), indent=2))
    else:
        print(program.info.describe())
    return 0


def cmd_targets(a) -> int:
    from tcc.pipeline.backend import targets as describe
    targets = describe()
    if a.json:
        print(json.dumps(dict(targets), indent=2))
    else:
        from tcc.pipeline.backend import target_aliases
        ALIASES = target_aliases()
        width = max(len(n) for n, _ in targets)
        for name, line in targets:
            aliases = [a for a, n in ALIASES.items() if n == name]
            print(f"{name:<{width}}  {line}" + (f" (also: {', '.join(aliases)})" if aliases else ""))
    return 0


def cmd_passes(a) -> int:
    from tcc.pipeline import all_passes
    passes = all_passes()
    if a.json:
        print(json.dumps({n: {"kind": c.kind, "doc": (c.__doc__ or "").strip(),
                              "options": {k: {"type": o.type_name, "default": o.default, "help": o.help,
                                              "choices": list(o.choices) if o.choices else None}
                                          for k, o in c.options.items()}} for n, c in passes.items()}, indent=2))
        return 0
    for name, cls in passes.items():
        doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
        print(f"{name}  [{cls.kind}]  {doc[0] if doc else ''}")
        for k, o in cls.options.items():
            choices = f" [{' | '.join(str(c) for c in o.choices)}]" if o.choices else ""
            print(f"    {k}: {o.type_name}{choices} = {o.default!r}  {o.help}")
        contract = (cls.__doc__ or "").strip()
        if contract:
            print("    " + "\n    ".join(contract.splitlines()))
        print()
    from tcc.pipeline import presets
    print(f"presets (named pipelines, for --preset or inside -p): {', '.join(presets.names())}; `tcc presets` "
          "shows what each expands to")
    return 0


def cmd_presets(a) -> int:
    from tcc.pipeline import presets
    if a.json:
        print(json.dumps({n: {"pipeline": p.pipeline, "aliases": list(p.aliases), "summary": p.summary,
                              "tradeoff": p.tradeoff} for n, p in presets.PRESETS.items()}, indent=2))
        return 0
    for name, p in presets.PRESETS.items():
        print(f"{name}{' (= ' + ', '.join(p.aliases) + ')' if p.aliases else ''}  {p.pipeline}")
        print(f"    {p.summary}")
        print(f"    measured: {p.tradeoff}")
    print("\nUse: tcc compile MODEL --preset NAME, or a name inside -p (e.g. -p 'drop-blocks(count=2),q4'); "
          "figures and their sources: docs/PIPELINES.md \"Presets\"")
    return 0


def cmd_info(a) -> int:
    from tcc import info
    described = info.describe(a.artifact)
    print(info.to_json(described) if a.json else info.format_text(described))
    return 0


COMPILE_DEFAULTS = {"target": "x86", "seq_len": 128, "batch": 1, "pipeline": "", "calibration_samples": 8,
                    "backend": "tvm"}


TOKENIZER_HELP = "the model's tokenizer (a Hugging Face folder with tokenizer files), for a model saved without one"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _compile_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return _subcommands(parser)["compile"]


def build_parser() -> argparse.ArgumentParser:
    from .frontends import models
    p = argparse.ArgumentParser(prog="tcc", description="transformer compression compiler", epilog=_epilog,
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"tcc {_version()}")
    for flags, help in GLOBAL_FLAGS:
        p.add_argument(*flags, action="store_true", help=help)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model to an artifact directory")
    # Defaults are None here and filled from COMPILE_DEFAULTS after a --recipe is applied.
    c.add_argument("model", nargs="?", help=_inputs_help() + " (or the recipe's)")
    c.add_argument("--recipe", help="TOML file with the compile's settings (docs/PIPELINES.md); flags given here win")
    c.add_argument("--target", "-t", help=lambda: "x86 (default: portable x86-64-v3, AVX2), native (this CPU: fastest "
                   "here, may not run elsewhere), " + ", ".join(n for n, _ in _targets()[2:]) + ", cuda (= sm80); "
                   "`tcc targets` describes them").completer = lambda **_: [n for n, _ in _targets()] + ["cuda"]
    c.add_argument("-o", "--output", help="artifact directory (default build/MODEL-TARGET)")
    c.add_argument("--seq-len", type=int, help="sequence length (default 128)")
    c.add_argument("--max-seq-len", type=int, help="any sequence length from 1 to N (x86; default: static --seq-len)")
    c.add_argument("--batch", type=int, help="batch size (default 1)")
    c.add_argument("--max-context", type=int, help="causal LMs: KV-cache positions of the prefill/decode entry points "
                   "(default min(model maximum, 2048))")
    c.add_argument("--no-generate", action="store_true", help="causal LMs: build the forward pass only, no prefill/decode")
    c.add_argument("--kv-cache", choices=("fp32", "int8"), default="fp32",
                   help="causal LMs: how the KV cache stores keys and values: fp32 (default), or int8 with one float32 "
                   "scale per KV head and position, (D+4)/(4D) of the fp32 bytes for head dim D (0.27x at D=64)")
    c.add_argument("--draft", metavar="PIPELINE", help="causal LMs: build a draft program from the same model with this "
                   "pipeline into the artifact, for speculative decoding (tcc generate --speculate draft), e.g. "
                   "'drop-blocks(ratio=0.5),quantize(weights=int4)'; auto: the candidate with the best expected "
                   "speed-up from its measured agreement with the model on the calibration text and its size")
    c.add_argument("--task", choices=models.TASKS)
    c.add_argument("--dtype", choices=["fp32", "bf16"], help="float weights stored as fp32 or bf16 (the bf16 pass; "
                   "math stays fp32); default: the checkpoint's (bf16 for a model saved in bf16, else fp32)")
    c.add_argument("--pipeline", "-p", help="pass pipeline, e.g. 'quantize-weights(bits=8)' or "
                   "'drop-blocks(count=2),q4' (preset names stand for their passes); `tcc passes` lists the passes")
    c.add_argument("--preset", metavar="NAME", help=lambda: "a named pipeline: " + ", ".join(_presets()) +
                   "; `tcc presets` shows each one's passes and measured trade-off").completer = lambda **_: _presets()
    c.add_argument("--calibration", help="text file for calibrating passes (default: $TCC_CALIBRATION_TEXT, else the "
                   "English text shipped with tcc, tcc/data/calibration.txt: its second half)")
    c.add_argument("--calibration-samples", type=int, help="calibration windows of --seq-len tokens (default 8)")
    c.add_argument("--tokenizer", metavar="DIR", help=TOKENIZER_HELP + "; with no tokenizer at all, calibrate on "
                   "token ids: --calibration ids.npy or ids.npz (integer arrays, windows of --seq-len cut from their rows)")
    c.add_argument("--backend", choices=["tvm", "onnxruntime"],
                   help="tvm: native library for the target (default); onnxruntime: ONNX for ORT on this host")
    c.add_argument("--max-drift", type=float, help="accuracy budget: fail with exit 3, writing no artifact, when an "
                   "output differs from the source model's by more than this (max relative error)")
    c.add_argument("--no-verify", action="store_true", help="skip running the artifact against PyTorch")
    c.add_argument("--no-latency", action="store_true", help="skip timing the artifact against its baseline (the "
                   "source compiled without passes) for report.json; TCC_NO_LATENCY=1 does so for every compile")
    c.add_argument("--no-eval", action="store_true", help="skip the task accuracy against the source on the held-out "
                   "text shipped with tcc (perplexity, embedding cosine or top-1 agreement) in report.json; TCC_NO_EVAL=1 does "
                   "so for every compile")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write tcc's caches ($TCC_CACHE)")
    c.add_argument("--print-after", metavar="PASS", default="", help="print the graph after these passes "
                   "(comma-separated pass names, or all) to stdout")
    c.add_argument("--report", help="copy report.json here (written on failure too, with the exit status)")
    c.add_argument("--force", action="store_true",
                   help="replace what is at -o, --report or --search-dir even when tcc did not write it")
    c.add_argument("--json", action="store_true")
    c.add_argument("--max-accuracy-drop", metavar="DROP",
                   help="search for the pipeline: most compressed within this accuracy drop (1%% or 0.01)")
    c.add_argument("--objective", choices=["latency", "size"], help="search: minimise latency (default) or weight bytes")
    c.add_argument("--time-limit", "--budget", dest="budget", metavar="TIME", action=_Renamed,
                   help="search: start no new trial after this long (20m, 90s, 1h); --budget is its old name")
    c.add_argument("--heal-steps", type=int, metavar="N",
                   help="search: heal N steps after structural passes, and retry a quantization that misses the "
                        "budget healed through its quantizer (off by default: minutes a trial)")
    c.add_argument("--search-dir", metavar="DIR", help="search: trials, Pareto front, plot (default OUTPUT-search; "
                   "a rerun resumes)")
    c.add_argument("--bundle", metavar="DIR", help="also write a self-contained bundle of the artifact here (tcc export)")
    c.set_defaults(func=cmd_compile)

    ex = sub.add_parser("export", help="write a self-contained native bundle of an artifact (C API, no Python)")
    ex.add_argument("artifact")
    ex.add_argument("--bundle", metavar="DIR", required=True, help="the bundle directory: lib/, include/tcc.h, bin/tcc-run, "
                    "bin/tcc-generate (causal LMs), weights, manifest (docs/DEPLOY.md)")
    ex.add_argument("--force", action="store_true", help="replace --bundle even when tcc did not write it")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    r = sub.add_parser("run", help="run an artifact on inputs from an .npz")
    r.add_argument("artifact")
    r.add_argument("--inputs", "-i", required=True, help="an .npz with one array per input name")
    r.add_argument("-o", "--output", required=True, help="the .npz to write the outputs to")
    r.add_argument("--force", action="store_true", help="replace -o even when it is not an .npz tcc run wrote")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="accuracy: perplexity (causal LM) or embedding cosine vs the source (encoder)")
    e.add_argument("artifact")
    e.add_argument("--text", required=True, help="text file, e.g. ../shared/data/wikitext-2/test.txt")
    e.add_argument("--max-tokens", type=int, default=4096, help="causal LMs: score the first N tokens of --text")
    e.add_argument("--stride", type=int, default=None, help="sliding-window stride (default seq_len/2)")
    e.add_argument("--max-samples", type=int, default=64, help="sentences for encoder cosine")
    e.add_argument("--kv-cache", action="store_true", help="causal LMs: score every token through the artifact's "
                   "prefill/decode entry points (its KV cache, e.g. --kv-cache int8) instead of main: one decode step "
                   "per scored token")
    e.add_argument("--window", type=int, help="with --kv-cache: window length in tokens (default: the artifact's context)")
    e.add_argument("--tokenizer", metavar="DIR", help=TOKENIZER_HELP + " (default: the artifact's)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    gn = sub.add_parser("generate", help="generate text with a causal-LM artifact (KV cache, streamed)")
    gn.add_argument("artifact")
    prompt = gn.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="the prompt as token ids, e.g. 1,2,3 (artifacts without a "
                        "tokenizer take only these, and print the new ids)")
    gn.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    gn.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    gn.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    gn.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability")
    gn.add_argument("--seed", type=int, default=0, help="sampling seed")
    gn.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    gn.add_argument("--speculate", choices=("off", "lookup", "draft", "auto"), default="off",
                    help="speculative decoding: the target checks proposed tokens in one call each: lookup (n-grams "
                    "of the context, no draft model), draft (the artifact's --draft program, prompt lookup filling "
                    "the rows it leaves) or auto (draft where the artifact has one of at most 0.3x the target's parameter "
                    "bytes, else lookup); the same tokens when "
                    "greedy, the same distribution when sampling")
    gn.add_argument("--compare", action="store_true", help="with --speculate: also generate without it and report "
                    "the decode speed-up and whether the tokens are the same")
    gn.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="latency vs PyTorch eager and ONNX Runtime, same run")
    b.add_argument("artifact")
    b.add_argument("--repeats", type=int, default=20, help="timed calls per engine")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls per engine first")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    an = sub.add_parser("analyze", help="show what tcc recovers from a model")
    an.add_argument("model")
    an.add_argument("--structure", action="store_true", default=True, help="print the recovered structure (default)")
    an.add_argument("--seq-len", type=int, default=16, help="sequence length to trace at")
    an.add_argument("-o", "--output", help="run analyze-redundancy on calibration text and write JSON + heatmap PNG here")
    an.add_argument("--force", action="store_true", help="write -o even when it holds something tcc did not write")
    an.add_argument("--calibration", help="calibration text (default: $TCC_CALIBRATION_TEXT, else tcc/data/calibration.txt)")
    an.add_argument("--calibration-samples", type=int, default=8, help="calibration windows of --seq-len tokens")
    an.add_argument("--tokenizer", metavar="DIR", help=TOKENIZER_HELP + "; or calibrate on token ids: "
                    "--calibration ids.npy or ids.npz")
    an.add_argument("--task", choices=models.TASKS)
    an.add_argument("--json", action="store_true")
    an.set_defaults(func=cmd_analyze)

    ps = sub.add_parser("passes", help="list registered passes, their options and contracts")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_passes)

    tg = sub.add_parser("targets", help="list the compile targets (--target), one line each")
    tg.add_argument("--json", action="store_true")
    tg.set_defaults(func=cmd_targets)

    pr = sub.add_parser("presets", help="list the presets (named pipelines for --preset or -p) and their trade-offs")
    pr.add_argument("--json", action="store_true", help="print {name: {pipeline, aliases, summary, tradeoff}}")
    pr.set_defaults(func=cmd_presets)

    inf = sub.add_parser("info", help="what an artifact is, what was done to the model, what the compile measured")
    inf.add_argument("artifact")
    inf.add_argument("--json", action="store_true", help="print it as JSON (the fields: tcc/info.py)")
    inf.set_defaults(func=cmd_info)

    co = sub.add_parser("completion", help="print the shell code that completes tcc's commands, flags and choices "
                        "(bash: eval \"$(tcc completion bash)\" in ~/.bashrc)")
    co.add_argument("shell", choices=SHELLS)
    co.set_defaults(func=cmd_completion)
    _conventions(sub)
    return p


SHELLS = ("bash", "zsh", "fish")


def cmd_completion(a) -> int:
    """argcomplete's shell code for `tcc` (the completions come from build_parser, through _complete)."""
    import argcomplete
    print(argcomplete.shellcode(["tcc"], shell=a.shell))
    return 0


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request (argcomplete sets _ARGCOMPLETE) and exit; else nothing."""
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete
        for p in [parser, *_subcommands(parser).values()]:
            for action in p._actions:  # argcomplete shows the helps as the choices' descriptions
                action.help = _text(action.help)
        argcomplete.autocomplete(parser)


class _Renamed(argparse.Action):
    """An option with a new name whose old name (its last option string) still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == self.option_strings[-1]:
            print(f"tcc: warning: {option_string} is now {self.option_strings[0]}; the old name will go", file=sys.stderr)
        setattr(namespace, self.dest, values)


GLOBAL_FLAGS = [(("--debug",), "show tracebacks, and what the libraries (TVM, PyTorch) print (else kept in the "
                 "artifact's build.log)"),
                (("-q", "--quiet"), "no progress output")]


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that shows an option's default where its help does not say it already, and keeps the
    epilog's line breaks."""

    def _format_text(self, text):
        return super()._format_text(_text(text))

    def _format_action(self, action):
        action.help = _text(action.help)
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""  # a str: _format_action made it one
        if (action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
                and "default" not in text and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _conventions(sub) -> None:
    """What every command shares: the global flags also after the command (default SUPPRESS, so
    the value given before the command stays), defaults in the help, help for --json, ARTIFACT and
    MODEL."""
    for name, parser in sub.choices.items():
        parser.formatter_class = _Help
        for flags, help in GLOBAL_FLAGS:
            parser.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=help)
        for action in parser._actions:
            if action.help:
                continue
            if action.dest == "json":
                action.help = "print the result as JSON instead of text"
            elif action.dest == "artifact":
                action.help = "an artifact directory (what `tcc compile` wrote)"
            elif action.dest == "model":
                action.help = _inputs_help()
            elif action.dest == "task":
                action.help = "what the model computes (default: from its config)"


def _inputs_help() -> str:
    from tcc.frontends import models
    return ("a Hugging Face model folder (config.json and safetensors), a .gguf file, an .onnx file, or a built-in "
            "alias: " + ", ".join(models.ALIASES))


def _targets() -> list[tuple[str, str]]:
    from tcc.pipeline.backend import targets
    return targets()


def _presets() -> list[str]:
    from tcc.pipeline import presets
    return presets.names()


def _text(help):
    """A help text, or the function that makes it: the target and preset lists import torch and the
    backends (seconds), so they are made only when a help page shows them, not on every command."""
    return help() if callable(help) else help


def _epilog() -> str:
    from tcc.frontends import models
    return "\n".join([
        "MODEL: a Hugging Face model folder, a .gguf file, an .onnx file, or a built-in alias:",
        *(f"  {name:<8} {what}" for name, what in models.ALIASES.items()),
        "targets (--target): " + ", ".join(n for n, _ in _targets()) + ", cuda (= sm80); `tcc targets`",
        "presets (--preset, or a name inside -p): " + ", ".join(_presets()) + "; `tcc presets`",
        "--debug and -q go before or after the command; `tcc COMMAND -h` shows a command's flags."])


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("tcc")
    except importlib.metadata.PackageNotFoundError:  # a source checkout that is not installed
        from tcc import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _complete(parser)
    args = parser.parse_args(argv)
    args.argv = argv  # a --recipe is parsed in front of these flags
    _quiet_libraries()
    from tcc.errors import TccError
    from tcc.progress import console, set_quiet, show_library_output
    set_quiet(args.quiet or getattr(args, "json", False))
    show_library_output(args.debug)  # else TVM's log and other libraries' output go to the artifact's build.log
    try:
        return args.func(args)
    except TccError as e:
        if args.debug:
            raise
        from rich.markup import escape
        console.print(f"[bold red]tcc: error:[/bold red] {escape(e.message)}", highlight=False, markup=True)
        if e.hint:
            console.print(f"  hint: {e.hint}", highlight=False, markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("tcc: interrupted")
        return 130
    except BrokenPipeError:  # `tcc passes | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if args.debug:
            raise
        console.print(f"[bold red]tcc: internal error:[/bold red] {type(e).__name__}: {e}", markup=True, highlight=False)
        console.print("  hint: run again with --debug for the traceback, and report it")
        return 1


def run() -> None:
    """The `tcc` command (console script and `python -m tcc.cli`): main()'s exit status. After an
    interrupt it leaves with os._exit(130): CPython ends a process whose KeyboardInterrupt went through
    code run by PyRun_* (pyo3 libraries, safetensors among them, run Python that way) by re-raising
    SIGINT at exit, even when tcc caught it and cleaned up: exit status -2, not 130."""
    code = main()
    if code == 130:
        for f in (sys.stdout, sys.stderr):
            f.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    run()
