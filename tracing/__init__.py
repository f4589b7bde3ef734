"""Frontend: a PyTorch module -> pockprop IR, via torch.export and core ATen (trace.py)."""
