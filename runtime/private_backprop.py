"""Private backpropagation through a server's part of a U-shaped split (P3EFT, Zmushko et al. 2024).

In a U-shaped split the client holds the head, the loss and the labels; the gradient ``g`` it sends down to
the server's part at the upper cut depends on the labels, and its per-sample norm and direction reveal them
(Li et al., ICLR 2022). The server's backward pass is linear in the gradient it receives: for fixed inputs,

    vjp(sum_j a_j z_j) = sum_j a_j vjp(z_j)       (input gradients and parameter gradients alike)

so the client sends ``m`` vectors ``z_1..z_m`` instead of ``g``, with secret coefficients ``a`` such that
``sum_j a_j z_j = g``, and combines the server's ``m`` answers with the same ``a``. The result is the
true VJP up to float rounding: training is unchanged. What the server sees of the gradient is the ``m``
vectors only:

- ``m - 1`` of them are pure noise, drawn without looking at any label: each sample's row has a random
  direction in the row space of ``g`` (where the label signal lives, so the noise covers it) and a random
  norm of ``scale`` to ``3 * scale`` times a unit: a moving average of earlier batches' largest gradient
  row norms (:class:`Masker`);
- the last is ``(g - sum_{j<m} a_j z_j) / a_m``, i.e. the gradient buried under that noise;
- the coefficients are fresh for every batch, with random signs and magnitudes about a factor of 2 apart
  (so no sum or difference of two vectors cancels the noise), and the vectors are sent in a random order.

With ``Masker(m, decoys=True)`` (``m >= 3``) the span of the vectors holds more than ``g`` and noise: the
vectors mix, by a secret random orthogonal matrix, one shared large noise ``N`` with ``g`` and ``m - 2``
decoys, each made of gradient rows (``g``'s own, and earlier batches' when ``history`` > 0) in a random order
with random signs, their norms and ``g``'s on a shuffled grid (:func:`_mask_with_decoys`). Cancelling ``N``
leaves ``g`` and the decoys, each whole, and nothing in them says which is ``g``.

What stays true, and what does not (docs/split.md, "Label privacy", has the measurements): each vector and
each fixed combination of them (sums, differences) carry the label signal only as a small perturbation of
label-independent noise. The server still knows that ``g`` lies in the span of the ``m`` vectors it got
for a batch. Without decoys, that span's least-energy direction is ``g``'s: an adaptive server recovers the
gradient. With decoys, a server that searches the span finds ``g`` among ``m - 1`` equally plausible
candidates: it picks the right one in about one batch in ``m - 1``, which bounds, and does not remove, what
it learns. P3EFT sends the vectors to distinct non-colluding servers for that reason; with one server this
is obfuscation, not a guarantee. Nor are the inputs and activations of the server's part hidden, or the
combined parameter update the server applies: for a linear layer at least as wide as the batch, that update
gives every sample's gradient back (a frozen server part applies none).

numpy only: this runs on the device.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pockprop.errors import DataError

__all__ = ["Masked", "Masker", "mask", "combine", "combine_params", "private_vjp", "private_step"]

NOISE = ("rowspace", "isotropic")
_JITTER = 0.15  # log2 jitter of the secret coefficients' magnitudes: neighbours stay >= 2^0.7 = 1.6x apart
_RADIUS_SPREAD = 3.0  # noise row norms in [scale, 3 * scale] x the noise unit


@dataclass(frozen=True)
class Masked:
    """What one batch's masking produced: ``vectors`` go to the server; ``secret`` never leaves the client.

    ``sum_j secret[j] * vectors[j] == g`` up to rounding in ``g``'s dtype.
    """

    vectors: tuple[np.ndarray, ...]
    secret: np.ndarray

    @property
    def m(self) -> int:
        return len(self.vectors)


def _check_array(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise DataError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[0] < 1:
        raise DataError(f"{name} must have a batch dimension with at least one sample, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise DataError(f"{name} has non-finite values (NaN or inf)")
    return a


def _unit_rows(rng: np.random.Generator, n: int, basis: np.ndarray | None, d: int) -> np.ndarray:
    """(n, d) rows of norm 1, uniform on the sphere of the row space of ``basis`` (k, d), or of R^d."""
    if basis is None:
        u = rng.standard_normal((n, d))
    else:
        u = rng.standard_normal((n, basis.shape[0])) @ basis
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _row_space(rows: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis (k, d) of the span of ``rows``, or None where the rows are all zero."""
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return None
    return vt[s > s[0] * 1e-7]


