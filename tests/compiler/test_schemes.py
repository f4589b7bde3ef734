"""Update schemes: every preset on every zoo model trains exactly like PyTorch with masked gradients.

The PyTorch reference (tests/compiler/torch_ref.py) marks the scheme's tensors trainable and zeroes
gradient entries outside each slice.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pockprop.compiler.compile import compile
from pockprop.errors import CompileError
from pockprop.compiler.scheme import Rule, Scheme
from tests.compiler.torch_ref import assert_trains_like_torch
from tests.compiler.zoo_cases import CASES, IDS, ZooCase, batch, build

PRESETS = ["full", "classifier", "last-k:2", "bias-only", "sparse", "tbft-front", "tbft-middle", "tbft-rear"]
OPT = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
STEPS = 3


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_preset_step_matches_masked_pytorch(case: ZooCase, preset: str, tmp_path) -> None:
    assert_trains_like_torch(lambda: build(case), [batch(case, step) for step in range(STEPS)], F.cross_entropy,
                             OPT, tmp_path, scheme=preset)


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3))


@pytest.mark.parametrize("scheme,needle", [
    ("nonsense", "unknown scheme preset 'nonsense'"),
    ("last-k:x", "last-k:N"),
    ("last-k:9", "only 2 blocks"),
    ({"rules": [{"match": "9.*", "update": "full"}]}, "'9.*' matches no layer"),
    ({"rules": [{"match": "2", "update": "weight", "ratio": 1.5}]}, "ratio 1.5 is outside (0, 1]"),
    ({"rules": [{"match": "2", "update": "weight", "ratio": 0}]}, "outside (0, 1]"),
    ({"rules": [{"match": "2", "update": "sideways"}]}, "update 'sideways' is not one of"),
    ({"rules": [{"match": "2", "update": "full", "color": 1}]}, "unknown keys color"),
    ({"rules": []}, "non-empty list 'rules'"),
    ({"rules": [{"match": "*", "update": "frozen"}]}, "leaves nothing to train"),
])
def test_scheme_errors_name_the_problem(scheme, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CompileError) as info:
        compile(_mlp(), (torch.randn(2, 4),), scheme=scheme)
    assert needle in str(info.value)


def test_slice_on_unsliceable_parameter_is_an_error() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 3 * 3, 2))
    scheme = Scheme("s", (Rule("1", "weight", 0.5),))
    with pytest.raises(CompileError, match=r"layer 1 \(batch_norm\).*cannot be sliced"):
        compile(model.eval(), (torch.randn(2, 3, 5, 5),), scheme=scheme)


def test_yaml_scheme_and_resolved_table(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: mine\nrules:\n  - match: '2'\n    update: weight\n    ratio: 1/4\n    bias: true\n"
                    "  - match: '4'\n    update: full\n")
    art = compile(_mlp(), (torch.randn(2, 4),), scheme=str(path))
    table = art.scheme.table()
    assert "weight@0.25+bias" in table and "frozen" in table
    entry = {s.name: s.spec.to_json() for s in art.state}["2.weight"]
    assert entry["slice"] == {"axis": 1, "start": 0, "stop": 2} and entry["shape"] == [8, 2]
    assert art.manifest().scheme["name"] == "mine"


def test_trainable_and_scheme_together_is_an_error() -> None:
    with pytest.raises(CompileError, match="either trainable patterns or a scheme"):
        compile(_mlp(), (torch.randn(2, 4),), trainable=["4.*"], scheme="full")
