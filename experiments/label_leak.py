"""Label leakage at the upper cut of a U-shaped split, without and with private backprop (not shipped).

The task: scikit-learn's digits, "is it a 0?" (about 10 % positives: imbalanced, as in Li et al.'s
click-through setting). The model: a small CNN split U-shaped, as the split runtime cuts it:

    client bottom  conv(1->8) ReLU maxpool                          x (B,1,16,16) -> a (B,8,8,8)
    server middle  conv(8->16) ReLU maxpool flatten linear(256->32)  a -> h (B,32)
    client top     ReLU linear(32->16) ReLU linear(16->2) + cross-entropy (the labels stay here)

Each step the server sees a (forward), then the cut gradient g = dL/dh (B,32) the client sends back.
Plain mode: the server gets g. Protected mode (pockprop.runtime.private_backprop): it gets m masked
vectors, answers each with its gradients-only backward, and applies the parameter gradients the client
combined. Both modes start from the same weights and see the same batches, so their runs differ by float
rounding only.

The attacks (norm and direction: Li et al., ICLR 2022; spectral: P3EFT's evaluation), scored as a leak AUC = max(AUC, 1 - AUC) of the score against the true
labels (0.5 is chance, 1.0 full recovery), pooled over each epoch's samples:
- norm: the L2 norm of each sample's row;
- direction: the cosine of each sample's row with the row of one known positive of the same batch (the
  attacker's side information in Li et al.), that sample excluded.
The server-side quantities attacked: g itself (plain); each received vector, every pairwise sum and
difference and the sum of all (protected); and an adaptive attacker's least-energy combination of the
received vectors (the span search the protocol does not defend against with one server). Also reported:
the spectral AUC of the forward activations h (their projection on the batch's first principal
direction; the forward path is not protected) and the rank correlation of the applied update's norm with
the batch's positive count.

`python -m experiments.label_leak` prints the markdown tables docs/split.md quotes.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from pockprop.runtime.private_backprop import mask, combine, combine_params


# ---- attack scores and the rank-based AUC (numpy only) ----

def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U with tied ranks averaged): P(score of a positive > of a negative)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        raise ValueError("AUC needs both positive and negative samples")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[labels].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def leak_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """max(AUC, 1 - AUC): the attacker may flip the score's sign (the minority class is known)."""
    a = auc(scores, labels)
    return max(a, 1.0 - a)


def norm_scores(v: np.ndarray) -> np.ndarray:
    """Norm attack: each sample's row norm."""
    return np.linalg.norm(v.reshape(len(v), -1), axis=1)


def direction_scores(v: np.ndarray, ref: int) -> np.ndarray:
    """Direction attack: cosine of each sample's row with row ``ref`` (a sample the attacker knows)."""
    rows = v.reshape(len(v), -1).astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    return rows @ rows[ref] / np.maximum(norms * norms[ref], 1e-300)


def spectral_scores(v: np.ndarray) -> np.ndarray:
    """Spectral attack (label-free): each centred row's projection on the batch's first principal direction,
    signed so that the long tail (the minority class of an imbalanced task) scores high."""
    rows = v.reshape(len(v), -1).astype(np.float64)
    rows = rows - rows.mean(0)
    proj = rows @ np.linalg.svd(rows, full_matrices=False)[2][0]
    return proj if (proj ** 3).sum() >= 0 else -proj


def combinations(vectors) -> dict[str, np.ndarray]:
    """What a server can form from the vectors it received for one batch without knowing the secret."""
    out = {f"z{j}": v for j, v in enumerate(vectors)}
    for i, j in itertools.combinations(range(len(vectors)), 2):
        out[f"z{i}+z{j}"] = vectors[i] + vectors[j]
        out[f"z{i}-z{j}"] = vectors[i] - vectors[j]
    if len(vectors) > 2:
        out["sum"] = sum(vectors)
    return out


