"""The compression algorithms passes call: calibration, quantization, rotation, sparsity, heads,
tokens, elimination (exact removal of sub-blocks) and redundancy (analysis; choosing what to drop).
Passes (passes/) are thin: contract -> match -> rewrite -> verify, calling these.
"""
