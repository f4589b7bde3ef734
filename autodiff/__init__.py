"""Compile-time reverse-mode autodiff over the IR (backward.py) and its torch oracle (gradcheck.py)."""
