"""tcc's CUDA kernels: sources (*.cu, *.cuh), the 2:4 layout (layout.py) and a CPU replay (emulate.py)."""
