"""Hugging Face transformers, built from tiny configs (never downloaded), train through the device runtime exactly as
PyTorch trains them: every model all-trainable and with the `sparse` preset, SGD with momentum and AdamW, 3 steps;
losses and every updated tensor within rtol 1e-4. Language models use padded labels (-100); GPT-2 ties its LM head
to its embedding, so both uses of that one tensor are trained together. The `*_mask` cases call the HF model itself
with keyword inputs input_ids and attention_mask (int64, padded positions 0), as a tokenizer's batch feeds it."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pockprop.compiler.compile import compile, trace_model
from pockprop.errors import CompileError
from tests.compiler.torch_ref import assert_trains_like_torch

T = pytest.importorskip("transformers")

N, L, V, C = 2, 8, 40, 3  # batch, sequence length, vocabulary, classes
OPTIMIZERS = {"sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              "adamw": {"name": "adamw", "lr": 1e-3, "eps": 1e-5, "weight_decay": 0.0}}
# eps: see tests/compiler/zoo_cases.py; no weight decay, which would move the frozen rest of a sliced tensor in torch
SMALL = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Logits(nn.Module):
    """An HF model called on one input, returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x).logits


def _bert_config(**kw: Any) -> Any:
    return T.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=L, **SMALL, **kw)


def _gpt2_config(**kw: Any) -> Any:
    return T.GPT2Config(vocab_size=V, n_positions=L, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)


def _llama_config(**kw: Any) -> Any:
    return T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=L, use_cache=False, **kw)


def _bert() -> nn.Module:
    return Logits(T.BertForSequenceClassification(_bert_config(num_labels=C)))


def _distilbert() -> nn.Module:
    return Logits(T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=L, num_labels=C,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)))


def _vit() -> nn.Module:
    return Logits(T.ViTForImageClassification(T.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=C, **SMALL)))


def _gpt2() -> nn.Module:
    return Logits(T.GPT2LMHeadModel(_gpt2_config()))


def _llama() -> nn.Module:
    return Logits(T.LlamaForCausalLM(_llama_config()))


# The *_mask models are called with keyword inputs as HF's own (returning a ModelOutput that holds only logits), and
# initialized wider than HF's 0.02 so that attention is far from uniform: masking changes their loss by 0.2% or
# more, far beyond the tolerance (see _assert_mask_matters).
MASK_INIT = 0.2


def _bert_mlm() -> nn.Module:  # its decoder is tied to the word embeddings
    return T.BertForMaskedLM(_bert_config(initializer_range=MASK_INIT))


def _gpt2_lm() -> nn.Module:
    return T.GPT2LMHeadModel(_gpt2_config(initializer_range=MASK_INIT, use_cache=False))  # a cache is no tensor


def _llama_lm() -> nn.Module:
    return T.LlamaForCausalLM(_llama_config(initializer_range=MASK_INIT))


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


def _ids(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, V, (N, L), generator=gen)


def _lm_labels(gen: torch.Generator, step: int) -> torch.Tensor:
    y = torch.randint(0, V, (N, L), generator=gen)
    y[step % N, L - 2 - step:] = -100  # padded ends of different lengths
    return y


def _seq_ce(logits: Any, y: torch.Tensor) -> torch.Tensor:
    logits = getattr(logits, "logits", logits)  # a ModelOutput from a model called with keyword inputs
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _padded(gen: torch.Generator, step: int, left: bool = False, mlm: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                            torch.Tensor]:
    """Keyword inputs input_ids and attention_mask, one row padded (mask 0, id 0) on the right (or left) by
    a different length each step, the other row not; token labels at -100 on padding, and for a masked LM
    also on the positions not predicted (HF's convention)."""
    ids, y = _ids(gen), torch.randint(0, V, (N, L), generator=gen)
    mask = torch.ones(N, L, dtype=torch.int64)
    pad = slice(0, 3 + step) if left else slice(L - 3 - step, L)
    mask[step % N, pad] = 0
    ids[mask == 0] = 0
    y[mask == 0] = -100
    if mlm:
        y[torch.rand(N, L, generator=gen) < 0.5] = -100
        y[step % N, 0] = 3  # one label counts in each row at least
        y[(step + 1) % N, 0] = 5
    return {"input_ids": ids, "attention_mask": mask}, y


