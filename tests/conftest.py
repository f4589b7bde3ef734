"""Suite-wide settings: every pass pipeline verifies the graph after each pass that changed it."""
import os

os.environ.setdefault("POCKPROP_VERIFY", "1")
