"""LoRA compiled into the step (compiler/lora.py): the step trains like PyTorch + peft, the frozen W gets no
gradient, the exported model is merged (no adapter nodes) and predicts what the unmerged model predicts."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from pockprop.artifact.contract import Manifest
from pockprop.compiler.compile import compile, compile_traced, trace_model
from pockprop.compiler.lora import parse_spec
from pockprop.errors import ArtifactError, CompileError
from pockprop.runtime.trainer import Trainer
from tests.compiler.torch_ref import assert_trains_like_torch
from tests.compiler.zoo_cases import torch_optimizer

peft = pytest.importorskip("peft")

D_IN, HIDDEN, CLASSES, N, T = 5, 7, 3, 4, 2
OPTIMIZERS = [{"name": "sgd", "lr": 0.2, "momentum": 0.9},
              {"name": "adamw", "lr": 5e-2, "weight_decay": 0.01, "eps": 1e-6}]


class Block(nn.Module):
    """A token block: q_proj and v_proj (the usual LoRA targets) on (N, T, D) inputs, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D_IN, HIDDEN)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.v_proj(torch.relu(self.q_proj(x))))
        return self.head(h.mean(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).mean((2, 3)))


def _block() -> nn.Module:
    torch.manual_seed(0)
    return Block()


def _batches(shape: tuple[int, ...], steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g), torch.randint(0, CLASSES, (shape[0],), generator=g)) for _ in range(steps)]


def _ours(peft_name: str) -> str:
    """Our name of a peft model's parameter: q_proj.lora_A.weight for ...q_proj.lora_A.default.weight."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".default", "")


def _peft_twin(build, art, targets: list[str]) -> nn.Module:  # type: ignore[no-untyped-def]
    """build() wrapped by peft with the artifact's r, alpha and initial A and B copied in."""
    ad = art.adapters[0]
    r = art.initial_state()[ad.a].shape[0]
    model = peft.get_peft_model(build(), peft.LoraConfig(r=r, lora_alpha=ad.scale * r, target_modules=targets))
    init = art.initial_state()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                ours = _ours(name)
                p.copy_(torch.from_numpy(init[ours]))
    return model


def _torch_losses(ref: nn.Module, batches, opt: dict) -> list[float]:  # type: ignore[no-untyped-def, type-arg]
    """A step of torch's optimizer per batch on the parameters of `ref` that require grad; the losses."""
    optim = torch_optimizer(opt, [p for p in ref.parameters() if p.requires_grad])
    out = []
    for x, y in batches:
        optim.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        optim.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["name"])
