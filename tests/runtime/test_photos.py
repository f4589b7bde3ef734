"""Real photos on the device: fast resize, 16-bit images, channels, EXIF, folders read lazily, warnings."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from pockprop.artifact.contract import TensorSpec
from pockprop.cli import main
from pockprop.runtime import data, images
from pockprop.runtime.loop import fit
from pockprop.runtime.trainer import Trainer
from tests.runtime.test_checkpoint import Crash, _fit

Image = pytest.importorskip("PIL.Image")
LABELS = TensorSpec("labels", (4,), "int64")


def _spec(shape: list[int], **steps: object) -> TensorSpec:
    return TensorSpec("x", (4, *shape), "float32", dict(steps))


def _folder(root: Path, n: int = 12, sizes: tuple[tuple[int, int], ...] = ((10, 14), (9, 9), (16, 12))) -> Path:
    """root/<a|b|c>/<i>.png|.jpg, RGB of a few sizes; returns root."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / "abc"[i % 3]
        cls.mkdir(parents=True, exist_ok=True)
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_resize_is_fast_and_keeps_the_rule() -> None:
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 240, 320)).astype(np.uint8)
    t0 = time.perf_counter()
    data.resize(x, (128, 128))
    assert time.perf_counter() - t0 < 1.0  # the einsum of before took ~15 s on 2 cores; now well under 10 ms
    small = np.random.default_rng(1).standard_normal((2, 3, 7, 10))
    for size in [(4, 5), (14, 20), (7, 3)]:  # the float64 rule of before, within float32 rounding
        want = np.einsum("ih,nchw,jw->ncij", data.bilinear_matrix(7, size[0]), small, data.bilinear_matrix(10, size[1]))
        np.testing.assert_allclose(data.resize(small, size), want, rtol=0, atol=1e-5)


def test_antialiased_resize_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 23, 31)).astype(np.float32)
    for size in [(8, 8), (5, 30), (40, 50)]:
        want = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False,
                                               antialias=True)
        np.testing.assert_allclose(data.resize(x, size, antialias=True), want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
def test_decoded_images_follow_the_array_rule(tmp_path: Path, antialias: bool) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (23, 31), dtype=np.uint16)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(deep).save(tmp_path / "deep.png")
    chw = rgb.transpose(2, 0, 1)[None].astype(np.float32)
    luma = np.einsum("c,nchw->nhw", images.LUMA, chw)[:, None]
    for size in [(8, 8), (23, 31), (40, 50)]:
        want = data.resize(chw, size, antialias)[0]
        np.testing.assert_allclose(images.decode(str(tmp_path / "a.png"), 3, size, antialias), want, rtol=0, atol=1)
        grey = images.decode(str(tmp_path / "a.png"), 1, size, antialias)  # colour -> luma for a grey model
        np.testing.assert_allclose(grey, data.resize(luma, size, antialias)[0], rtol=0, atol=1.5)
        want = data.resize(deep[None, None] * np.float32(255 / 65535), size, antialias)[0]
        np.testing.assert_allclose(images.decode(str(tmp_path / "deep.png"), 1, size, antialias), want, atol=1e-3)


def test_sixteen_bit_png_keeps_its_range(tmp_path: Path) -> None:
    deep = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1390).astype(np.uint16)  # 0 .. 65330
    (tmp_path / "k" / "a").mkdir(parents=True)
    Image.fromarray(deep).save(tmp_path / "k" / "a" / "deep.png")
    assert Image.open(tmp_path / "k" / "a" / "deep.png").mode.startswith("I")
    want = deep.astype(np.float32) * (255 / 65535)
    for channels in (1, 3):
        x = data.load(str(tmp_path / "k"), channels=channels).x[:]
        assert x.shape == (1, channels, 6, 8)
        np.testing.assert_allclose(x[0], np.broadcast_to(want, (channels, 6, 8)), rtol=1e-6, atol=1e-4)
    pipe = data.Pipeline(_spec([1, 6, 8], scale=1 / 255), LABELS)
    model_in = pipe.inputs(data.load(str(tmp_path / "k"), channels=1).x[:])
    assert model_in.max() == pytest.approx(65330 / 65535) and model_in.min() == 0.0  # 0..1 as for 8-bit images