def _check_options(m: int, scale: float, noise: str) -> None:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise DataError(f"private backprop needs m >= 2 vectors (one alone would be the gradient), got {m!r}")
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise DataError(f"the noise scale must be a positive number, got {scale!r}")
    if noise not in NOISE:
        raise DataError(f"noise must be one of {', '.join(NOISE)}, got {noise!r}")


def _largest_row_norm(rows: np.ndarray) -> float:
    top = float(np.linalg.norm(rows, axis=1).max())
    return top if top > 0 else 1.0


def mask(g: np.ndarray, m: int = 2, *, seed: int | None = None, rng: np.random.Generator | None = None,
         scale: float = 4.0, noise: str = "rowspace", unit: float | None = None,
         pool: np.ndarray | None = None) -> Masked:
    """Hide the cut gradient ``g`` (batch first) among ``m`` vectors; see the module docstring.

    Noise row norms are ``scale`` to ``3 * scale`` times ``unit``. Without ``unit``, the batch's largest
    gradient row norm is used, and the noise level then tells the server that batch-level number; a
    :class:`Masker` passes a unit drawn from earlier batches only. Reproducible from ``seed`` (or driven
    by ``rng``); a fresh mask per batch is the caller's part.

    With ``pool`` (rows of earlier batches' cut gradients, ``(P, d)``, possibly empty), the vectors hide ``g``
    among ``m - 2`` decoys drawn from the pool and ``g``'s own rows instead (:func:`_mask_with_decoys`);
    that needs ``m >= 3``.
    """
    g = _check_array("the cut gradient", g)
    _check_options(m, scale, noise)
    if rng is not None and seed is not None:
        raise DataError("give seed or rng, not both")
    if unit is not None and not (isinstance(unit, (int, float)) and np.isfinite(unit) and unit > 0):
        raise DataError(f"the noise unit must be a positive number, got {unit!r}")
    rng = rng if rng is not None else np.random.default_rng(seed)

    n = g.shape[0]
    rows = g.reshape(n, -1).astype(np.float64)
    d = rows.shape[1]
    if unit is None:
        unit = _largest_row_norm(rows)
    if pool is not None:
        return _mask_with_decoys(g, rows, m, rng, scale * unit, noise, pool)
    basis = _row_space(rows) if noise == "rowspace" else None

    # Magnitudes a factor of about 2 apart (2^(j - (m-1)/2), jittered), in random order with random signs: no
    # two are close to equal, so no sum or difference of two vectors cancels the noise and bares g.
    # The gradient-carrying vector (the last here) takes the largest magnitude, which keeps it and the float
    # rounding of its answer small; the send order is shuffled below, so this says nothing to the server.
    levels = np.arange(m) - (m - 1) / 2 + rng.uniform(-_JITTER, _JITTER, m)
    coef = 2.0 ** np.r_[rng.permutation(levels[:-1]), levels[-1]] * rng.choice([-1.0, 1.0], m)
    vectors = []
    rest = rows.copy()
    for j in range(m - 1):
        radius = scale * unit * rng.uniform(1.0, _RADIUS_SPREAD, (n, 1))
        z = radius * _unit_rows(rng, n, basis, d)
        vectors.append(z)
        rest -= coef[j] * z
    vectors.append(rest / coef[m - 1])
    order = rng.permutation(m)  # the gradient-carrying vector is not always the last one sent
    return Masked(vectors=tuple(vectors[i].reshape(g.shape).astype(g.dtype) for i in order),
                  secret=coef[order].copy())


_ENERGY_STEP = 1.0  # log2 step between the norms of g and the decoys (a shuffled grid, see _mask_with_decoys)


