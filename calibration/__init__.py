"""Calibration: pick Oh Defense's head, SafePTR's window, GuardAlign's strength and thresholds.

Offline half (docs/architecture.md): reads labelled JSONL samples, runs the source model in
PyTorch and writes a policy file (optionally into a bundle) with the evidence for every choice.
"""
