"""The PyTorch reference of a compiled training step, and the comparison of the two over a few steps.

The reference trains the artifact's parameters with torch.optim and zeroes gradient entries outside each
slice of a scheme; with weight decay off the frozen part of a sliced tensor stays bit-identical in both.
The compiled side goes through save -> runtime.Trainer, the path a device takes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from pockprop.compiler.compile import TracedModel, compile, compile_traced
from pockprop.runtime.trainer import Trainer
from tests.compiler.zoo_cases import torch_optimizer

Batch = tuple[Any, torch.Tensor]  # (inputs: a tensor, a tuple or a dict of keyword tensors; labels)


def _numpy(x: Any) -> Any:
    """A batch's inputs as the runtime takes them (arrays, a tuple of them or a dict by name)."""
    if isinstance(x, dict):
        return {k: v.numpy() for k, v in x.items()}
    return tuple(v.numpy() for v in x) if isinstance(x, tuple) else x.numpy()


def _call(model: torch.nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)


def trained_masks(art: Any, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Per trained parameter, 1 where the artifact updates it and 0 elsewhere."""
    masks = {}
    for s in art.state:
        if s.role != "param":
            continue
        mask = torch.zeros_like(params[s.name])
        idx = [slice(None)] * mask.dim()
        if s.spec.slice is not None:
            idx[s.spec.slice.axis] = slice(s.spec.slice.start, s.spec.slice.stop)
        mask[tuple(idx)] = 1
        masks[s.name] = mask
    return masks


def assert_trains_like_torch(build: Callable[[], torch.nn.Module], batches: Sequence[Batch],
                             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: dict[str, Any],
                             tmp_path: Any, rtol: float = 1e-4, atol: float = 1e-5,
                             traced: TracedModel | None = None, **compile_kw: Any) -> Any:
    """Compile build() on the first batch (or compile `traced`, the same model traced once already), take a step
    per batch on the runtime and in torch, and check the losses, every trained tensor (its slice) and that torch
    left every other value alone. A batch's inputs are a tensor, a tuple of positional tensors or a dict of
    keyword tensors; loss_fn takes what the model returns (a ModelOutput, say) and the labels. Returns the
    artifact; its `errors` attribute holds the largest relative loss difference and the largest absolute
    difference of a trained tensor."""
    x0, y0 = batches[0]
    if traced is None:
        art = compile(build(), x0 if isinstance(x0, (tuple, dict)) else (x0,), labels=y0, optimizer=optimizer,
                      **compile_kw)
    else:
        art = compile_traced(traced, labels=y0, optimizer=optimizer, **compile_kw)
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)
    losses = [trainer.step(_numpy(x), y.numpy()) for x, y in batches]

    ref = build()
    params = dict(ref.named_parameters())
    masks = trained_masks(art, params)
    for n, p in params.items():
        p.requires_grad_(n in masks)
    opt = torch_optimizer(optimizer, [params[n] for n in masks])
    before = {n: p.detach().clone() for n, p in params.items()}
    ref_losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(_call(ref, x), y)
        loss.backward()
        for n, m in masks.items():
            params[n].grad *= m
        opt.step()
        ref_losses.append(loss.item())

    np.testing.assert_allclose(losses, ref_losses, rtol=rtol, atol=atol)
    worst = 0.0
    for s in art.state:
        if s.role != "param":
            continue
        full = params[s.name].detach()
        sl = s.spec.slice
        part = full.narrow(sl.axis, sl.start, sl.stop - sl.start) if sl else full
        np.testing.assert_allclose(trainer.state[s.name], part.numpy(), rtol=rtol, atol=atol, err_msg=s.name)
        worst = max(worst, float(np.max(np.abs(trainer.state[s.name] - part.numpy()), initial=0.0)))
        frozen = masks[s.name] == 0
        assert torch.equal(full[frozen], before[s.name][frozen]), f"frozen part of {s.name} moved in torch"
    for n, p in params.items():
        if n not in masks:
            assert torch.equal(p, before[n]), f"{n} is not trained, but torch changed it"
    art.errors = {"loss_rel": float(np.max(np.abs(np.subtract(losses, ref_losses)) / np.abs(ref_losses))),
                  "weight_abs": worst}
    return art