def _mask_with_decoys(g: np.ndarray, rows: np.ndarray, m: int, rng: np.random.Generator, noise_unit: float,
                      noise: str, pool: np.ndarray) -> Masked:
    """The ``m`` vectors are mixtures, by a secret random orthogonal ``m x m`` matrix ``Q``, of a shared noise
    ``N`` and of ``g`` and ``m - 2`` decoys: ``z = Q @ [N, g, d_1, ..]``, and ``secret = Q[:, 1]``.

    Each decoy is ``n`` rows drawn from ``g``'s own rows and the ``pool`` (earlier batches' gradient rows), each
    with a random sign, so it is a cut gradient in everything but which sample's row sits where. ``g``'s norm
    and the decoys' are ``c * 2^t`` with ``t`` a shuffled grid, so ``g``'s rank among them is uniform. Every
    vector, sum and difference carries ``N`` with a coefficient of at least about 0.6 (``N``'s rows are
    ``noise_unit`` to 3 times that); the combinations that cancel ``N`` span ``g`` and the decoys together.
    """
    if m < 3:
        raise DataError(f"decoy masking needs m >= 3 vectors (the noise, the gradient and a decoy), got {m}")
    pool = np.asarray(pool, dtype=np.float64)
    n, d = rows.shape
    if pool.ndim != 2 or pool.shape[1] != d or not np.isfinite(pool).all():
        raise DataError(f"the decoy pool must be finite rows of the gradient's width {d}, got shape {list(pool.shape)}")
    source = np.vstack([rows, pool])
    # log2 norms of g and the decoys: a grid, shuffled (g's place in it is uniform) and jittered. Grid steps
    # (a factor of 2^0.6 at least) keep the Gram's eigen-combinations whole: two near-equal energies would blend
    # g with a decoy, and a blend shows g's row pattern in every batch where a whole decoy shows nothing.
    t = rng.permutation(_ENERGY_STEP * np.arange(m - 1)) + rng.uniform(-_ENERGY_STEP / 5, _ENERGY_STEP / 5, m - 1)
    size = float(np.linalg.norm(rows))
    ref = (size if size > 0 else noise_unit * np.sqrt(n)) * 2.0 ** -t[0]
    basis = [rows]
    for k in range(1, m - 1):
        decoy = source[rng.choice(len(source), n, replace=len(source) < n)] * rng.choice([-1.0, 1.0], (n, 1))
        if not decoy.any():  # nothing gradient-like to draw from yet (zero gradients): random rows instead
            decoy = _unit_rows(rng, n, None, d)
        basis.append(decoy * (ref * 2.0 ** t[k] / np.linalg.norm(decoy)))
    space = _row_space(source) if noise == "rowspace" else None
    shared = noise_unit * rng.uniform(1.0, _RADIUS_SPREAD, (n, 1)) * _unit_rows(rng, n, space, d)
    # N's coefficients: magnitudes at least 1.57 times apart, so no sum or difference of two vectors cancels N
    # The mixing matrix is orthogonal beyond that column: the Gram matrix of the vectors then has g and the
    # decoys (nearly orthogonal: random signs) as its eigen-combinations, each whole, never a blend whose
    # norm pattern would show g's rows (a blend leaks in every batch; a whole decoy, never).
    # (2^0.85 +- 0.1 apart: m vectors span 1.8^(m-1), and the answers to the largest must stay float32-exact).
    first = 2.0 ** rng.permutation(0.85 * np.arange(m) + rng.uniform(-0.1, 0.1, m)) * rng.choice([-1.0, 1.0], m)
    q, r = np.linalg.qr(np.column_stack([first, rng.standard_normal((m, m - 1))]))
    q *= np.sign(np.diag(r))  # q[:, 0] = first / |first|; the other columns, random orthonormal
    shared *= 1.0 / np.abs(q[:, 0]).min()  # the vector with the least of N still carries noise_unit of it per row
    secret = q[:, 1].copy()  # q^T secret = e_1 (q orthogonal): sum_j secret_j z_j = g
    vectors = q @ np.stack([shared, *basis]).reshape(m, -1)
    return Masked(vectors=tuple(v.reshape(g.shape).astype(g.dtype) for v in vectors), secret=secret)


def _check_secret(secret: np.ndarray, count: int, what: str) -> np.ndarray:
    secret = np.asarray(secret, dtype=np.float64)
    if secret.ndim != 1 or secret.size < 2 or not np.isfinite(secret).all():
        raise DataError(f"the secret coefficients must be a finite vector of m >= 2 numbers, got shape "
                        f"{list(secret.shape)}")
    if count != secret.size:
        raise DataError(f"{count} {what} for {secret.size} masked vectors: the server must answer each vector once")
    return secret


def combine(secret: np.ndarray, answers: Sequence[np.ndarray]) -> np.ndarray:
    """``sum_j secret[j] * answers[j]``: the true input gradient from the server's answers to the m vectors.

    Summed in float64, returned in the answers' dtype.
    """
    secret = _check_secret(secret, len(answers), "input gradients")
    arrays = [_check_array(f"the server's input gradient {j}", a) for j, a in enumerate(answers)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"the server's input gradients differ in shape: {sorted(list(s) for s in shapes)}")
    total = sum(c * a.astype(np.float64) for c, a in zip(secret, arrays))
    return total.astype(arrays[0].dtype)


