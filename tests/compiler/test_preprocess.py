"""`--preprocess` (compile and search): presets, defaults, JSON steps, errors; photos train end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pockprop.cli import main
from pockprop.compiler.compile import compile
from pockprop.compiler.preprocess import IMAGENET_MEAN, IMAGENET_STD, resolve
from pockprop.errors import CompileError


def tiny_cnn(num_classes: int = 3) -> torch.nn.Module:  # "tests.compiler.test_preprocess:tiny_cnn"
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, num_classes))


def test_presets_defaults_and_json() -> None:
    image, resize = (8, 3, 128, 96), {"resize": [128, 96], "antialias": True}
    assert resolve(None, image, "models:resnet18") == resize | {"scale": 1 / 255, "mean": IMAGENET_MEAN,
                                                                  "std": IMAGENET_STD}
    assert resolve(None, image, "mypkg.nets:cnn") == resize | {"scale": 1 / 255}
    assert resolve(None, (8, 64), "models:mlp") == {} and resolve("none", image) == {}
    assert resolve('{"mean": 0.5, "std": 0.5}', (8, 64)) == {"mean": 0.5, "std": 0.5}
    assert resolve('{"resize": null, "scale": 0.5, "channel_order": "bgr"}', image) == {
        "antialias": True, "scale": 0.5, "channel_order": "bgr"}
    assert resolve('{"antialias": false}', image) == {"resize": [128, 96], "antialias": False}


@pytest.mark.parametrize("text,needle", [
    ("imagenette", "not a preset (imagenet, unit, none) nor JSON"),
    ("[1, 2]", "expected a preset name"),
    ('{"sharpen": 2}', "unknown steps ['sharpen']"),
    ('{"mean": [0.1, 0.2]}', "preprocess mean: 2 values for 3 channels"),
    ('{"resize": [64, 64]}', "preprocess resize [64, 64] does not give the model's input [3, 128, 96]"),
    ('{"scale": NaN}', "scale must be a finite non-zero number"),
    ('{"channel_order": "grb"}', "channel_order must be"),
])
def test_bad_preprocess_is_a_compile_error_naming_the_flag(text: str, needle: str) -> None:
    with pytest.raises(CompileError, match=r"^--preprocess ") as ex:
        resolve(text, (8, 3, 128, 96))
    assert needle in str(ex.value)


def test_python_api_takes_a_dict_or_a_preset() -> None:
    x = (torch.randn(2, 3, 8, 8),)
    assert compile(tiny_cnn(), x, preprocess="unit").preprocess == {"resize": [8, 8], "antialias": True, "scale": 1 / 255}
    with pytest.raises(CompileError, match="preprocess mean: 2 values for 3 channels"):
        compile(tiny_cnn(), x, preprocess={"mean": [0.1, 0.2]})


def test_photos_of_any_size_train_from_a_cli_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 40), (17, 9), (64, 48), (12, 12)] * 3):  # JPEG, PNG, grey, 16-bit grey
        folder = tmp_path / "photos" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 4
        if kind == 3:
            Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(folder / f"{i}.png")
        else:
            px = rng.integers(0, 256, (h, w, 3) if kind < 2 else (h, w), dtype=np.uint8)
            Image.fromarray(px).save(folder / f"{i}.{'jpg' if kind == 0 else 'png'}")
    art = tmp_path / "art"
    assert main(["compile", "tests.compiler.test_preprocess:tiny_cnn", "--num-classes", "2", "--input-shape",
                 "4,3,16,16", "--preprocess", "imagenet", "-o", str(art)]) == 0
    assert "preprocess: RGB, resized to 16x16 (bilinear, antialiased), x/255, (x - [0.485, 0.456, 0.406])" \
        in capsys.readouterr().err
    pre = json.loads((art / "manifest.json").read_text())["data"][0]["preprocess"]
    assert pre == {"resize": [16, 16], "antialias": True, "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    assert main(["train", str(art), "--data", str(tmp_path / "photos"), "--epochs", "2", "--holdout", "0.25",
                 "--no-progress", "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out.strip().splitlines()[-1])
    assert doc["ok"] and doc["round"]["steps"] == 4 and doc["round"]["held_out"] == 3
    assert "warning" not in out.err and "preprocessing: RGB, resized to 16x16" in out.err