def least_energy(vectors) -> np.ndarray:
    """The adaptive attacker's guess: the unit combination of the vectors with the smallest Frobenius norm."""
    flat = np.stack([v.reshape(-1).astype(np.float64) for v in vectors])
    _, eigvec = np.linalg.eigh(flat @ flat.T)
    return np.tensordot(eigvec[:, 0], np.stack(vectors).astype(np.float64), axes=1)


# ---- the U-split and its training (torch: the experiment's reference of the split runtime) ----

def _model(seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    bottom = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    middle = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(256, 32))
    top = nn.Sequential(nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))
    return bottom, middle, top


def server_vjp(middle, a):
    """The server's gradients-only backward for input ``a``: list of cotangents -> [(grad_a, {name: grad})].

    Adapter: with the split runtime this is ``lambda zs: server_part.vjp(a, zs)``.
    """
    import torch

    names, params = zip(*middle.named_parameters())

    def vjp(cotangents):
        x = torch.from_numpy(a).requires_grad_(True)
        h = middle(x)
        answers = []
        for z in cotangents:
            grads = torch.autograd.grad(h, (x, *params), torch.from_numpy(z), retain_graph=True)
            answers.append((grads[0].numpy(), {n: g.numpy() for n, g in zip(names, grads[1:])}))
        return answers
    return vjp


def _data(positive: int):
    from pockprop.models.data import digits

    x, y = digits(resolution=16, channels=1, split="train")
    xt, yt = digits(resolution=16, channels=1, split="test")
    return x, (y == positive).astype(np.int64), xt, (yt == positive).astype(np.int64)


