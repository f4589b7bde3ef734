"""Soft prompts: `compile(..., prompt={"tokens": P, "init": "vocab"|"random"})`.

P trainable embeddings, one (P, D) tensor named PROMPT, enter the model right after its embedding layer;
the model is wrapped before tracing (`with_prompt`), so the prompt is an ordinary parameter of the traced
graph and the step trains it like any other (with a scheme's or `trainable`'s tensors, or alone).

- Text models (Hugging Face: `get_input_embeddings()` is an nn.Embedding and forward takes
  `inputs_embeds` and `attention_mask`), as peft's prompt tuning does: the prompt joins the token
  embeddings (`inputs_embeds`) before the model adds position embeddings, so its rows take positions
  like tokens, and the attention mask gets ones for them (a given `attention_mask` is extended; without
  one, all ones). Where the prompt goes: first, before every token, for a causal LM (a model that can
  `generate`); after the first token for any other (an encoder's [CLS], which BERT's pooler reads at
  position 0, stays first: prompts are tokens 1..P and the sentence follows). Per-token outputs (rank 3,
  P + T positions) drop the prompt's positions, so labels keep the (N, T) shape of the ids.
- ViT (an `embeddings` module with a `cls_token`), as VPT-shallow does: after the patch embedding, the
  [CLS] token and the position embeddings, the prompt is inserted after [CLS] (no position embedding of
  its own); the classifier reads [CLS] as before.

init "vocab" (text only; the default there) copies P rows of the token embedding drawn at random (seeded);
"random" (ViT's default) draws them from N(0, 0.02^2). The inference graph holds the prompt as a parameter
with its trained value after export, like any trained tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pockprop.errors import CompileError

PROMPT_MODULE = "prompt"
PROMPT = f"{PROMPT_MODULE}.embeddings"  # the prompt's parameter name in the traced model and the artifact
INITS = ("vocab", "random")
RANDOM_STD = 0.02


def prompt_scheme(name: str) -> int | None:
    """P of a scheme name `prompt:P` as the experiments and `pockprop bench --scheme` write a soft prompt of P
    tokens trained alone, else None."""
    if not name.startswith("prompt:"):
        return None
    tokens = name.split(":", 1)[1]
    if not tokens.isdigit() or int(tokens) < 1:
        raise CompileError(f"{name!r}: a soft prompt row is prompt:N with N a positive number of tokens")
    return int(tokens)


@dataclass(frozen=True)
class PromptSpec:
    tokens: int
    init: str | None = None  # None: "vocab" for text models, "random" for ViT
    seed: int = 0


def parse_prompt(spec: dict[str, Any] | int | None) -> PromptSpec | None:
    """A PromptSpec from {"tokens": P, "init": ..., "seed": ...} (or P alone); CompileError when wrong."""
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = {"tokens": spec}
    if not isinstance(spec, dict):
        raise CompileError(f"prompt: expected {{'tokens': N, 'init': 'vocab'|'random'}}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"tokens", "init", "seed"})
    if unknown:
        raise CompileError(f"prompt: unknown key {unknown[0]!r}; the keys are tokens, init, seed")
    tokens, init, seed = spec.get("tokens"), spec.get("init"), spec.get("seed", 0)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise CompileError(f"prompt: tokens must be a positive integer, got {tokens!r}")
    if init is not None and init not in INITS:
        raise CompileError(f"prompt: init {init!r} is not one of {', '.join(INITS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CompileError(f"prompt: seed must be an integer, got {seed!r}")
    return PromptSpec(tokens, init, seed)


class _Prompt(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(value)


class Prompted(nn.Module):
    """`model` with a soft prompt. Its parameters are the model's under their own names, plus PROMPT:
    the wrapper shares the model's children, parameters and buffers instead of owning the model as a
    child, so that schemes and trainable patterns name the model's parameters as they always do."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, at: int) -> None:
        super().__init__()
        self._modules = dict(model._modules)  # the same children (not copies), and one more
        self._parameters = model._parameters  # the same dicts: what tracing swaps, the model reads
        self._buffers = model._buffers
        self.prompt = _Prompt(prompt)
        object.__setattr__(self, "_inner", model)  # not a child: its parameters are ours already
        self.at = at


