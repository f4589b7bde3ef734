"""How traced values are named: a parameter keeps torch's fully qualified name, `<module path>.<attribute>`
(`features.3.conv.0.weight`), so the module that owns it is everything before the last dot (stdlib only)."""
from __future__ import annotations


def module_of(parameter: str) -> str:
    """The path of the module that owns `parameter`: 'layer1.0.conv1' for 'layer1.0.conv1.weight', and ''
    (the top-level module) for a parameter of the model itself, such as 'weight' of a bare nn.Linear."""
    return parameter.rsplit(".", 1)[0] if "." in parameter else ""