def combine_params(secret: np.ndarray, answers: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per parameter, ``sum_j secret[j] * answers[j][name]``: the true parameter gradients of the batch."""
    secret = _check_secret(secret, len(answers), "parameter-gradient sets")
    names = [sorted(a) for a in answers]
    if any(n != names[0] for n in names):
        raise DataError(f"the server's parameter gradients name different tensors: {names[0]} vs "
                        f"{next(n for n in names if n != names[0])}")
    out = {}
    for name in names[0]:
        arrays = [np.asarray(a[name]) for a in answers]
        if len({a.shape for a in arrays}) != 1 or any(a.dtype.kind != "f" for a in arrays):
            raise DataError(f"the server's gradients of {name!r} differ in shape or are not floating-point")
        if not all(np.isfinite(a).all() for a in arrays):
            raise DataError(f"the server's gradient of {name!r} has non-finite values (NaN or inf)")
        out[name] = sum(c * a.astype(np.float64) for c, a in zip(secret, arrays)).astype(arrays[0].dtype)
    return out


class Masker:
    """A client's masking state across batches: its random generator and the noise unit.

    ``decoys`` selects decoy masking (``m >= 3``); its decoys draw on this batch's gradient rows and on those
    of the last ``history`` batches (0: this batch's only, whose rows then match ``g``'s as a set).

    The unit is an exponential moving average (``decay``) of the batches' largest cut-gradient row norms,
    taken *before* the batch at hand is seen, so the noise level says nothing about that batch (the first
    batch, having no past, uses its own). Nothing of it needs saving with a checkpoint: a new one after a
    restart draws fresh secrets and takes its unit from its first batch again.
    """

    def __init__(self, m: int = 2, *, scale: float = 4.0, noise: str = "rowspace", decay: float = 0.9,
                 decoys: bool = False, history: int = 0, seed: int | None = None):
        _check_options(m, scale, noise)
        if not 0.0 <= decay < 1.0:
            raise DataError(f"the noise unit's decay must be in [0, 1), got {decay!r}")
        if decoys and m < 3:
            raise DataError(f"decoy masking needs m >= 3 vectors (the noise, the gradient and a decoy), got {m}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise DataError(f"the decoy history must be a number of batches >= 0, got {history!r}")
        self.m, self.scale, self.noise, self.decay = m, scale, noise, decay
        self.decoys, self.history = decoys, history
        self.rng = np.random.default_rng(seed)
        self.unit: float | None = None
        self.past: list[np.ndarray] = []  # the last `history` batches' gradient rows: the decoys' pool

    def __call__(self, g: np.ndarray) -> Masked:
        g = _check_array("the cut gradient", g)
        rows = g.reshape(g.shape[0], -1).astype(np.float64)
        top = _largest_row_norm(rows)
        unit = top if self.unit is None else self.unit
        pool = None
        if self.decoys:
            past = [p for p in self.past if p.shape[1] == rows.shape[1]]
            pool = np.vstack(past) if past else np.zeros((0, rows.shape[1]))
        masked = mask(g, self.m, rng=self.rng, scale=self.scale, noise=self.noise, unit=unit, pool=pool)
        self.unit = top if self.unit is None else self.decay * self.unit + (1.0 - self.decay) * top
        if self.decoys and self.history:
            self.past = [*self.past, rows][-self.history:]
        return masked


ServerVjp = Callable[[list[np.ndarray]], Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]]


def private_vjp(vjp: ServerVjp, g: np.ndarray, masker: Masker) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The server part's (input gradient, parameter gradients) for the cut gradient ``g``, asked privately.

    ``vjp`` is the server's gradients-only backward for the batch it last ran forward, given a list of
    output cotangents; it returns one (input gradient, {parameter: gradient}) per cotangent. With the split
    runtime that is ``lambda zs: server_part.vjp(x, zs)``. The combined parameter gradients are what the
    client then asks the server to apply (``server_part.apply(grads, lr)``).
    """
    masked = masker(g)
    answers = list(vjp(list(masked.vectors)))
    if len(answers) != masked.m:
        raise DataError(f"the server answered {len(answers)} of {masked.m} masked vectors")
    grad_in = combine(masked.secret, [a[0] for a in answers])
    return grad_in, combine_params(masked.secret, [a[1] for a in answers])


def private_step(part, x: np.ndarray, g: np.ndarray, masker: Masker, lr: float | None = None) -> np.ndarray:
    """One training step of a server's part of a split (runtime/split.py ``Part``, compiled with
    ``--private-backprop``) on its input ``x`` and the cut gradient ``g``, asked privately: the part
    answers the masked vectors (``part.vjp``), then applies the combined parameter gradients
    (``part.apply``). Returns the gradient of the part's input, for the part below.

    With a remote part, ``part`` is whatever offers the same two calls; the server sees the masked vectors
    and the combined update, never ``g``.
    """
    grad_in, grads = private_vjp(lambda zs: part.vjp(x, zs), g, masker)
    if grads:
        part.apply(grads, lr)
    return grad_in
