"""pockprop compiler: PyTorch model -> ONNX training-step graph (trace, IR, autodiff, passes, emit)."""