class TextPrompted(Prompted):
    """A text model with the prompt in its inputs_embeds (see the module docstring)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        model, at = self._inner, self.at
        emb = model.get_input_embeddings()(input_ids)
        n, p = emb.shape[0], self.prompt.embeddings.shape[0]
        embeds = _insert(emb, self.prompt.embeddings.unsqueeze(0).expand(n, -1, -1), at)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.int64, device=input_ids.device)
        ones = torch.ones((n, p), dtype=attention_mask.dtype, device=attention_mask.device)
        out = model(inputs_embeds=embeds, attention_mask=_insert(attention_mask, ones, at))
        return _drop_prompt(out, at, p, input_ids.shape[1] + p)


class ViTPrompted(Prompted):
    """A ViT with the prompt after its [CLS] token (see the module docstring)."""

    def forward(self, pixel_values: torch.Tensor) -> Any:
        embeddings = _vit_embeddings(self._inner)
        prompt = self.prompt.embeddings

        def insert(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            return _insert(out, prompt.unsqueeze(0).expand(out.shape[0], -1, -1), 1)

        handle = embeddings.register_forward_hook(insert)
        try:
            return self._inner(pixel_values)
        finally:
            handle.remove()


def _insert(seq: torch.Tensor, rows: torch.Tensor, at: int) -> torch.Tensor:
    """`rows` inserted into `seq` before its position `at` (axis 1)."""
    return torch.cat([rows, seq], dim=1) if at == 0 else torch.cat([seq[:, :at], rows, seq[:, at:]], dim=1)


def _drop_prompt(out: Any, at: int, p: int, length: int) -> Any:
    """Per-token outputs (rank >= 3, `length` positions on axis 1) without the prompt's positions."""
    if isinstance(out, torch.Tensor):
        if out.dim() >= 3 and out.shape[1] == length:
            return out[:, p:] if at == 0 else torch.cat([out[:, :at], out[:, at + p:]], dim=1)
        return out
    if isinstance(out, dict):  # a ModelOutput too (keys and order kept)
        for k in list(out.keys()):
            out[k] = _drop_prompt(out[k], at, p, length)
        return out
    if isinstance(out, (tuple, list)):
        return type(out)(_drop_prompt(o, at, p, length) for o in out)
    return out


def _vit_embeddings(model: nn.Module) -> nn.Module | None:
    """A ViT's embeddings module (patch embedding, [CLS], position embeddings), or None."""
    return next((m for _, m in model.named_modules() if hasattr(m, "cls_token") and hasattr(m, "patch_embeddings")),
                None)


def with_prompt(model: nn.Module, spec: PromptSpec) -> Prompted:
    """`model` wrapped with a soft prompt of `spec` (see the module docstring), its value initialised."""
    gen = torch.Generator().manual_seed(spec.seed)
    vit = _vit_embeddings(model)
    if vit is not None:
        if spec.init == "vocab":
            raise CompileError("prompt: init 'vocab' copies token embeddings; a ViT has none, use init 'random'")
        dim = vit.cls_token.shape[-1]
        value = torch.randn(spec.tokens, dim, generator=gen) * RANDOM_STD
        return ViTPrompted(model, value.to(vit.cls_token.dtype), 1)
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if not isinstance(table, nn.Embedding):
        raise CompileError(f"prompt: {type(model).__name__} is neither a Hugging Face text model (get_input_embeddings() "
                           "giving an nn.Embedding, forward taking inputs_embeds) nor a ViT")
    weight = table.weight.detach()
    if spec.init == "random":
        value = torch.randn(spec.tokens, weight.shape[1], generator=gen).to(weight.dtype) * RANDOM_STD
    else:
        rows = torch.randint(0, weight.shape[0], (spec.tokens,), generator=gen)
        value = weight[rows].clone()
    can_generate = getattr(model, "can_generate", None)
    causal = bool(callable(can_generate) and can_generate())
    return TextPrompted(model, value, 0 if causal else 1)