def test_channel_order_grey_and_alpha() -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (2, 8, 8, 4)).astype(np.uint8)
    rgb = rgba[..., :3].transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(data.Pipeline(_spec([3, 8, 8], scale=1.0), LABELS).inputs(rgba), rgb)  # no alpha
    bgr = data.Pipeline(_spec([3, 8, 8], channel_order="bgr", scale=1.0), LABELS)
    np.testing.assert_array_equal(bgr.inputs(rgba), rgb[:, ::-1])
    grey = data.Pipeline(_spec([1, 8, 8], scale=1.0), LABELS).inputs(rgba)
    np.testing.assert_allclose(grey[:, 0], np.einsum("c,nchw->nhw", images.LUMA, rgb), rtol=1e-6)
    with pytest.raises(data.DataError, match="channel_order bgr needs a 3-channel image input"):
        data.Pipeline(_spec([1, 8, 8], channel_order="bgr"), LABELS)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((4, 6, 3), np.uint8)  # 6 wide, 4 high, white top-left corner
    pixels[:2, :2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "p.jpg", exif=exif, quality=100)
    assert images.header_size(str(tmp_path / "p.jpg")) == (6, 4)
    x = images.decode(str(tmp_path / "p.jpg"), 3)
    assert x.shape == (3, 6, 4) and x[:, :2, -2:].mean() > 200 and x[:, -2:, :2].mean() < 50


def test_a_folder_is_indexed_not_decoded(artifact, tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    loads, decoded = [], []
    real_load, real_decode = ImageFile.ImageFile.load, images.decode
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (loads.append(im), real_load(im))[1])
    monkeypatch.setattr(images, "decode", lambda path, *a: (decoded.append(path), real_decode(path, *a))[1])
    trainer = Trainer.load(str(artifact("cnn")))
    ds = data.load(str(_folder(tmp_path / "imgs")), size=(8, 8))  # as trainer.pipeline.load does for it
    assert len(ds) == 12 and not isinstance(ds.x, np.ndarray) and ds.fingerprint and loads == []  # no pixels read
    assert ds.x[[1, 5]].shape == (2, 3, 8, 8) and decoded == [ds.x.paths[1], ds.x.paths[5]]
    decoded.clear()
    record = fit(trainer, ds, 1, holdout=0.25)  # 9 train (2 batches of 4), 3 held out
    assert record["steps"] == 2 and record["after"]["samples"] == 3
    assert len(decoded) == 4 + 8 + 3 + 3  # one image per check (fit: 2, evaluate: 2), the batches, held out twice
    assert trainer.evaluate(str(tmp_path / "imgs"))["samples"] == 12


def test_a_folder_resumes_bit_identically_and_is_identified_by_its_bytes(artifact, tmp_path: Path) -> None:
    art = artifact("cnn")
    ds = data.load(str(_folder(tmp_path / "imgs", n=21)), size=(8, 8))
    ref = _fit(art, ds, None)
    with pytest.raises(Crash):
        _fit(art, ds, tmp_path / "ckpt", crash_at=5)
    resumed = _fit(art, ds, tmp_path / "ckpt", resume=True)
    assert resumed.steps == ref.steps and resumed.rounds[0]["round"] == 1
    for k, v in ref.state.items():
        np.testing.assert_array_equal(resumed.state[k], v, err_msg=k)
    before = ds.fingerprint
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "0.jpg")
    assert data.load(str(tmp_path / "imgs"), size=(8, 8)).fingerprint != before


def test_pixels_the_preprocessing_does_not_expect_warn_once(artifact, tmp_path: Path, capsys) -> None:
    raw = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    pipe = data.Pipeline(_spec([3, 8, 8], resize=[8, 8]), LABELS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.inputs(raw, "cam.npz")
        pipe.inputs(raw, "cam.npz")
        data.Pipeline(_spec([3, 8, 8], scale=1 / 255), LABELS).inputs(raw)  # scaled: nothing to say
        data.Pipeline(_spec([3, 8, 8]), LABELS).inputs(raw / 255.0)  # model input, as the manifest expects
        data.Pipeline(_spec([3, 8, 8], scale=1 / 255), LABELS).inputs(raw / 127.5 - 1, "ready.npz")
    assert [str(w.message)[:30] for w in caught] == ["cam.npz: samples reach 255, li", "ready.npz: samples range -1..1"]
    assert all(issubclass(w.category, data.PreprocessWarning) for w in caught)
    art = artifact("cnn")
    m = json.loads((art / "manifest.json").read_text())
    m["data"][0]["preprocess"] = {"resize": [8, 8]}
    (art / "manifest.json").write_text(json.dumps(m))
    assert main(["train", str(art), "--data", str(_folder(tmp_path / "imgs")), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "preprocessing: RGB, resized to 8x8 (bilinear), no scaling" in err
    assert len([line for line in err.splitlines() if "warning:" in line]) == 1 and "raw 0-255 pixels" in err


def test_inspect_says_what_is_applied(artifact, capsys) -> None:
    assert main(["inspect", str(artifact("cnn"))]) == 0
    assert ("preprocessing of raw data: RGB, resized to 8x8 (bilinear), x/255, (x - [0.5, 0.4, 0.3]) / "
            "[0.25, 0.2, 0.3]") in capsys.readouterr().out
