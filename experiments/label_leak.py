"""Label leakage at the upper cut of a U-shaped split, without and with private backprop (not shipped).

The task: scikit-learn's digits, "is it a 0?" (about 10 % positives: imbalanced, as in Li et al.'s
click-through setting). The model: a small CNN split U-shaped, as the split runtime cuts it:

    client bottom  conv(1->8) ReLU maxpool                          x (B,1,16,16) -> a (B,8,8,8)
    server middle  conv(8->16) ReLU maxpool flatten linear(256->32)  a -> h (B,32)
    client top     ReLU linear(32->16) ReLU linear(16->2) + cross-entropy (the labels stay here)

Each step the server sees a (its input) and h (its output), then what the client sends back at the cut:
- "plain": the cut gradient g = dL/dh (B,32); the server updates its part itself;
- "private": m masked vectors (pockprop.runtime.private_backprop); it answers each with its gradients-only
  backward and applies the parameter gradients the client combined. Same weights, same batches as plain:
  the runs differ by float rounding only; with decoys=True, m masked vectors that hide g among m - 2 decoys;
- "mixed": P3EFT's multi-adapter mixing: n copies of the server's part, mixed per feature by the client with
  secret weights, each trained through private backprop, optionally with P3EFT's adversarial regulariser
  (a logistic regression the client fits on each copy's h every epoch; the loss pulls its predictions to
  the class prior);
- train_server=False freezes the server's part: no parameter gradients, no update.

The attacks, each scored as a leak AUC = max(AUC, 1 - AUC) against the true labels (0.5 is chance, 1.0 full
recovery), pooled over an epoch's samples:
- norm (Li et al., ICLR 2022): each sample's row norm;
- direction (Li et al.): the cosine of each row with the row of one known positive of the same batch (the
  attacker's side information), that sample excluded;
- spectral (P3EFT's evaluation): the projection on the batch's first principal direction, label-free.
The quantities attacked: a; h and h minus what the server's initial weights give; g (plain); each received
vector, every pairwise sum and difference and the total (protected); the least-energy combination of the
received vectors and the m - 1 low-energy candidates (an adaptive attacker's search of their span), of which
it picks one without labels (the most skewed row norms), with the one known positive (the candidate in which
its row's norm ranks highest) and, as an upper bound, with all labels (per batch and attack, the one that
separates them best); and the per-sample gradients the server
solves for from the update it applies to its last linear layer. Also: the rank correlation of the applied
update's norm with the batch's positive count.

`python -m experiments.label_leak` prints the markdown tables docs/split.md quotes.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from pockprop.runtime.private_backprop import Masker, combine, combine_params


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


def invert_update(grad_w: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """The server's optimizer-inversion attack on a linear layer it trains: its weight gradient is
    grad_w = G^T @ inputs (G the per-sample gradients of the layer's output, inputs known to the server), so
    G = (grad_w @ pinv(inputs))^T, exactly where the batch's inputs are linearly independent (batch <= width)."""
    rows = inputs.reshape(len(inputs), -1).astype(np.float64)
    return (grad_w.astype(np.float64) @ np.linalg.pinv(rows)).T


def least_energy(vectors) -> np.ndarray:
    """The adaptive attacker's guess: the unit combination of the vectors with the smallest Frobenius norm,
    scaled to norm 1 (its size is the batch's, not a sample's: scaling it away makes scores comparable
    across batches)."""
    return low_energy(vectors)[0]


def low_energy(vectors) -> list[np.ndarray]:
    """The adaptive attacker's candidates: the combinations of the vectors along the Gram matrix's eigenvectors,
    all but the largest (the shared noise), least energy first, each scaled to norm 1. With decoy masking g
    is one of them, whole."""
    stack = np.stack(vectors).astype(np.float64)
    flat = stack.reshape(len(vectors), -1)
    _, eigvec = np.linalg.eigh(flat @ flat.T)
    out = [np.tensordot(eigvec[:, k], stack, axes=1) for k in range(max(len(vectors) - 1, 1))]
    return [c / max(np.linalg.norm(c), 1e-300) for c in out]


def tail_weight(v: np.ndarray) -> float:
    """Label-free choice among candidates: the skewness of the row norms (an imbalanced task's gradient has a
    few large rows, its minority class)."""
    r = np.linalg.norm(v.reshape(len(v), -1), axis=1)
    r = r - r.mean()
    return float((r ** 3).mean() / max((r ** 2).mean() ** 1.5, 1e-300))


def known_row_rank(v: np.ndarray, ref: int) -> float:
    """The fraction of rows whose norm is below that of row ``ref`` (a sample the attacker knows is positive)."""
    r = np.linalg.norm(v.reshape(len(v), -1), axis=1)
    return float((r < r[ref]).mean())


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


def mixing_coefficients(n: int, width: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """P3EFT's secret mixing weights (n, width): c_i = 1/n + sum_j a_ij, a antisymmetric with N(0, std^2)
    entries, so every feature's weights sum to 1 and equal parameter sets start as the unmixed model."""
    a = np.zeros((n, n, width))
    for i, j in itertools.combinations(range(n), 2):
        a[i, j] = std * rng.standard_normal(width)
        a[j, i] = -a[i, j]
    return 1.0 / n + a.sum(axis=1)


def _fit_adversary(h: np.ndarray, y: np.ndarray):
    """The client's stand-in for the server's attacker on one parameter set's activations: a logistic regression."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=200).fit(h.reshape(len(h), -1), y)


class _Observed:
    """Per epoch, per quantity the server sees, each attack's scores of every sample but the known positive."""

    def __init__(self):
        self.scores: dict[str, dict[str, list]] = {}
        self.labels: list[np.ndarray] = []

    def add(self, seen: dict[str, np.ndarray], y: np.ndarray) -> None:
        pos = np.flatnonzero(y == 1)
        if not len(pos):
            return
        keep = np.arange(len(y)) != pos[0]
        for name, v in seen.items():
            o = self.scores.setdefault(name, {"norm": [], "direction": [], "spectral": []})
            o["norm"].append(norm_scores(v)[keep])
            o["direction"].append(direction_scores(v, pos[0])[keep])
            o["spectral"].append(spectral_scores(v)[keep])
        self.labels.append(y[keep])

    def add_oracle(self, name: str, candidates, y: np.ndarray) -> None:
        """The upper bound of any choice among ``candidates``: per batch and attack, the one (and the sign) that
        separates this batch's labels best, chosen with the labels."""
        pos = np.flatnonzero(y == 1)
        if not len(pos):
            return
        keep = np.arange(len(y)) != pos[0]
        o = self.scores.setdefault(name, {"norm": [], "direction": [], "spectral": []})
        for att, fn in (("norm", norm_scores), ("direction", lambda v: direction_scores(v, pos[0])),
                        ("spectral", spectral_scores)):
            if y[keep].all() or not y[keep].any():  # one class left once the known positive is set aside
                o[att].append(fn(candidates[0])[keep])
                continue
            scored = [fn(c)[keep] for c in candidates]
            best = max(scored, key=lambda sc: leak_auc(sc, y[keep]))
            o[att].append(best if auc(best, y[keep]) >= 0.5 else -best)

    def aucs(self) -> dict[str, dict[str, float]]:
        lab = np.concatenate(self.labels)
        return {name: {att: leak_auc(np.concatenate(s), lab) for att, s in o.items()}
                for name, o in self.scores.items()}


def train(mode: str, *, m: int = 2, n: int = 2, epochs: int = 6, batch: int = 32, lr: float = 0.3,
          seed: int = 0, positive: int = 0, scale: float = 4.0, mix_std: float = 1.0, adv: float = 1.0,
          train_server: bool = True, decoys: bool = False) -> dict:
    """One run; returns per-epoch attack AUCs, the accuracy, the final middle weights and the costs.

    mode: "plain" (the server gets g), "private" (m masked vectors), "mixed" (n parameter sets of the server's
    part mixed by the client with secret coefficients, each trained through private backprop with m vectors,
    plus the adversarial regulariser of weight ``adv`` from the second epoch on). ``train_server=False``
    freezes the server's part: its backward returns input gradients only and it applies no update.
    ``decoys`` masks with decoys (m >= 3, :class:`Masker`'s ``decoys``).
    """
    import copy

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    x, y, xt, yt = _data(positive)
    bottom, middle, top = _model(seed)
    order_rng, mix_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    copies = [copy.deepcopy(middle) for _ in range(n)] if mode == "mixed" else [middle]
    initial = copy.deepcopy(middle)  # the server's own reference: what its part computed before training
    coef = mixing_coefficients(len(copies), 32, mix_std, mix_rng) if mode == "mixed" else np.ones((1, 32))
    coef_t = torch.from_numpy(coef.astype(np.float32))[:, None, :]
    adversaries, prior = None, float(y.mean())
    maskers = [Masker(m, scale=scale, decoys=decoys, seed=seed + 2 + i) for i in range(len(copies))] if mode != "plain" else []
    epochs_out, bytes_up, bytes_down, vjps, t_mask, rel_err = [], 0, 0, 0, 0.0, []
    for epoch in range(epochs):
        observed, upd_norm, pos_count, hs_epoch = _Observed(), [], [], [[] for _ in copies]
        perm = order_rng.permutation(len(x))
        for start in range(0, len(x) - batch + 1, batch):
            idx = perm[start:start + batch]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            a = bottom(xb)
            a_np = a.detach().numpy()
            with torch.no_grad():
                hs_np = [mid(torch.from_numpy(a_np)).numpy() for mid in copies]
                h0 = initial(torch.from_numpy(a_np)).numpy()
            hs = [torch.from_numpy(h).requires_grad_(True) for h in hs_np]
            loss = F.cross_entropy(top((coef_t * torch.stack(hs)).sum(0)), yb)
            if adversaries is not None and adv > 0:
                for h, lr_model in zip(hs, adversaries):
                    logit = h @ torch.from_numpy(lr_model.coef_[0].astype(np.float32)) + float(lr_model.intercept_[0])
                    loss = loss + adv * F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, prior))
            grads = torch.autograd.grad(loss, [*hs, *top.parameters()])
            cut, top_grads = [g.numpy() for g in grads[:len(hs)]], grads[len(hs):]
            seen = {"a (server input)": a_np}
            grad_a = np.zeros_like(a_np)
            all_mid_grads, oracles = [], []
            for i, (mid, g) in enumerate(zip(copies, cut)):
                tag = f"copy {i}: " if mode == "mixed" else ""
                vjp = server_vjp(mid, a_np)
                if mode == "plain":
                    ((gi, mid_grads),) = vjp([g])
                    seen[tag + "g"] = g
                    bytes_up += g.nbytes
                    bytes_down += gi.nbytes
                    vjps += 1
                else:
                    t0 = time.perf_counter()
                    masked = maskers[i](g)
                    t_mask += time.perf_counter() - t0
                    answers = vjp(list(masked.vectors))
                    gi = combine(masked.secret, [ans[0] for ans in answers])
                    mid_grads = combine_params(masked.secret, [ans[1] for ans in answers]) if train_server else {}
                    ((true_gi, _),) = vjp([g])  # measurement only: the combination's rounding error
                    rel_err.append(float(np.abs(gi - true_gi).max() / max(np.abs(true_gi).max(), 1e-30)))
                    seen.update({tag + k: v for k, v in combinations(masked.vectors).items()})
                    seen[tag + "least-energy"] = least_energy(masked.vectors)
                    candidates = low_energy(masked.vectors)
                    seen[tag + "low-energy, label-free pick"] = max(candidates, key=tail_weight)
                    known = np.flatnonzero(y[idx] == 1)
                    if len(known):  # the direction attack's side information used to choose: the candidate
                        # in which the known positive's row stands out most
                        seen[tag + "low-energy, pick by the known positive"] = max(
                            candidates, key=lambda c: known_row_rank(c, known[0]))
                    oracles.append((tag + "low-energy, oracle pick (labels)", candidates))
                    bytes_up += sum(v.nbytes for v in masked.vectors) + sum(v.nbytes for v in mid_grads.values())
                    bytes_down += sum(ans[0].nbytes + sum(t.nbytes for t in ans[1].values() if train_server)
                                      for ans in answers)
                    vjps += m
                if train_server:
                    with torch.no_grad():
                        last_in = mid[:-1](torch.from_numpy(a_np)).numpy()
                    seen[tag + "applied update, inverted"] = invert_update(mid_grads["4.weight"], last_in)
                else:
                    mid_grads = {}
                seen[tag + "h (forward)"] = hs_np[i]
                seen[tag + "h - h at start"] = hs_np[i] - h0
                hs_epoch[i].append(hs_np[i])
                grad_a += gi
                all_mid_grads.append(mid_grads)
            if mode == "mixed":
                seen["sum of the copies' h"] = sum(hs_np)
            observed.add(seen, y[idx])
            for name, candidates in oracles:
                observed.add_oracle(name, candidates, y[idx])
            upd_norm.append(np.sqrt(sum(float((t ** 2).sum()) for mg in all_mid_grads for t in mg.values())))
            pos_count.append(int(y[idx].sum()))
            # every party's SGD step: the client's parts with its own gradients, the server's with the combined ones
            a.backward(torch.from_numpy(grad_a))
            with torch.no_grad():
                for p, gp in zip(top.parameters(), top_grads):
                    p -= lr * gp
                for mid, mid_grads in zip(copies, all_mid_grads):
                    for name, p in mid.named_parameters():
                        if train_server:
                            p -= lr * torch.from_numpy(mid_grads[name])
                for p in bottom.parameters():
                    p -= lr * p.grad
                    p.grad = None
        row = observed.aucs()
        rho = (np.corrcoef(np.argsort(np.argsort(upd_norm)), np.argsort(np.argsort(pos_count)))[0, 1]
               if train_server else float("nan"))
        row["update norm vs #positives (Spearman)"] = float(rho)
        epochs_out.append(row)
        if mode == "mixed":
            ys = y[perm[:len(hs_epoch[0]) * batch]]
            adversaries = [_fit_adversary(np.concatenate(h), ys) for h in hs_epoch]
    with torch.no_grad():
        a = bottom(torch.from_numpy(xt))
        pred = top((coef_t * torch.stack([mid(a) for mid in copies])).sum(0)).argmax(1).numpy()
    steps = epochs * (len(x) // batch)
    return {"epochs": epochs_out, "accuracy": float((pred == yt).mean()),
            "balanced_accuracy": float(0.5 * ((pred[yt == 1] == 1).mean() + (pred[yt == 0] == 0).mean())),
            "middle": {name: p.detach().numpy().copy() for name, p in copies[0].named_parameters()},
            "weights": [p.detach().numpy().copy() for p in (*bottom.parameters(), *copies[0].parameters(),
                                                            *top.parameters())],
            "bytes_up_per_step": bytes_up / steps, "bytes_down_per_step": bytes_down / steps,
            "server_backwards_per_step": vjps / steps, "mask_ms_per_step": 1e3 * t_mask / steps,
            "rel_error": (float(np.median(rel_err)), float(np.max(rel_err))) if rel_err else (0.0, 0.0)}


# ---- the tables ----

TWIN = {"private m=2": "plain", "private m=3": "plain",  # the unprotected run each would equal, up to rounding
        "private m=2, server part frozen": "plain, server part frozen", "private m=6, decoys": "plain",
        "private m=6, decoys, server part frozen": "plain, server part frozen",
        "private m=10, decoys, server part frozen": "plain, server part frozen"}
RUNS = {  # name -> train() arguments
    "plain": {"mode": "plain"},
    "private m=2": {"mode": "private", "m": 2},
    "private m=3": {"mode": "private", "m": 3},
    "plain, server part frozen": {"mode": "plain", "train_server": False},
    "private m=2, server part frozen": {"mode": "private", "m": 2, "train_server": False},
    "private m=6, decoys": {"mode": "private", "m": 6, "decoys": True},
    "private m=6, decoys, server part frozen": {"mode": "private", "m": 6, "decoys": True, "train_server": False},
    "private m=10, decoys, server part frozen": {"mode": "private", "m": 10, "decoys": True, "train_server": False},
    "mixed n=2, m=2": {"mode": "mixed", "n": 2, "m": 2, "adv": 0.0, "lr": 0.1},  # diverges at 0.3
    "mixed n=2, m=2, adversarial 1.0": {"mode": "mixed", "n": 2, "m": 2, "adv": 1.0, "lr": 0.1},
}


def _received(name: str) -> bool:
    """A quantity formed from the masked vectors alone (each, sums, differences), not the adaptive attack."""
    tail = name.split(": ")[-1]
    return tail.startswith("z") or tail == "sum"


def summary(row: dict) -> dict[str, float]:
    """Worst leak AUC over the three attacks, per kind of observed quantity (forward, gradient channel)."""
    worst: dict[str, float] = {}
    for name, r in row.items():
        if not isinstance(r, dict):
            continue
        if _received(name):
            key = "received vectors, their sums and differences"
        else:
            key = name.split(": ")[-1].replace("sum of the copies' h", "h (forward)")
        worst[key] = max(worst.get(key, 0.0), *r.values())
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = {name: train(epochs=args.epochs, seed=args.seed, **RUNS[name]) for name in args.runs}
    print("### Worst leak AUC (max over the norm, direction and spectral attacks) per epoch\n")
    print("| run | observed | " + " | ".join(f"ep {e + 1}" for e in range(args.epochs)) + " |")
    print("|---|---|" + "---|" * args.epochs)
    for run, res in runs.items():
        rows = [summary(e) for e in res["epochs"]]
        for key in rows[0]:
            print(f"| {run} | {key} | " + " | ".join(f"{r[key]:.2f}" for r in rows) + " |")
    print("\n### Last epoch, each observed quantity and attack\n")
    print("| run | observed | norm | direction | spectral |\n|---|---|---|---|---|")
    for run, res in runs.items():
        for name, r in res["epochs"][-1].items():
            if isinstance(r, dict):
                print(f"| {run} | {name} | {r['norm']:.3f} | {r['direction']:.3f} | {r['spectral']:.3f} |")
    print("\n### Cost and accuracy\n")
    print("| run | test acc. | balanced acc. | all weights vs the unprotected twin (max abs diff) | combination rel. error "
          "per step (median, max) | bytes up / step | bytes down / step | server backwards / step | masking ms / step | "
          "update norm vs #positives (Spearman, last epoch) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, res in runs.items():
        twin = runs.get(TWIN.get(run, ""))
        diff = (f"{max(float(np.abs(w - v).max()) for w, v in zip(res['weights'], twin['weights'])):.1e}"
                if twin else "-")
        print(f"| {run} | {res['accuracy']:.4f} | {res['balanced_accuracy']:.4f} | {diff} | "
              f"{res['rel_error'][0]:.0e}, {res['rel_error'][1]:.0e} | {res['bytes_up_per_step']:.0f} | {res['bytes_down_per_step']:.0f} | "
              f"{res['server_backwards_per_step']:.0f} | {res['mask_ms_per_step']:.2f} | "
              f"{res['epochs'][-1]['update norm vs #positives (Spearman)']:.2f} |")
    print(f"\n(bytes exclude the forward activations, the same in every unmixed run; {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