@pytest.mark.parametrize("model,shape,targets", [
    (_block, (N, T, D_IN), ["q_proj", "v_proj"]),
    (lambda: (torch.manual_seed(0), ConvNet())[1], (N, 3, 6, 6), ["conv"]),
], ids=["linear", "conv"])
def test_lora_steps_match_peft(model, shape, targets, opt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """compile(lora=...) against peft's LoRA with the same initial A and B, 3 steps, rtol 1e-4."""
    batches = _batches(shape)
    art = compile(model(), batches[0][0], labels=batches[0][1], optimizer=opt,
                  lora={"r": 2, "alpha": 6, "targets": targets, "dropout": 0})
    assert {s.name for s in art.state if s.role == "param"} == {n for a in art.adapters for n in (a.a, a.b)}
    trainer = Trainer.load(art.save(str(tmp_path / "a")), threads=1)
    losses = [trainer.step(x.numpy(), y.numpy()) for x, y in batches]

    ref = _peft_twin(model, art, targets)
    np.testing.assert_allclose(losses, _torch_losses(ref, batches, opt), rtol=1e-4)
    for name, p in ref.named_parameters():
        if p.requires_grad:
            ours = _ours(name)
            np.testing.assert_allclose(trainer.state[ours], p.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    _check_merged_export(trainer, batches[0][0].numpy(), tmp_path, ref(batches[0][0]).detach().numpy())


def _check_merged_export(trainer: Trainer, x: np.ndarray, tmp_path, expected: np.ndarray) -> None:  # type: ignore
    """predict (merged on the fly) and the exported model (merged weights, no adapter nodes) give
    `expected` (the unmerged model's output) to 1e-5."""
    path = trainer.export_inference(str(tmp_path / "model.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inits = {i.name for i in onnx.load(path).graph.initializer}
    assert not [n for n in inits if "lora_" in n], "adapter tensors left in the exported model"
    assert len(sess.get_inputs()) == 1
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trainer.predict(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_equals_the_unmerged_training_graph(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """After training, the training step's own (unmerged) forward output equals the merged prediction."""
    batches = _batches((N, T, D_IN))
    art = compile(_block(), batches[0][0], labels=batches[0][1], optimizer=OPTIMIZERS[0],
                  lora={"r": 3, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    trainer = Trainer.load(art.save(str(tmp_path / "a")), threads=1)
    for x, y in batches:
        trainer.step(x.numpy(), y.numpy())
    x, y = batches[0]
    sess = ort.InferenceSession(str(tmp_path / "a" / "train_step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "labels": y.numpy(), "lr": np.zeros((), np.float32)} | {
        s.name: trainer.state[s.name] for s in trainer.manifest.state}
    unmerged = sess.run([trainer.manifest.outputs.prediction], feeds)[0]
    assert np.abs(unmerged).max() > 0 and np.abs(trainer.state["q_proj.lora_B.weight"]).max() > 0
    _check_merged_export(trainer, x.numpy(), tmp_path, unmerged)


def test_no_gradient_for_a_lora_frozen_weight() -> None:
    """The backward graph builds no dW for an adapted W (no backward value of W's shape, which no other
    value has here), and the lowest adapted layer's W is not read by backward at all (nothing below it
    is trained, so no input gradient); compiled with W trained, the dW is there."""
    x, y = _batches((N, T, D_IN))[0]
    art = compile(_block(), x, labels=y, lora={"r": 2, "alpha": 4, "targets": ["q_proj"]})
    g = art.train_graph
    w_type = g.types["q_proj.weight"]
    backward = [n for n in g.nodes if n.phase == "backward"]
    assert backward
    assert not [n for n in backward if any(g.types[o] == w_type for o in n.outputs)]
    assert not [n for n in backward if "q_proj.weight" in n.inputs]
    assert [n for n in backward if "q_proj.lora_B.weight" not in n.inputs and any(
        g.types[o] == g.types["q_proj.lora_A.weight"] for o in n.outputs)], "A's gradient is computed"
    full = compile(_block(), x, labels=y, trainable="q_proj.weight").train_graph
    assert [n for n in full.nodes if n.phase == "backward" and any(full.types[o] == w_type for o in n.outputs)]


@pytest.mark.parametrize("how", ["trainable", "scheme"])
def test_lora_with_a_scheme_trains_the_union(how: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """LoRA on q_proj plus the head (patterns) or every bias and the head (scheme bias-only): both are
    trained, and the step matches peft with the head (or the biases) unfrozen in torch."""
    batches = _batches((N, T, D_IN))
    kw = {"trainable": "head.*"} if how == "trainable" else {"scheme": "bias-only"}
    art = compile(_block(), batches[0][0], labels=batches[0][1], optimizer=OPTIMIZERS[1],
                  lora={"r": 2, "alpha": 2, "targets": ["q_proj"], "seed": 3}, **kw)
    names = [s.name for s in art.state if s.role == "param"]
    assert {"q_proj.lora_A.weight", "q_proj.lora_B.weight", "head.weight", "head.bias"} <= set(names)
    assert ("v_proj.bias" in names) == (how == "scheme") and "q_proj.weight" not in names
    trainer = Trainer.load(art.save(str(tmp_path / "a")), threads=1)
    losses = [trainer.step(x.numpy(), y.numpy()) for x, y in batches]
    ref = _peft_twin(_block, art, ["q_proj"])
    for name, p in ref.named_parameters():
        ours = _ours(name)
        p.requires_grad_(ours in names)
    np.testing.assert_allclose(losses, _torch_losses(ref, batches, OPTIMIZERS[1]), rtol=1e-4)
    np.testing.assert_allclose(trainer.state["head.weight"], ref.base_model.model.head.weight.detach().numpy(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o["name"])
def test_a_peft_model_trains_like_peft_and_exports_merged(opt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A model wrapped by peft (B made non-zero, rslora so the scale is not alpha/r): its adapters are
    found, only they train, as in torch; the export holds one weight per layer."""
    def build() -> nn.Module:
        m = peft.get_peft_model(_block(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                                         use_rslora=True))
        torch.manual_seed(5)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        return m

    batches = _batches((N, T, D_IN))
    art = assert_trains_like_torch(build, batches, nn.functional.cross_entropy, opt, tmp_path)
    assert len(art.adapters) == 2 and art.adapters[0].scale == pytest.approx(3 / np.sqrt(2))
    assert art.trainable == [n for a in art.adapters for n in (a.a, a.b)]
    assert all("lora" not in n.name for n in art.infer_model.graph.node)
    trainer = Trainer.load(str(tmp_path / "art"), threads=1)
    ref = build()
    ref.load_state_dict({k: torch.from_numpy(trainer.state[k]) for k in trainer.state if k in ref.state_dict()},
                        strict=False)
    _check_merged_export(trainer, batches[1][0].numpy(), tmp_path, ref(batches[1][0]).detach().numpy())


def test_refusals() -> None:
    x = torch.randn(N, T, D_IN)
    tm = trace_model(_block(), x)
    with pytest.raises(CompileError, match=r"'k_proj'.*q_proj, v_proj"):
        compile_traced(tm, lora={"r": 2, "targets": ["q_proj", "k_proj"]})
    with pytest.raises(CompileError, match="dropout"):
        compile_traced(tm, lora={"r": 2, "targets": ["q_proj"], "dropout": 0.1})
    with pytest.raises(CompileError, match="is trained"):
        compile_traced(tm, trainable="q_proj.weight", lora={"r": 2, "targets": ["q_proj"]})
    with pytest.raises(CompileError, match="depthwise"):
        compile(ConvNet(), torch.randn(2, 3, 6, 6), lora={"r": 2, "targets": ["dw"]})
    with pytest.raises(CompileError, match="lora_dropout"):
        compile(peft.get_peft_model(_block(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.1)), x)
    # a pattern: every *_proj, as peft's target_modules would match them
    assert len(compile_traced(tm, lora={"r": 1, "targets": ["*_proj"]}).adapters) == 2


@pytest.mark.parametrize("text,want", [
    ("r=8,alpha=16,targets=q_proj,v_proj", {"r": 8, "alpha": 16.0, "targets": ("q_proj", "v_proj")}),
    ("targets=fc,r=4", {"r": 4, "alpha": 4.0, "targets": ("fc",)}),
])
def test_parse_spec(text: str, want: dict) -> None:  # type: ignore[type-arg]
    spec = parse_spec(text)
    assert {k: getattr(spec, k) for k in want} == want


@pytest.mark.parametrize("text", ["r=0,targets=q", "r=2", "r=x,targets=q", "q_proj", "r=2,targets=q,beta=1",
                                  "r=2,r=3,targets=q"])
def test_parse_spec_errors(text: str) -> None:
    with pytest.raises(CompileError, match="lora"):
        parse_spec(text)


def test_the_manifest_checks_its_adapters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, y = _batches((N, T, D_IN))[0]
    doc = compile(_block(), x, labels=y, lora={"r": 2, "targets": ["q_proj"]}).manifest().to_json()
    doc["files"] = {f: "0" * 64 for f in ("train_step.onnx", "infer.onnx", "state.safetensors")}
    assert Manifest.from_json(doc, "m").adapters[0].kind == "linear"
    for change, msg in [({"kind": "conv3d"}, "kind"), ({"shape": [7, 4]}, "do not fit"), ({"scale": "2"}, "scale"),
                        ({"a": "head.weight"}, "not a whole trainable"), ({"weight": "q_proj.lora_A.weight"}, "frozen")]:
        bad = dict(doc, adapters=[dict(doc["adapters"][0], **change)])
        with pytest.raises(ArtifactError, match=msg):
            Manifest.from_json(bad, "m")
    assert Manifest.from_json({k: v for k, v in doc.items() if k != "adapters"}, "m").adapters == []


def test_export_and_inspect_commands_merge(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """`pockprop export --checkpoint-dir` writes the merged model of the trained state; inspect lists the adapter."""
    from pockprop.cli import main

    batches = _batches((N, T, D_IN))
    art = compile(_block(), batches[0][0], labels=batches[0][1], optimizer=OPTIMIZERS[0],
                  lora={"r": 2, "alpha": 4, "targets": ["v_proj"]})
    trainer = Trainer.load(art.save(str(tmp_path / "a")), threads=1)
    for x, y in batches:
        trainer.step(x.numpy(), y.numpy())
    trainer.save_checkpoint(str(tmp_path / "ck"))
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "a"), "--checkpoint-dir", str(tmp_path / "ck"), "-o", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = batches[1][0].numpy()
    exported = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(exported, trainer.predict(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(exported, Trainer.load(str(tmp_path / "a")).predict(x)), "the trained adapter is merged"
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "lora linear v_proj.weight[7, 7] += 2 * v_proj.lora_B.weight @ v_proj.lora_A.weight" in capsys.readouterr().out


def test_a_peft_conv_model_exports_merged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """peft's Conv2d LoRA (a conv to r channels, then a 1x1 conv) is recognised as a conv2d adapter; after
    training, the exported model's merged kernel predicts what peft's unmerged model predicts."""
    torch.manual_seed(0)
    model = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    batches = _batches((N, 3, 6, 6))
    art = compile(model, batches[0][0], labels=batches[0][1], optimizer=OPTIMIZERS[0])
    assert [(a.kind, a.weight) for a in art.adapters] == [("conv2d", "base_model.model.conv.base_layer.weight")]
    trainer = Trainer.load(art.save(str(tmp_path / "a")), threads=1)
    for x, y in batches:
        trainer.step(x.numpy(), y.numpy())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in trainer.state.items()}, strict=False)
    x = batches[0][0]
    _check_merged_export(trainer, x.numpy(), tmp_path, model(x).detach().numpy())