def train(mode: str, *, m: int = 2, epochs: int = 6, batch: int = 32, lr: float = 0.1, seed: int = 0,
          positive: int = 0, scale: float = 8.0) -> dict:
    """One run; returns per-epoch attack AUCs, the accuracy, the final middle weights and the costs."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    x, y, xt, yt = _data(positive)
    bottom, middle, top = _model(seed)
    order_rng, mask_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    epochs_out, bytes_up, bytes_down, vjps, t_mask = [], 0, 0, 0, 0.0
    for epoch in range(epochs):
        obs: dict[str, list] = {}
        labels_seen, upd_norm, pos_count = [], [], []
        perm = order_rng.permutation(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            idx = perm[start:start + batch]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            a = bottom(xb)
            a_np = a.detach().numpy()
            h = middle(torch.from_numpy(a_np))
            h_np = h.detach().numpy()
            hc = torch.from_numpy(h_np).requires_grad_(True)
            loss = F.cross_entropy(top(hc), yb)
            top_grads = torch.autograd.grad(loss, [hc, *top.parameters()])
            g = top_grads[0].numpy()
            vjp = server_vjp(middle, a_np)
            if mode == "plain":
                ((grad_a, mid_grads),) = vjp([g])
                seen = {"g": g}
                bytes_up += g.nbytes
                bytes_down += grad_a.nbytes
                vjps += 1
            else:
                t0 = time.perf_counter()
                masked = mask(g, m, rng=mask_rng, scale=scale)
                t_mask += time.perf_counter() - t0
                answers = vjp(list(masked.vectors))
                grad_a = combine(masked.secret, [ans[0] for ans in answers])
                mid_grads = combine_params(masked.secret, [ans[1] for ans in answers])
                seen = combinations(masked.vectors)
                seen["least-energy"] = least_energy(masked.vectors)
                bytes_up += sum(v.nbytes for v in masked.vectors) + sum(v.nbytes for v in mid_grads.values())
                bytes_down += sum(ans[0].nbytes + sum(t.nbytes for t in ans[1].values()) for ans in answers)
                vjps += m
            seen["h (forward)"] = h_np
            pos = np.flatnonzero(y[idx] == 1)
            if len(pos):
                keep = np.arange(batch) != pos[0]
                for name, v in seen.items():
                    o = obs.setdefault(name, {"norm": [], "direction": [], "spectral": []})
                    o["norm"].append(norm_scores(v)[keep])
                    o["direction"].append(direction_scores(v, pos[0])[keep])
                    o["spectral"].append(spectral_scores(v)[keep])
                labels_seen.append(y[idx][keep])
            upd_norm.append(np.sqrt(sum(float((t ** 2).sum()) for t in mid_grads.values())))
            pos_count.append(int(y[idx].sum()))
            # every party's SGD step: the client's parts with its own gradients, the server's with mid_grads
            a.backward(torch.from_numpy(grad_a))
            with torch.no_grad():
                for p, gp in zip(top.parameters(), top_grads[1:]):
                    p -= lr * gp
                for n, p in middle.named_parameters():
                    p -= lr * torch.from_numpy(mid_grads[n])
                for p in bottom.parameters():
                    p -= lr * p.grad
                    p.grad = None
        lab = np.concatenate(labels_seen)
        row = {name: {att: leak_auc(np.concatenate(s), lab) for att, s in o.items()} for name, o in obs.items()}
        rho = np.corrcoef(np.argsort(np.argsort(upd_norm)), np.argsort(np.argsort(pos_count)))[0, 1]
        row["update norm vs #positives (Spearman)"] = float(rho)
        epochs_out.append(row)
    with torch.no_grad():
        pred = top(middle(bottom(torch.from_numpy(xt)))).argmax(1).numpy()
    steps = epochs * (len(x) // batch)
    return {"epochs": epochs_out, "accuracy": float((pred == yt).mean()),
            "balanced_accuracy": float(0.5 * ((pred[yt == 1] == 1).mean() + (pred[yt == 0] == 0).mean())),
            "middle": {n: p.detach().numpy().copy() for n, p in middle.named_parameters()},
            "bytes_up_per_step": bytes_up / steps, "bytes_down_per_step": bytes_down / steps,
            "server_backwards_per_step": vjps / steps, "mask_ms_per_step": 1e3 * t_mask / steps}


# ---- the tables ----

def _fmt_row(name: str, r: dict) -> str:
    return f"| {name} | {r['norm']:.3f} | {r['direction']:.3f} | {r['spectral']:.3f} |"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--m", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = {"plain": train("plain", epochs=args.epochs, seed=args.seed)}
    for m in args.m:
        runs[f"m={m}"] = train("private", m=m, epochs=args.epochs, seed=args.seed, scale=args.scale)
    plain = runs["plain"]
    print("### Leak AUC per epoch (norm / direction attack), first to last epoch\n")
    print("| run | observed | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |")
    print("|---|---|" + "---|" * args.epochs)
    for run, res in runs.items():
        names = [n for n in res["epochs"][0] if isinstance(res["epochs"][0][n], dict)]
        for n in names:
            cells = " | ".join(f"{e[n]['norm']:.2f} / {e[n]['direction']:.2f}" for e in res["epochs"])
            print(f"| {run} | {n} | {cells} |")
    print("\n### Last epoch: leak AUC by attack\n")
    for run, res in runs.items():
        last = res["epochs"][-1]
        print(f"\n{run}\n\n| observed | norm | direction | spectral |\n|---|---|---|---|")
        for n, r in last.items():
            if isinstance(r, dict):
                print(_fmt_row(n, r))
        print(f"\nupdate norm vs #positives in the batch (Spearman, last epoch): "
              f"{last['update norm vs #positives (Spearman)']:.3f}")
    print("\n### Cost and accuracy\n")
    print("| run | test accuracy | balanced accuracy | max abs diff of server weights vs plain | "
          "bytes up / step | bytes down / step | server backwards / step | masking ms / step |")
    print("|---|---|---|---|---|---|---|---|")
    for run, res in runs.items():
        diff = max(float(np.abs(res["middle"][n] - plain["middle"][n]).max()) for n in plain["middle"])
        print(f"| {run} | {res['accuracy']:.4f} | {res['balanced_accuracy']:.4f} | {diff:.2e} | "
              f"{res['bytes_up_per_step']:.0f} | {res['bytes_down_per_step']:.0f} | "
              f"{res['server_backwards_per_step']:.0f} | {res['mask_ms_per_step']:.2f} |")
    print(f"\n(bytes exclude the forward activations, the same in every run; {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
