"""Frontends: models into Programs. frontend.py (torch.export: HF folders, nn.Modules, GGUF through
models.py), onnx_frontend.py (ONNX files), models.py (the aliases, downloads, GGUF checkpoints).
"""
