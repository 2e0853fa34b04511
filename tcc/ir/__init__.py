"""The IR every layer shares: Program (program.py), tcc's custom ops with their reference numerics and operand
specs (ops.py), the canonical form (canonical.py), structure recovery (structure.py: ModelInfo) and
the graph helpers written once (graph.py). Imports nothing from the layers above.
"""
