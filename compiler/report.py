"""Compile report: per layer, what is updated and what the step costs, beside full backprop.

Per layer: update kind, trainable parameters, forward and backward MACs (compiler/cost.py), bytes of
activations kept for backward (attributed to the layer whose backward reads them); for the step:
totals and the memory planner's estimated peak (passes/memory_plan.py). Figures come from the
optimized training graph, so they describe what the emitted ONNX really does.
"""
from __future__ import annotations

from typing import Any


from pockprop.compiler.artifact import Artifact
from pockprop.compiler.cost import node_macs
from pockprop.compiler.lora import describe as describe_adapters
from pockprop.emit.onnx import TOP as TOP_MODULE
from pockprop.ir import Phase, module_of
from pockprop.ops.registry import lowering_of
from pockprop.passes.base import nbytes
from pockprop.passes.lowerings import with_choice
from pockprop.passes.memory_plan import kept_for_backward, plan_memory

from pockprop.artifact.contract import StateRole

def _layer_of(module: str, layers: list[str]) -> str | None:
    """The layer a node's module path belongs to (the longest layer path that prefixes it)."""
    best = None
    for layer in layers:
        if module == layer or module.startswith(layer + "."):
            if best is None or len(layer) > len(best):
                best = layer
    return best


def summarize(art: Artifact) -> dict[str, Any]:
    """Figures of one artifact: per layer and totals."""
    g = art.train_graph
    assert g is not None, "the artifact has no training graph (reports are made at compile time)"
    # parameter_count is in model order, so the layers come out in forward order
    layer_paths = list(dict.fromkeys(module_of(p) or TOP_MODULE for p in art.parameter_count))
    trainable = {s.name: int(s.initial.size) for s in art.state if s.role == StateRole.PARAM}
    per: dict[str, dict[str, Any]] = {
        l: {"trainable_params": 0, "forward_macs": 0, "backward_macs": 0, "kept_bytes": 0} for l in layer_paths}
    layer_of = {n: module_of(ad.weight) for ad in art.adapters for n in (ad.a, ad.b)}  # A, B count for W's layer
    for p, n in trainable.items():
        per[layer_of.get(p) or module_of(p) or TOP_MODULE]["trainable_params"] += n
    for node in g.nodes:
        layer = _layer_of(node.module, layer_paths)
        if layer is None:
            continue
        macs = node_macs(g, node)
        if node.phase is Phase.FORWARD:
            per[layer]["forward_macs"] += macs
        elif node.phase is Phase.BACKWARD:
            per[layer]["backward_macs"] += macs
    kept = kept_for_backward(g)
    readers = {}
    for node in g.nodes:
        if node.phase is Phase.BACKWARD:
            for i in node.inputs:
                if i in kept and i not in readers:
                    readers[i] = _layer_of(node.module, layer_paths)
    for v, layer in readers.items():
        if layer is not None:
            per[layer]["kept_bytes"] += nbytes(g.types[v])
    if art.scheme is not None:
        for u in art.scheme.updates:
            if u.layer.path in per:
                per[u.layer.path]["update"] = u.kind
    for ad in art.adapters:
        per[module_of(ad.weight)].setdefault("update", "lora")
    for layer, row in per.items():
        row.setdefault("update", "trained" if row["trainable_params"] else "frozen")
    for node, options, _ in with_choice(g):  # only where an op had a choice
        layer = _layer_of(node.module, layer_paths)
        if layer is not None:
            per[layer].setdefault("lowerings", {})[node.op] = lowering_of(node) or options[0]
    plan = plan_memory(g)
    total = sum(art.parameter_count.values())
    return {
        "layers": per,
        "trainable_params": sum(trainable.values()),
        "total_params": total,
        "trainable_percent": 100.0 * sum(trainable.values()) / max(total, 1),
        "forward_macs": sum(r["forward_macs"] for r in per.values()),
        "backward_macs": sum(r["backward_macs"] for r in per.values()),
        "kept_bytes": plan.kept_for_backward_bytes,
        "peak_bytes": plan.peak_bytes,
        "peak_breakdown": plan.breakdown,
        "adapters": describe_adapters(art.adapters, trainable, total),
    }


