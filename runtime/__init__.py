"""pockprop device runtime: trains a compiled artifact with numpy + onnxruntime only (never torch)."""
