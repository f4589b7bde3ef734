"""A model's blocks: the units that scheme presets (last-k, sparse, tbft-*) count and choose.

`module_tree(model)` lists the modules that hold parameters as (path, is_block), in module order:

- The children of a **stack** are blocks. A stack is an `nn.Sequential` or `nn.ModuleList` of repeated
  blocks: more than half of its children that hold parameters are of one class, and at least two are
  (a ModuleList of a single child counts too: a one-layer configuration of a transformer).
- The stack is found wherever it is nested: a module that holds a stack somewhere below is descended
  into, so `bert.encoder.layer.N`, `model.layers.N`, `transformer.h.N`, `vit.encoder.layer.N` are
  blocks, and the modules met on the way that hold no stack (embeddings, a final norm, a pooler, the
  head) are listed whole as non-block units. Several stacks (an encoder and a decoder) all count.
- The model's own top-level containers (and a model that is itself a container) keep the rule that
  predates stacks: every child of theirs is a block, repeated or not (MCUNet's `first_conv.conv`,
  `first_conv.bn`), unless that child holds a stack itself.

`blocks(tree)` names them: a block is its path; consecutive non-block units form one block named
`a+b` (a ResNet's `conv1+bn1` stem, BERT's `bert.pooler+classifier` tail).
"""
from __future__ import annotations

from collections import Counter
from typing import Any


def _holds_parameters(module: Any) -> bool:
    return any(True for _ in module.parameters())


def _is_stack(module: Any) -> bool:
    import torch.nn as nn

    if not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return False
    kinds = Counter(type(c) for c in module.children() if _holds_parameters(c))
    if not kinds:
        return False
    most = max(kinds.values())
    return 2 * most > sum(kinds.values()) and (most >= 2 or isinstance(module, nn.ModuleList))


def _holds_stack(module: Any) -> bool:
    return any(_is_stack(m) for m in module.modules())


def module_tree(model: Any) -> list[tuple[str, bool]]:
    """The modules holding parameters that presets see, as (path, is_block), in module order."""
    import torch.nn as nn

    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    top_is_container = isinstance(model, containers)

    def walk(module: Any, prefix: str, children_are_blocks: bool, top: bool) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for name, child in module.named_children():
            if not _holds_parameters(child):
                continue
            path = prefix + name
            expand = _is_stack(child) or (top and not top_is_container and isinstance(child, containers))
            if expand or _holds_stack(child):
                out += walk(child, path + ".", expand, False)
            else:
                out.append((path, children_are_blocks))
        return out

    return walk(model, "", top_is_container, True)


def blocks(tree: list[tuple[str, bool]]) -> list[tuple[str, str]]:
    """(block name, module prefix) pairs; non-block units in a row share one block named a+b."""
    out: list[tuple[str, str]] = []
    run: list[str] = []
    for path, is_block in tree:
        if is_block:
            if run:
                out += [("+".join(run), r) for r in run]
                run = []
            out.append((path, path))
        else:
            run.append(path)
    if run:
        out += [("+".join(run), r) for r in run]
    return out
