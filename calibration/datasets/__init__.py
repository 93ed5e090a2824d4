"""Readers that turn local copies of public VLM safety benchmarks into evaluation JSONL.

One module per dataset, each reading the dataset's own release layout (its docstring says
which), plus the FigStep-style typographic renderer. Only the standard library and Pillow.
"""
