"""Our numpy safetensors reader/writer: round trip, interop with the reference library, corruption."""
from __future__ import annotations

import numpy as np
import pytest

from pockprop.artifact import safetensors


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((3, 4)).astype(np.float32), "step": np.array(3.0, np.float32),
            "idx": np.arange(5, dtype=np.int64), "mask": np.array([True, False])}


def test_round_trip() -> None:
    data = safetensors.dumps(_tensors(), {"k": "v"})
    out, meta = safetensors.loads(data)
    assert meta == {"k": "v"}
    for k, v in _tensors().items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)


def test_reference_library_reads_and_writes_our_format() -> None:
    st = pytest.importorskip("safetensors.numpy")
    ours = safetensors.dumps(_tensors())
    theirs = st.load(ours)
    for k, v in _tensors().items():
        np.testing.assert_array_equal(theirs[k], v)
    back, _ = safetensors.loads(st.save(_tensors()))
    for k, v in _tensors().items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("damage", ["truncate", "header_size", "bad_json", "trailing"])
def test_corruption_is_an_error(damage: str) -> None:
    data = bytearray(safetensors.dumps(_tensors()))
    if damage == "truncate":
        data = data[:-7]
    elif damage == "header_size":
        data[:8] = (10**9).to_bytes(8, "little")
    elif damage == "bad_json":
        data[9] = ord("}")
    else:
        data += b"\0" * 4
    with pytest.raises(safetensors.SafetensorsError):
        safetensors.loads(bytes(data))
