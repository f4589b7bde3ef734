"""Soft prompts (compiler/prompt.py): three steps through the device runtime against a PyTorch model with an
nn.Parameter prompt prepended by hand the same way (a causal LM: first, per-token logits without the
prompt's positions; BERT: after [CLS]; ViT: after [CLS], after the position embeddings), alone or beside a
scheme; the exported model predicts like the trained one, with the trained prompt in it."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from pockprop.compiler.compile import compile
from pockprop.compiler.prompt import PROMPT, parse_prompt, with_prompt
from pockprop.errors import CompileError
from pockprop.models.hf import bert_base4, llama_small, vit_tiny
from pockprop.runtime.trainer import Trainer
from tests.compiler.zoo_cases import torch_optimizer

P, N, T, VOCAB = 3, 2, 5, 40


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return llama_small(vocab_size=VOCAB, hidden=16, layers=1, heads=2, intermediate=32, max_positions=32).eval()


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return bert_base4(num_classes=3, layers=1, vocab_size=VOCAB, hidden=16, heads=2, intermediate=32,
                      max_positions=32).eval()


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_tiny(num_classes=3, image_size=16, patch_size=8, hidden=16, layers=1, heads=2, intermediate=32).eval()


def _llama_ref(model, prompt, ids):
    emb = model.get_input_embeddings()(ids)
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), emb], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.int64)
    return model(inputs_embeds=embeds, attention_mask=mask)[:, P:]


def _bert_ref(model, prompt, ids):
    emb = model.get_input_embeddings()(ids)
    embeds = torch.cat([emb[:, :1], prompt.expand(len(ids), -1, -1), emb[:, 1:]], dim=1)
    return model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.int64))


def _vit_ref(model, prompt, pixels):
    vit = model.vit
    emb = vit.embeddings(pixels)  # [CLS] + patches, position embeddings added
    seq = torch.cat([emb[:, :1], prompt.expand(len(pixels), -1, -1), emb[:, 1:]], dim=1)
    for layer in vit.layers:
        seq = layer(seq, None)
    return model.classifier(vit.layernorm(seq)[:, 0])


def _lm_loss(z, y):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


CASES = {
    "llama": (_llama, _llama_ref, lambda g: torch.randint(0, VOCAB, (N, T), generator=g),
              lambda g: torch.randint(0, VOCAB, (N, T), generator=g), _lm_loss),
    "bert": (_bert, _bert_ref, lambda g: torch.randint(0, VOCAB, (N, T), generator=g),
             lambda g: torch.randint(0, 3, (N,), generator=g), F.cross_entropy),
    "vit": (_vit, _vit_ref, lambda g: torch.randn(N, 3, 16, 16, generator=g),
            lambda g: torch.randint(0, 3, (N,), generator=g), F.cross_entropy),
}


def _check(case: str, tmp_path, init: str | None = None, optimizer=None, **compile_kw) -> tuple[Trainer, list]:
    build, ref_fn, make_x, make_y, loss_fn = CASES[case]
    optimizer = optimizer or {"name": "sgd", "lr": 0.5, "momentum": 0.9}
    g = torch.Generator().manual_seed(3)
    batches = [(make_x(g), make_y(g)) for _ in range(3)]
    spec = {"tokens": P} | ({"init": init} if init else {})
    art = compile(build(), (batches[0][0],), labels=batches[0][1], optimizer=optimizer, prompt=spec, **compile_kw)
    trainer = Trainer.load(art.save(str(tmp_path / case)), threads=1)

    ref = build()
    prompt = torch.nn.Parameter(torch.from_numpy(art.initial_state()[PROMPT].copy()))
    trained = [n for n in art.trainable if n != PROMPT]
    params = dict(ref.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in trained)
    opt = torch_optimizer(optimizer, [prompt] + [params[n] for n in trained])
    for x, y in batches:
        got = trainer.step(x.numpy(), y.numpy())
        opt.zero_grad()
        loss = loss_fn(ref_fn(ref, prompt, x), y)
        loss.backward()
        opt.step()
        np.testing.assert_allclose(got, loss.item(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trainer.state[PROMPT], prompt.detach().numpy(), rtol=1e-4, atol=1e-6)
    for n in trained:
        np.testing.assert_allclose(trainer.state[n], params[n].detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=n)
    return trainer, batches


@pytest.mark.parametrize("case", ["llama", "bert", "vit"])
def test_prompt_steps_match_torch(case: str, tmp_path) -> None:
    trainer, _ = _check(case, tmp_path)
    assert [e.name for e in trainer.manifest.state if e.role == "param"] == [PROMPT]


def test_prompt_with_a_scheme_and_adamw(tmp_path) -> None:
    trainer, _ = _check("bert", tmp_path, init="random", optimizer={"name": "adamw", "lr": 1e-2},
                        scheme="classifier")
    assert {e.name for e in trainer.manifest.state if e.role == "param"} == {PROMPT, "classifier.weight",
                                                                           "classifier.bias"}


@pytest.mark.parametrize("case", ["llama", "vit"])
def test_export_predicts_like_the_trained_model(case: str, tmp_path) -> None:
    trainer, batches = _check(case, tmp_path)
    path = trainer.export_inference(str(tmp_path / "m.onnx"))
    x = batches[0][0].numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, trainer.predict(x), rtol=1e-5, atol=1e-5)
    import onnx

    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    np.testing.assert_array_equal(inits[PROMPT], trainer.state[PROMPT])  # the trained prompt, a constant


def test_vocab_init_copies_embedding_rows_and_is_seeded() -> None:
    def initial(**spec) -> np.ndarray:
        return with_prompt(_llama(), parse_prompt({"tokens": P, **spec})).prompt.embeddings.detach().numpy()

    a, b, other = initial(seed=1), initial(seed=1), initial(seed=2)
    table = _llama().get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    assert all(any(np.array_equal(row, t) for t in table) for row in a)
    r = initial(init="random")
    assert r.shape == (P, 16) and 0 < r.std() < 0.05


@pytest.mark.parametrize("prompt,match", [
    ({"tokens": 0}, "tokens must be a positive integer"),
    ({"tokens": 2, "init": "zeros"}, "init 'zeros'"),
    ({"tokens": 2, "where": 1}, "unknown key 'where'"),
    ("16", "expected"),
])
def test_bad_prompt_settings_are_one_line_errors(prompt, match) -> None:
    with pytest.raises(CompileError, match=match):
        compile(_llama(), (torch.randint(0, VOCAB, (N, T)),), prompt=prompt)


def test_prompt_needs_an_embedding_model() -> None:
    with pytest.raises(CompileError, match="neither a Hugging Face text model"):
        compile(torch.nn.Linear(4, 2), (torch.randn(2, 4),), prompt={"tokens": 2})
    with pytest.raises(CompileError, match="a ViT has none"):
        compile(_vit(), (torch.randn(N, 3, 16, 16),), prompt={"tokens": 2, "init": "vocab"})


def test_cli_prompt_flags(tmp_path, capsys) -> None:
    import json

    from pockprop.cli import main

    out = tmp_path / "vit"
    assert main(["compile", "models:vit_tiny", "--input-shape", "2,3,32,32", "--preprocess", "none",
                 "--prompt-tokens", "4", "--scheme", "classifier", "-o", str(out)]) == 0
    state = json.loads((out / "manifest.json").read_text())["state"]
    assert {s["name"]: s["shape"] for s in state if s["role"] == "param"} == {
        PROMPT: [4, 64], "classifier.weight": [10, 64], "classifier.bias": [10]}
    capsys.readouterr()
    assert main(["compile", "models:vit_tiny", "--prompt-init", "random", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip().endswith("--prompt-init needs --prompt-tokens")
