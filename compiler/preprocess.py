"""`--preprocess` of `pockprop compile` and `pockprop search`: what the manifest records about turning
raw device data into model input (docs/artifact.md, applied by runtime.data.Pipeline).

The value is a preset name or a JSON object of manifest steps. For image inputs (N, C, H, W) every
preset but `none`, and any JSON object, includes `resize` to the compiled H x W (antialiased, as
torchvision's Resize) unless the object sets "resize": null, so photos of any size can be used.
Without --preprocess: `imagenet` for the zoo's image models (3 channels), `unit` for other image
models, `none` for anything else. Torch-free: search imports it.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Sequence

from pockprop.artifact.contract import LABELS, TensorSpec, check_preprocess
from pockprop.errors import ArtifactError, CompileError, DataError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": {"scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD},  # torchvision's pretrained models
    "unit": {"scale": 1 / 255},  # pixels in 0..1
    "none": {},  # samples go in as they are
}
HELP = ("raw data -> model input, recorded in the manifest: a preset (imagenet: x/255 then ImageNet mean/std; "
        "unit: x/255; none) or a JSON object of steps resize, antialias, channel_order (rgb|bgr), scale, mean, std, "
        "e.g. '{\"scale\": 0.00392156862745098, \"mean\": 0.5, \"std\": 0.5}'; image inputs are resized to the "
        "compiled size unless \"resize\": null (default: imagenet for the zoo's image models, unit for other "
        "image models, none otherwise)")


def default_preset(model: str, shape: Sequence[int]) -> str:
    """The preset used without --preprocess (see the module docstring)."""
    if len(shape) != 4:
        return "none"
    return "imagenet" if model.startswith("models:") and shape[1] == 3 else "unit"


def parse(text: str, flag: str = "--preprocess") -> tuple[str | None, dict[str, Any]]:
    """(preset name or None, its steps) of a --preprocess value, before any shape is known."""
    if text.strip() in PRESETS:
        return text.strip(), copy.deepcopy(PRESETS[text.strip()])  # the caller may change its lists
    try:
        steps = json.loads(text)
    except json.JSONDecodeError as ex:
        raise CompileError(f"{flag} {text!r}: not a preset ({', '.join(PRESETS)}) nor JSON ({ex})") from None
    if not isinstance(steps, dict):
        raise CompileError(f"{flag} {text!r}: expected a preset name ({', '.join(PRESETS)}) or a JSON object")
    return None, steps


def resolve(text: str | None, shape: Sequence[int], model: str = "", flag: str = "--preprocess") -> dict[str, Any]:
    """The manifest's data preprocess for `--preprocess text` (None: the default) and input `shape`."""
    what = f"{flag} {text!r}"
    name, steps = parse(default_preset(model, shape) if text is None else text, flag)
    if name == "none":
        return steps
    if len(shape) == 4:
        steps = {"resize": [int(shape[2]), int(shape[3])], "antialias": True} | steps
    return check({k: v for k, v in steps.items() if v is not None}, shape, what)


def check(steps: dict[str, Any], shape: Sequence[int], what: str = "preprocess") -> dict[str, Any]:
    """`steps` if the runtime accepts them for an input of `shape`, else CompileError naming `what`."""
    try:
        check_preprocess(steps, what)
        _pipeline(steps, shape)
    except (ArtifactError, DataError) as ex:
        raise CompileError(str(ex) if str(ex).startswith(what) else f"{what}: {ex}") from None
    return steps


def describe(steps: dict[str, Any], shape: Sequence[int]) -> str:
    """In words, as `pockprop inspect` and `train` say it."""
    return _pipeline(steps, shape).describe()


def _pipeline(steps: dict[str, Any], shape: Sequence[int]) -> Any:
    from pockprop.runtime.data import Pipeline

    return Pipeline(TensorSpec("input", tuple(shape), "float32", steps), TensorSpec(LABELS, (shape[0],), "int64"))
