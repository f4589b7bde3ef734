"""The demo's memory baseline: a device only *using* a model, in a process of its own.

    python -m experiments.infer_only MODEL.onnx ARTIFACT DATA...

Reads each data file as `pockprop train` reads it (the artifact's preprocessing), runs the exported
inference model (`pockprop export`) over it in batches of the compiled size with onnxruntime, and prints
one JSON line: the accuracy on each file. It imports what `pockprop train` imports (the `pockprop` command's
modules, numpy, onnxruntime) and holds the same data, so the difference of the two processes' peak RSS is
what training adds. numpy + onnxruntime only, like the device.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import pockprop.cli  # noqa: F401 - the modules `pockprop train` has loaded, for a like-for-like baseline
from pockprop.artifact.manifest import open_artifact
from pockprop.runtime.data import Pipeline, padded_batches
from pockprop.runtime.session import session


def main(argv: list[str]) -> int:
    model, artifact, *paths = argv
    m = open_artifact(artifact).manifest
    pipe = Pipeline(m.input, m.labels)
    sess = session(model)
    name = sess.get_inputs()[0].name
    out = {}
    datasets = [pipe.load(p) for p in paths]  # all loaded before inference, as `pockprop train` holds them
    for path, ds in zip(paths, datasets):
        pred = np.concatenate([sess.run(None, {name: pipe.inputs(chunk, ds.source)})[0][:real]
                               for chunk, real in padded_batches(ds.x, pipe.batch_size)])
        out[path] = float(np.mean(pred.argmax(axis=1) == pipe.labels(ds.y, ds.source)))
    print(json.dumps({"accuracy": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
