"""Emission: IR graph -> standard ONNX (onnx.py)."""
