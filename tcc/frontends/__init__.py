"""Frontends: models into Programs. registry.py (a frontend per kind of model: register_frontend, find;
entry-point group "tcc.frontends"), frontend.py (torch.export: HF folders, GGUF files, nn.Modules,
ExportedPrograms), onnx_frontend.py (ONNX files), models.py (the aliases, downloads, GGUF checkpoints).
"""
from .registry import Frontend, find, register_frontend  # noqa: F401