def compare(sparse: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The report: the artifact's figures, full backprop's, and their ratios."""
    keys = ("trainable_params", "forward_macs", "backward_macs", "kept_bytes", "peak_bytes")
    return {"scheme": sparse, "full": full,
            "ratio_to_full": {k: (sparse[k] / full[k] if full[k] else 0.0) for k in keys}}


def format_report(report: dict[str, Any], name: str = "") -> str:
    s, f, r = report["scheme"], report["full"], report["ratio_to_full"]
    mb = lambda b: f"{b / 2**20:.2f}MB"  # noqa: E731
    gm = lambda m: f"{m / 1e6:.1f}M"  # noqa: E731
    rows = [("layer", "update", "params", "fwd MACs", "bwd MACs", "(full)", "kept", "(full)")]
    for layer, row in s["layers"].items():
        fr = f["layers"].get(layer, {})
        if not (row["forward_macs"] or row["trainable_params"] or row["backward_macs"] or fr.get("backward_macs")):
            continue
        rows.append((layer, row["update"], f"{row['trainable_params']:,}", gm(row["forward_macs"]),
                     gm(row["backward_macs"]), gm(fr.get("backward_macs", 0)), mb(row["kept_bytes"]),
                     mb(fr.get("kept_bytes", 0))))
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [f"compile report{' for ' + name if name else ''}:"]
    lines += ["  " + "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths)))
              for x in rows]
    for ad in s.get("adapters", []):
        lines.append(f"  lora {ad['layer']}: {ad['kind']} r={ad['r']} scale={ad['scale']:g}, {ad['params']:,} "
                     f"parameters ({ad['percent']:.3f}% of the model)")
    chosen = {layer: row["lowerings"] for layer, row in s["layers"].items() if row.get("lowerings")}
    if chosen:
        lines.append("  lowering per layer (where an op had a choice):")
        width = max(map(len, chosen))
        lines += [f"    {layer.ljust(width)}  " + "  ".join(f"{op}={name}" for op, name in ops.items())
                  for layer, ops in chosen.items()]
    lines.append(f"  trainable  {s['trainable_params']:,} / {s['total_params']:,} ({s['trainable_percent']:.2f}%)"
                 f"   full: {f['trainable_params']:,}   ratio {r['trainable_params']:.3f}")
    lines.append(f"  backward MACs  {gm(s['backward_macs'])}   full: {gm(f['backward_macs'])}"
                 f"   ratio {r['backward_macs']:.3f}")
    lines.append(f"  kept for backward  {mb(s['kept_bytes'])}   full: {mb(f['kept_bytes'])}   ratio {r['kept_bytes']:.3f}")
    lines.append(f"  estimated peak  {mb(s['peak_bytes'])}   full: {mb(f['peak_bytes'])}   ratio {r['peak_bytes']:.3f}")
    return "\n".join(lines)


def compile_report(art: Artifact, full: Artifact) -> dict[str, Any]:
    """The report of `art` beside `full` (the same model compiled with scheme 'full')."""
    return compare(summarize(art), summarize(full))


def preset_table(model_spec: str, shape: tuple[int, ...], presets: list[str]) -> list[dict[str, Any]]:
    """Each preset's trainable share, backward MACs, kept activations and peak memory as ratios to 'full'."""
    import torch

    from pockprop.compiler.compile import compile
    from pockprop.tracing.loader import ModelSpec

    def build() -> Any:
        return ModelSpec(model_spec).build()[0].eval()

    x = torch.zeros(shape)
    full = summarize(compile(build(), (x,), scheme="full"))
    rows = []
    for preset in presets:
        s = summarize(compile(build(), (x,), scheme=preset))
        r = compare(s, full)["ratio_to_full"]
        rows.append({"scheme": preset, "trainable_percent": s["trainable_percent"],
                     "backward_macs_ratio": r["backward_macs"], "kept_ratio": r["kept_bytes"],
                     "peak_ratio": r["peak_bytes"], "peak_mb": s["peak_bytes"] / 2**20,
                     "full_peak_mb": full["peak_bytes"] / 2**20, "full_backward_gmacs": full["backward_macs"] / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    """python -m pockprop.compiler.report MODEL --input-shape 8,3,128,128: the preset table as markdown."""
    import argparse

    from pockprop.args import shape

    p = argparse.ArgumentParser(prog="python -m pockprop.compiler.report", description=main.__doc__)
    p.add_argument("model", help="models:NAME or package.module:function")
    p.add_argument("--input-shape", type=shape, default="8,3,128,128")
    p.add_argument("--schemes", default="sparse,bias-only,tbft-front,tbft-middle,tbft-rear,last-k:2,classifier")
    args = p.parse_args(argv)
    rows = preset_table(args.model, args.input_shape, args.schemes.split(","))
    print(f"{args.model} at {','.join(map(str, args.input_shape))}: full backprop = {rows[0]['full_backward_gmacs']:.2f} GMACs backward, "
          f"estimated peak {rows[0]['full_peak_mb']:.1f} MB\n")
    print("| scheme | trainable % | backward MACs / full | kept activations / full | est. peak / full (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['scheme']} | {r['trainable_percent']:.2f} | {r['backward_macs_ratio']:.3f} | {r['kept_ratio']:.3f} | "
              f"{r['peak_ratio']:.3f} ({r['peak_mb']:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