# name: (builder, batch(gen, step) -> (x, y), loss name, torch loss)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator, int], Any], str, Callable[..., Any]]] = {
    "bert": (_bert, lambda g, s: (_ids(g), torch.randint(0, C, (N,), generator=g)), "cross_entropy", F.cross_entropy),
    "distilbert": (_distilbert, lambda g, s: (_ids(g), torch.randint(0, C, (N,), generator=g)), "cross_entropy",
                   F.cross_entropy),
    "vit": (_vit, lambda g, s: (torch.randn(N, 3, 8, 8, generator=g), torch.randint(0, C, (N,), generator=g)),
            "cross_entropy", F.cross_entropy),
    "gpt2": (_gpt2, lambda g, s: (_ids(g), _lm_labels(g, s)), "cross_entropy", _seq_ce),
    "llama": (_llama, lambda g, s: (_ids(g), _lm_labels(g, s)), "cross_entropy", _seq_ce),
    # with an attention mask (keyword inputs, some positions 0) and padded labels at -100; decoders are padded
    # on the left, where a causal model's real tokens would otherwise attend to the padding
    "bert_mlm_mask": (_bert_mlm, lambda g, s: _padded(g, s, mlm=True), "cross_entropy", _seq_ce),
    "gpt2_mask": (_gpt2_lm, lambda g, s: _padded(g, s, left=True), "cross_entropy", _seq_ce),
    "llama_mask": (_llama_lm, lambda g, s: _padded(g, s, left=True), "cross_entropy", _seq_ce),
    "encoder_layer": (_encoder_layer, lambda g, s: (torch.randn(N, L, 16, generator=g), torch.randn(N, L, 16, generator=g)),
                      "mse", F.mse_loss),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name][0]().eval()


def batches(name: str, steps: int = 3) -> list[Any]:
    gen = torch.Generator().manual_seed(1)
    return [CASES[name][1](gen, s) for s in range(steps)]


COMBOS = [(scheme, opt) for scheme in ("full", "sparse") for opt in OPTIMIZERS]


def run(name: str, tmp_path: Any, combos: list[tuple[str, str]] = COMBOS) -> dict[tuple[str, str], dict[str, float]]:
    """The (scheme, optimizer) combos of one model, traced once; returns their errors (largest relative loss
    difference, largest absolute difference of a trained tensor)."""
    data = batches(name)
    traced = trace_model(build(name), data[0][0])
    errors = {}
    for scheme, opt_name in combos:
        art = assert_trains_like_torch(lambda: build(name), data, CASES[name][3], OPTIMIZERS[opt_name],
                                       tmp_path / f"{scheme}-{opt_name}", traced=traced, loss=CASES[name][2],
                                       scheme=scheme)
        errors[(scheme, opt_name)] = art.errors
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_steps_match_pytorch(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if name.endswith("_mask"):  # the unmasked cases run every combo; here each scheme and each optimizer once
        _assert_mask_matters(name)
        run(name, tmp_path, [("full", "sgd"), ("sparse", "adamw")])
    else:
        run(name, tmp_path)


def test_a_returned_cache_is_explained() -> None:
    """GPT-2's default config returns a key/value cache, which is no tensor: the error says what to change."""
    model = T.GPT2LMHeadModel(_gpt2_config())
    with pytest.raises(CompileError, match=r"could not trace the model: .*DynamicCache.*use_cache=False\)$"):
        compile(model, {"input_ids": torch.zeros(N, L, dtype=torch.int64)}, output="logits")


def _assert_mask_matters(name: str) -> None:
    """The padded batches exercise the mask: PyTorch's loss changes when the mask is all ones, so a compiled
    step that dropped or folded the mask input would not match."""
    model, loss = build(name), CASES[name][3]
    with torch.no_grad():
        for x, y in batches(name):
            unmasked = x | {"attention_mask": torch.ones_like(x["attention_mask"])}
            masked = loss(model(**x), y).item()
            assert abs(masked - loss(model(**unmasked), y).item()) > 2e-3 * abs(masked)  # 20x the rtol


if __name__ == "__main__":  # the table of the closing note: python -m tests.compiler.test_hf_models
    import tempfile
    from pathlib import Path

    print("| model | scheme | optimizer | max loss rel. error | max weight abs. error |\n|---|---|---|---:|---:|")
    for model in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            for (scheme, opt), e in run(model, Path(tmp)).items():
                print(f"| {model} | {scheme} | {opt} | {e['loss_rel']:.1e} | {e['weight_abs']:.1e} |")
