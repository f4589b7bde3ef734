"""Per zoo model: the compiled training step on onnxruntime equals PyTorch's step.

Loss and every updated tensor (rtol 1e-4 / atol 1e-5) for five consecutive steps, with SGD+momentum
and AdamW, all-trainable and partly frozen. The artifact goes through save -> runtime.Trainer, the
path a device takes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pockprop.compiler.compile import compile
from pockprop.runtime.trainer import Trainer
from tests.compiler.zoo_cases import CASES, IDS, ZooCase, batch, build, torch_optimizer

OPTIMIZERS = {
    "sgd_momentum": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
    # eps bounds how much AdamW amplifies gradient noise (d update / d g <= lr / eps). With torch's 1e-8 a
    # gradient element of ~1e-7 (a cancelling sum) turns float32 summation-order noise into a visible
    # fraction of a step; 1e-5 keeps the comparison about our gradients and update formula, not rounding.
    "adamw": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "eps": 1e-5},
}
STEPS = 5


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("selection", ["all", "partial"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_steps_match_pytorch(case: ZooCase, selection: str, opt_name: str, tmp_path) -> None:
    spec = OPTIMIZERS[opt_name]
    patterns = None if selection == "all" else list(case.partial)
    model = build(case)
    x0, y0 = batch(case, 0)
    art = compile(model, (x0,), labels=y0, loss="cross_entropy", optimizer=spec, trainable=patterns)
    trainer = Trainer.load(art.save(str(tmp_path / "art")), threads=1)

    ref = build(case)
    names = set(art.trainable)
    for n, p in ref.named_parameters():
        p.requires_grad_(n in names)
    params = dict(ref.named_parameters())
    opt = torch_optimizer(spec, [params[n] for n in art.trainable])
    frozen_before = {n: p.detach().clone() for n, p in params.items() if n not in names}

    for step in range(STEPS):
        x, y = batch(case, step)
        loss = trainer.step(x.numpy(), y.numpy())
        opt.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        opt.step()
        np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-4, atol=1e-5, err_msg=f"loss at step {step}")
        for n in art.trainable:
            np.testing.assert_allclose(trainer.state[n], params[n].detach().numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{n} after step {step + 1}")
    for n, before in frozen_before.items():
        assert torch.equal(params[n], before)  # the reference really kept them frozen too
    np.testing.assert_allclose(trainer.predict(x0.numpy()), ref(x0).detach().numpy(), rtol=1e-4, atol=1e-4)
