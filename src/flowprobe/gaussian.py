"""Closed forms for Gaussian endpoints: marginal fields, irreducible losses, OT maps, Bures-Wasserstein.

Setting. The source is x0 ~ N(m0, S0) (usually N(0, I)) and the target x1 ~ N(m1, S1). Two kinds of
coupling are covered, both jointly Gaussian in (x0, x1):

- the linear deterministic coupling x1 = mu + A x0 (:class:`LinearGaussianCoupling`): the OT map
  A = M^{1/2} (for S0 = I), a rotated OT map A = M^{1/2} R, the 180-degree pairing A = -I, ...;
- the independent coupling x0 independent of x1 (:class:`IndependentGaussianCoupling`).

Along an affine path x_t = a(t) x0 + b(t) x1 + g(t) z with target u_t = a'(t) x0 + b'(t) x1 + g'(t) z
(any :class:`flowprobe.paths.ProbabilityPath`: the linear path, constant noise g = sigma, the Brownian bridge
g = sigma sqrt(t(1-t)) whose target includes g'(t) z) the triple (x0, x1, z) is Gaussian, so x_t and u_t
are jointly Gaussian at each t with

    E x_t = a m0 + b m1                              E u_t = a' m0 + b' m1
    C_xx  = a^2 S00 + b^2 S11 + a b (S01 + S10) + g^2 I
    C_ux  = a' a S00 + b' b S11 + a' b S01 + b' a S10 + g' g I       (= Cov(u_t, x_t))
    C_uu  = a'^2 S00 + b'^2 S11 + a' b' (S01 + S10) + g'^2 I

and the minimiser of the CFM loss (the *marginal field*) and the loss it leaves are

    v*(x, t) = E[u_t | x_t = x] = E u_t + C_ux C_xx^{-1} (x - E x_t)
    L*(t)    = E || u_t - v*(x_t, t) ||^2 = tr Cov(u_t | x_t) = tr(C_uu - C_ux C_xx^{-1} C_xu).

For the deterministic linear coupling (g = 0) the marginal field is the pair field of Lemma 1: with
Theta = A - I, x_t - t mu = (I + t Theta) x0, so v*(x, t) = mu + Theta (I + t Theta)^{-1} (x - t mu),
defined wherever I + t Theta = (1 - t) I + t A is invertible.

Everything is written in torch and keeps the dtype of its inputs, so float64 in gives float64 out.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .couplings import Pairing
from .paths import LinearPath, ProbabilityPath

__all__ = [
    "sqrtm_psd", "rotation_matrix", "gaussian_ot_matrix", "gaussian_ot_map", "bures_wasserstein_squared",
    "bures_wasserstein", "lemma_one_field", "LemmaOneField", "linear_coupling_field", "antipodal_field",
    "antipodal_irreducible_loss", "GaussianCoupling", "LinearGaussianCoupling", "IndependentGaussianCoupling",
    "JointGaussianCoupling", "gibbs_tilted_coupling",
]


# ----------------------------------------------------------------------------------------------------------------
# Matrix helpers, OT map and Bures-Wasserstein distance
# ----------------------------------------------------------------------------------------------------------------

def _sym(S: Tensor) -> Tensor:
    return (S + S.transpose(-1, -2)) / 2


def sqrtm_psd(S: Tensor) -> Tensor:
    """The symmetric square root S^{1/2} of a symmetric positive semi-definite matrix (V diag(sqrt(l)) V^T from
    the eigendecomposition S = V diag(l) V^T; tiny negative eigenvalues from rounding are clamped to 0)."""
    if S.dim() < 2 or S.shape[-1] != S.shape[-2]:
        raise ValueError(f"S must be a square matrix (or a batch of them), got shape {tuple(S.shape)}")
    evals, evecs = torch.linalg.eigh(_sym(S))
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)


def rotation_matrix(angle_degrees: float, dim: int = 2, plane: tuple[int, int] = (0, 1),
                    dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The rotation by ``angle_degrees`` in the coordinate plane ``plane`` of R^dim (identity elsewhere):
    R[i, i] = R[j, j] = cos a, R[i, j] = -sin a, R[j, i] = sin a for plane = (i, j)."""
    i, j = plane
    if dim < 2 or not (0 <= i < dim and 0 <= j < dim and i != j):
        raise ValueError(f"plane must name two different axes of R^{dim}, got {plane}")
    a = math.radians(angle_degrees)
    R = torch.eye(dim, dtype=dtype, device=device)
    c, s = math.cos(a), math.sin(a)
    # exact values at multiples of 90 degrees (cos(pi) = -1, sin(pi) = 0 without 1e-16 residue)
    if float(angle_degrees) % 90 == 0:
        c, s = round(c), round(s)
    R[i, i], R[j, j], R[i, j], R[j, i] = c, c, -s, s
    return R


def gaussian_ot_matrix(S0: Tensor, S1: Tensor) -> Tensor:
    """The linear part A of the Brenier (W2-optimal) map x -> m1 + A (x - m0) from N(m0, S0) to N(m1, S1):

        A = S0^{-1/2} (S0^{1/2} S1 S0^{1/2})^{1/2} S0^{-1/2}     (symmetric positive semi-definite),

    which is S1^{1/2} for S0 = I. S0 must be positive definite."""
    r0 = sqrtm_psd(S0)
    r0_inv = torch.linalg.inv(r0)
    return _sym(r0_inv @ sqrtm_psd(r0 @ S1 @ r0) @ r0_inv)


def gaussian_ot_map(x: Tensor, m0: Tensor, S0: Tensor, m1: Tensor, S1: Tensor) -> Tensor:
    """T(x) = m1 + A (x - m0) with A = :func:`gaussian_ot_matrix` (x batch-first, shape (B, d))."""
    A = gaussian_ot_matrix(S0, S1).to(x.dtype)
    return m1.to(x.dtype) + (x - m0.to(x.dtype)) @ A.T


def bures_wasserstein_squared(m0: Tensor, S0: Tensor, m1: Tensor, S1: Tensor) -> Tensor:
    """W2^2 between N(m0, S0) and N(m1, S1) (the squared Bures-Wasserstein distance):

        W2^2 = ||m0 - m1||^2 + tr(S0 + S1 - 2 (S0^{1/2} S1 S0^{1/2})^{1/2}),

    the trace of the square root computed as sum_k sqrt(lambda_k(S0^{1/2} S1 S0^{1/2}))."""
    r0 = sqrtm_psd(S0)
    cross = torch.linalg.eigvalsh(_sym(r0 @ S1 @ r0)).clamp_min(0).sqrt().sum()
    w2 = (m0 - m1).pow(2).sum() + torch.trace(S0) + torch.trace(S1) - 2 * cross
    return w2.clamp_min(0)


def bures_wasserstein(m0: Tensor, S0: Tensor, m1: Tensor, S1: Tensor) -> Tensor:
    """W2 between two Gaussians: the square root of :func:`bures_wasserstein_squared`."""
    return bures_wasserstein_squared(m0, S0, m1, S1).sqrt()


# ----------------------------------------------------------------------------------------------------------------
# The Lemma-1 family
# ----------------------------------------------------------------------------------------------------------------

def lemma_one_field(t: Tensor, x: Tensor, theta: Tensor, Theta: Tensor) -> Tensor:
    """The Lemma-1 field v(x, t) = theta + Theta (I + t Theta)^{-1} (x - t theta), batched.

    t has shape (B,) (or is a scalar), x has shape (B, d), theta (d,), Theta (d, d). The linear system
    (I + t Theta) w = x - t theta is solved without a singularity check (``torch.linalg.solve_ex``), so at a
    time where I + t Theta is singular (e.g. t = 1/2 for Theta = -2 I) the result is inf or nan instead of an
    exception: the field is not defined there.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (B, d), got {tuple(x.shape)}")
    d = x.shape[1]
    if theta.shape != (d,) or Theta.shape != (d, d):
        raise ValueError(f"theta must have shape ({d},) and Theta ({d}, {d}), got {tuple(theta.shape)} "
                         f"and {tuple(Theta.shape)}")
    t = t.to(x.dtype).reshape(-1).expand(x.shape[0])
    theta, Theta = theta.to(x.dtype), Theta.to(x.dtype)
    y = x - t[:, None] * theta
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    Mt = eye + t[:, None, None] * Theta
    w = torch.linalg.solve_ex(Mt, y.unsqueeze(-1))[0].squeeze(-1)
    return theta + w @ Theta.T


def linear_coupling_field(t: Tensor, x: Tensor, mu: Tensor, A: Tensor) -> Tensor:
    """Marginal (= pair) field of the deterministic coupling x1 = mu + A x0 under the linear path:

        v(x, t) = mu + Theta (I + t Theta)^{-1} (x - t mu),  Theta = A - I

    (Lemma 1 with theta = mu). Valid for any source law, because x_t - t mu = (I + t Theta) x0 and
    x1 - x0 = mu + Theta x0."""
    d = mu.shape[0]
    return lemma_one_field(t, x, mu, A - torch.eye(d, dtype=A.dtype, device=A.device))


class LemmaOneField(nn.Module):
    """The Lemma-1 family as a module with parameters theta (d,) and Theta (d, d):

        net(t, x) = theta + Theta (I + t Theta)^{-1} (x - t theta).

    Defaults: theta = 0, Theta = 0. Works under ``torch.func`` (``functional_call`` + ``vmap(grad)``), so the
    gradient-variance probe can take per-sample gradients with respect to (theta, Theta).
    """

    def __init__(self, d: int, theta: Tensor | None = None, Theta: Tensor | None = None, dtype=torch.float64):
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        theta = torch.zeros(d, dtype=dtype) if theta is None else torch.as_tensor(theta, dtype=dtype).clone()
        Theta = torch.zeros(d, d, dtype=dtype) if Theta is None else torch.as_tensor(Theta, dtype=dtype).clone()
        if theta.shape != (d,) or Theta.shape != (d, d):
            raise ValueError(f"theta must have shape ({d},) and Theta ({d}, {d})")
        self.d = d
        self.theta = nn.Parameter(theta)
        self.Theta = nn.Parameter(Theta)

    @classmethod
    def from_linear_coupling(cls, mu: Tensor, A: Tensor) -> "LemmaOneField":
        """The pair-optimal member for x1 = mu + A x0: theta = mu, Theta = A - I."""
        d = mu.shape[0]
        return cls(d, mu, A - torch.eye(d, dtype=A.dtype, device=A.device), dtype=mu.dtype)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return lemma_one_field(t, x, self.theta, self.Theta)


def antipodal_field(t: Tensor, x: Tensor, mu: Tensor, sigma: float = 0.0, schedule: str = "constant") -> Tensor:
    """Marginal field of the 180-degree pairing x1 = mu - x0, x0 ~ N(0, I), written out (y = x - t mu, s = 1 - 2t):

    - sigma = 0:                 v0(x, t) = mu - 2 y / s             (singular at t = 1/2; inf/nan there)
    - constant noise g = sigma:  v(x, t)  = mu - 2 s / (s^2 + sigma^2) y
    - bridge g = sigma sqrt(t(1-t)), target x1 - x0 + g' z:
                                 v(x, t)  = mu - (2 - sigma^2 / 2) s / (s^2 + sigma^2 t (1 - t)) y

    (from E[u | x_t] = E u + C_ux C_xx^{-1}(x - E x_t) with C_xx = s^2 + g^2, C_ux = -2 s + g g' per
    coordinate, g g' = sigma^2 s / 2 for the bridge). For every sigma > 0 the field is smooth and its flow
    map is the OT map x0 -> x0 + mu.
    """
    if schedule not in ("constant", "bridge"):
        raise ValueError(f"schedule must be 'constant' or 'bridge', got {schedule!r}")
    t = t.to(x.dtype).reshape(-1).expand(x.shape[0])[:, None]
    mu = mu.to(x.dtype)
    y = x - t * mu
    s = 1 - 2 * t
    if sigma == 0:
        return mu - 2 * y / s
    if schedule == "constant":
        return mu - 2 * s / (s * s + sigma ** 2) * y
    return mu - (2 - sigma ** 2 / 2) * s / (s * s + sigma ** 2 * t * (1 - t)) * y


def antipodal_irreducible_loss(t: Tensor, d: int, sigma: float, schedule: str = "constant") -> Tensor:
    """tr Cov(u | x_t) for the 180-degree pairing (x0 ~ N(0, I_d), x1 = mu - x0), s = 1 - 2t:

    constant noise: d * 4 sigma^2 / (s^2 + sigma^2);
    bridge:         d * (4 + g'^2 - (g g' - 2 s)^2 / (s^2 + g^2)),
                    with g = sigma sqrt(t(1-t)) and g' = sigma s / (2 sqrt(t(1-t)))
    (0 for sigma = 0 except at t = 1/2)."""
    s = 1 - 2 * t
    if schedule == "constant":
        return d * 4 * sigma ** 2 / (s * s + sigma ** 2)
    if schedule != "bridge":
        raise ValueError(f"schedule must be 'constant' or 'bridge', got {schedule!r}")
    g2 = sigma ** 2 * t * (1 - t)
    dg = sigma * s / (2 * torch.sqrt(t * (1 - t)))
    return d * (4 + dg * dg - (sigma ** 2 * s / 2 - 2 * s) ** 2 / (s * s + g2))


# ----------------------------------------------------------------------------------------------------------------
# Jointly Gaussian couplings
# ----------------------------------------------------------------------------------------------------------------

def _as_tensor(v, d: int | None, dtype, device, name: str, matrix: bool = False) -> Tensor:
    T = torch.as_tensor(v, dtype=dtype, device=device)
    if matrix:
        if T.dim() != 2 or T.shape[0] != T.shape[1] or (d is not None and T.shape[0] != d):
            raise ValueError(f"{name} must be a ({d}, {d}) matrix, got shape {tuple(T.shape)}")
    elif T.dim() != 1 or (d is not None and T.shape[0] != d):
        raise ValueError(f"{name} must be a vector of length {d}, got shape {tuple(T.shape)}")
    return T


class GaussianCoupling:
    """A jointly Gaussian coupling of x0 ~ N(m0, S00) and x1 ~ N(m1, S11) with cross-covariance S01 = Cov(x0, x1).

    Subclasses say how to sample; this class gives the closed forms along any affine path (module docstring):
    :meth:`moments`, :meth:`marginal_field` (E[u_t | x_t]), :meth:`irreducible_loss` (tr Cov(u_t | x_t)) and
    :meth:`field` (the marginal field as a ``net(t, x)`` callable for the solvers). ``sample(n, generator)``
    returns a :class:`~flowprobe.couplings.Pairing`, so a coupling can be passed to ``flowprobe.train.fit``
    (fresh pairs every step: population training).
    """

    #: True for x1 = mu + A x0 (then ``mu`` and ``A`` are set).
    deterministic_linear: bool = False

    def __init__(self, m0: Tensor, S00: Tensor, m1: Tensor, S11: Tensor, S01: Tensor,
                 dtype: torch.dtype = torch.float64, device=None):
        d = torch.as_tensor(m0).shape[0]
        self.d = d
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.m0 = _as_tensor(m0, d, dtype, self.device, "m0")
        self.m1 = _as_tensor(m1, d, dtype, self.device, "m1")
        self.S00 = _as_tensor(S00, d, dtype, self.device, "S00", matrix=True)
        self.S11 = _as_tensor(S11, d, dtype, self.device, "S11", matrix=True)
        self.S01 = _as_tensor(S01, d, dtype, self.device, "S01", matrix=True)
        self._r00 = sqrtm_psd(self.S00)

    # -- sampling -------------------------------------------------------------------------------------------------
    def _source(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.d, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)
        return self.m0 + z @ self._r00.T

    def sample(self, n: int, generator: torch.Generator) -> Pairing:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- closed forms ---------------------------------------------------------------------------------------------
    def moments(self, t: Tensor, path: ProbabilityPath | None = None) -> dict[str, Tensor]:
        """Per-t moments of (x_t, u_t): ``mean_x``, ``mean_u`` (T, d) and ``C_xx``, ``C_ux``, ``C_uu`` (T, d, d),
        with the formulas of the module docstring. ``path`` defaults to the linear path."""
        path = path or LinearPath()
        t = torch.as_tensor(t, dtype=self.dtype, device=self.device).reshape(-1)
        a, b, g = path.a(t), path.b(t), path.g(t)
        da, db, dg = path.da(t), path.db(t), path.dg(t)

        def col(s):
            return s[:, None]

        def mat(s):
            return s[:, None, None]

        S00, S11, S01 = self.S00, self.S11, self.S01
        S10 = S01.T
        eye = torch.eye(self.d, dtype=self.dtype, device=self.device)
        mean_x = col(a) * self.m0 + col(b) * self.m1
        mean_u = col(da) * self.m0 + col(db) * self.m1
        C_xx = mat(a * a) * S00 + mat(b * b) * S11 + mat(a * b) * (S01 + S10) + mat(g * g) * eye
        C_ux = mat(da * a) * S00 + mat(db * b) * S11 + mat(da * b) * S01 + mat(db * a) * S10 + mat(dg * g) * eye
        C_uu = mat(da * da) * S00 + mat(db * db) * S11 + mat(da * db) * (S01 + S10) + mat(dg * dg) * eye
        return {"mean_x": mean_x, "mean_u": mean_u, "C_xx": C_xx, "C_ux": C_ux, "C_uu": C_uu}

    def marginal_field(self, t: Tensor, x: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """E[u_t | x_t = x] = E u_t + C_ux C_xx^{-1} (x - E x_t), batched over t (B,) and x (B, d).

        For a deterministic linear coupling on a deterministic path this is evaluated as the Lemma-1 formula
        (see :func:`linear_coupling_field`), which is exact also where C_xx is ill-conditioned."""
        path = path or LinearPath()
        t = t.to(x.dtype).reshape(-1).expand(x.shape[0])
        if self.deterministic_linear and path.deterministic and isinstance(path, LinearPath):
            return linear_coupling_field(t, x, self.mu, self.A)
        if x.shape[0] > 1 and bool((t == t[0]).all()):  # one time for the whole batch (an ODE step): fast path
            gain, mean_x, mean_u = self._affine_at(float(t[0]), path)
            gain, mean_x, mean_u = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (gain, mean_x, mean_u))
            return mean_u + (x - mean_x) @ gain.T
        m = self.moments(t.to(self.dtype), path)
        gain = torch.linalg.solve_ex(m["C_xx"], m["C_ux"].transpose(-1, -2))[0].transpose(-1, -2)  # C_ux C_xx^{-1}
        out = m["mean_u"] + (gain @ (x.to(self.dtype) - m["mean_x"]).unsqueeze(-1)).squeeze(-1)
        return out.to(x.dtype)

    def _affine_at(self, t: float, path: ProbabilityPath):
        """(C_ux C_xx^{-1}, E x_t, E u_t) at a single time, in numpy float64: the same formulas as :meth:`moments`
        with scalar coefficients (an ODE solver calls the field once per stage with one shared t)."""
        import numpy as np

        if not hasattr(self, "_np"):
            mats = (self.S00, self.S11, self.S01, self.m0, self.m1)
            self._np = tuple(v.detach().cpu().double().numpy() for v in mats)
        S00, S11, S01, m0, m1 = self._np
        tt = torch.tensor([t], dtype=torch.float64)
        a, b, g, da, db, dg = (float(f(tt)[0]) for f in (path.a, path.b, path.g, path.da, path.db, path.dg))
        eye = np.eye(self.d)
        C_xx = a * a * S00 + b * b * S11 + a * b * (S01 + S01.T) + g * g * eye
        C_ux = da * a * S00 + db * b * S11 + da * b * S01 + db * a * S01.T + dg * g * eye
        try:
            gain = np.linalg.solve(C_xx, C_ux.T).T
        except np.linalg.LinAlgError:  # x_t degenerate at this time: the field is not defined
            gain = np.full((self.d, self.d), np.nan)
        return gain, a * m0 + b * m1, da * m0 + db * m1

    def field(self, path: ProbabilityPath | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The marginal field as a callable ``field(t, x)`` (for :func:`flowprobe.solvers.integrate`)."""
        return lambda t, x: self.marginal_field(t, x, path)

    def marginal_score(self, t: Tensor, x: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """grad_x log p_t(x) = -C_xx^{-1} (x - E x_t), the score of the Gaussian marginal of x_t, batched over
        t (B,) and x (B, d). Undefined where C_xx is singular (a deterministic coupling's crossing time)."""
        m = self.moments(t.to(self.dtype).reshape(-1).expand(x.shape[0]), path)
        diff = (x.to(self.dtype) - m["mean_x"]).unsqueeze(-1)
        return (-torch.linalg.solve(m["C_xx"], diff)).squeeze(-1).to(x.dtype)

    def conditional_covariance(self, t: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """Cov(u_t | x_t) = C_uu - C_ux C_xx^+ C_xu, shape (T, d, d). The pseudo-inverse makes the formula exact
        also where x_t is degenerate (e.g. x_t = mu / 2 at t = 1/2 for the 180-degree pairing)."""
        m = self.moments(t, path)
        gain = m["C_ux"] @ torch.linalg.pinv(m["C_xx"], hermitian=True)
        return _sym(m["C_uu"] - gain @ m["C_ux"].transpose(-1, -2))

    def irreducible_loss(self, t: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """L*(t) = E || u_t - E[u_t | x_t] ||^2 = tr Cov(u_t | x_t), the lowest CFM loss any field can reach at
        time t (shape (T,))."""
        return torch.diagonal(self.conditional_covariance(t, path), dim1=-2, dim2=-1).sum(-1).clamp_min(0)

    def describe(self) -> dict:
        return {"coupling": type(self).__name__}


class LinearGaussianCoupling(GaussianCoupling):
    """The deterministic coupling x1 = mu + A x0, x0 ~ N(m0, S0) (default N(0, I)).

    Then x1 ~ N(mu + A m0, A S0 A^T) and Cov(x0, x1) = S0 A^T. Constructors for the paper's cases:
    :meth:`ot` (A = M^{1/2}), :meth:`rotated_ot` (A = M^{1/2} R) and :meth:`antipodal` (A = -I, the
    180-degree pairing whose interpolation lines all cross at t = 1/2).
    """

    deterministic_linear = True

    def __init__(self, mu, A, m0=None, S0=None, dtype: torch.dtype = torch.float64, device=None, name: str = ""):
        mu = _as_tensor(mu, None, dtype, device, "mu")
        d = mu.shape[0]
        A = _as_tensor(A, d, dtype, device, "A", matrix=True)
        m0 = torch.zeros(d, dtype=dtype, device=device) if m0 is None else _as_tensor(m0, d, dtype, device, "m0")
        S0 = torch.eye(d, dtype=dtype, device=device) if S0 is None else _as_tensor(S0, d, dtype, device, "S0", True)
        super().__init__(m0, S0, mu + A @ m0, A @ S0 @ A.T, S0 @ A.T, dtype, device)
        self.mu, self.A = mu.detach().clone(), A.detach().clone()
        self.name = name or "linear"

    @classmethod
    def ot(cls, mu, M, **kw) -> "LinearGaussianCoupling":
        """OT from N(0, I) to N(mu, M): x1 = mu + M^{1/2} x0."""
        M = torch.as_tensor(M, dtype=kw.get("dtype", torch.float64))
        return cls(mu, sqrtm_psd(M), name="ot", **kw)

    @classmethod
    def rotated_ot(cls, mu, M, angle_degrees: float, plane=(0, 1), **kw) -> "LinearGaussianCoupling":
        """Rotated OT x1 = mu + M^{1/2} R x0 with R the rotation by ``angle_degrees`` (R x0 ~ N(0, I), so it still
        pushes N(0, I) to N(mu, M)). 180 degrees in d = 2 with M = I is the antipodal pairing."""
        dtype = kw.get("dtype", torch.float64)
        M = torch.as_tensor(M, dtype=dtype)
        R = rotation_matrix(angle_degrees, M.shape[0], plane, dtype=dtype)
        return cls(mu, sqrtm_psd(M) @ R, name=f"rotation-{angle_degrees:g}", **kw)

    @classmethod
    def antipodal(cls, mu, **kw) -> "LinearGaussianCoupling":
        """The 180-degree pairing x1 = mu - x0 (A = -I): every line (1 - t) x0 + t x1 passes through mu / 2 at
        t = 1/2."""
        mu = torch.as_tensor(mu, dtype=kw.get("dtype", torch.float64))
        return cls(mu, -torch.eye(mu.shape[0], dtype=mu.dtype), name="antipodal", **kw)

    @property
    def Theta(self) -> Tensor:
        """Theta = A - I, the Lemma-1 matrix of the pair field."""
        return self.A - torch.eye(self.d, dtype=self.dtype, device=self.device)

    def pair_map(self, x0: Tensor) -> Tensor:
        """x1 = mu + A x0 (batch-first)."""
        return self.mu.to(x0.dtype) + x0 @ self.A.to(x0.dtype).T

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        """Fresh x0 ~ N(m0, S0) and x1 = mu + A x0; i0 = i1 = position in the draw."""
        x0 = self._source(n, generator)
        idx = torch.arange(n, device=self.device)
        return Pairing(x0, self.pair_map(x0), idx, idx)

    def describe(self) -> dict:
        return {"coupling": "linear_gaussian", "name": self.name, "mu": self.mu.tolist(), "A": self.A.tolist()}


class IndependentGaussianCoupling(GaussianCoupling):
    """x0 ~ N(m0, S0) and x1 ~ N(m1, S1) drawn independently (S01 = 0). Defaults m0 = 0, S0 = I."""

    def __init__(self, m1, S1, m0=None, S0=None, dtype: torch.dtype = torch.float64, device=None):
        m1 = _as_tensor(m1, None, dtype, device, "m1")
        d = m1.shape[0]
        S1 = _as_tensor(S1, d, dtype, device, "S1", matrix=True)
        m0 = torch.zeros(d, dtype=dtype, device=device) if m0 is None else _as_tensor(m0, d, dtype, device, "m0")
        S0 = torch.eye(d, dtype=dtype, device=device) if S0 is None else _as_tensor(S0, d, dtype, device, "S0", True)
        super().__init__(m0, S0, m1, S1, torch.zeros(d, d, dtype=dtype, device=device), dtype, device)
        self._r11 = sqrtm_psd(self.S11)

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        """x0 ~ N(m0, S0) then x1 ~ N(m1, S1), independent; i0 = i1 = position in the draw."""
        x0 = self._source(n, generator)
        z1 = torch.randn(n, self.d, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)
        x1 = self.m1 + z1 @ self._r11.T
        idx = torch.arange(n, device=self.device)
        return Pairing(x0, x1, idx, idx)

    def describe(self) -> dict:
        return {"coupling": "independent_gaussian", "m1": self.m1.tolist(), "S1": self.S11.tolist()}

    # -- the flow of the marginal field, in closed form ---------------------------------------------------------
    def _isotropic_source_variance(self) -> float:
        s0sq = float(self.S00[0, 0])
        if not torch.allclose(self.S00, s0sq * torch.eye(self.d, dtype=self.dtype, device=self.device)):
            raise ValueError("the closed-form flow needs an isotropic source covariance S0 = s0^2 I")
        return s0sq

    def _eigen(self) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "_eig"):
            lam, Q = torch.linalg.eigh(_sym(self.S11))
            self._eig = (lam.clamp_min(0), Q)
        return self._eig

    def average_velocity(self, t: Tensor, x: Tensor, h: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """u*(t, x, h) = (Phi_{t -> t+h}(x) - x) / h, the average velocity over [t, t + h] of the ODE of the marginal
        field (the quantity MeanFlow-type objectives learn); h = 0 gives the marginal field itself.

        With an isotropic source S0 = s0^2 I every C_xx(tau) = (a^2 s0^2 + g^2) I + b^2 S1 and C_ux(tau) are
        functions of S1, so they commute and in the eigenbasis S1 = Q diag(lam) Q^T the flow acts on each axis
        as the increasing affine map between N(m_t, c_k(t)) and N(m_s, c_k(s)), c_k = a^2 s0^2 + g^2 + b^2 lam_k:

            Phi_{t -> s}(x) = m_s + Q diag(sqrt(c(s) / c(t))) Q^T (x - m_t),      m_tau = a m0 + b m1.

        Written in torch, batched over t, h (B,) and x (B, d), and differentiable in all three (for JVPs).
        """
        path = path or LinearPath()
        s0sq = self._isotropic_source_variance()
        lam, Q = self._eigen()
        dt = self.dtype
        t, h, x = t.to(dt).reshape(-1), h.to(dt).reshape(-1), x.to(dt)
        s = t + h

        def coeffs(tau):
            a, b, g = path.a(tau)[:, None], path.b(tau)[:, None], path.g(tau)[:, None]
            return a * self.m0 + b * self.m1, a * a * s0sq + g * g + b * b * lam

        m_t, c_t = coeffs(t)
        m_s, c_s = coeffs(s)
        y = (x - m_t) @ Q  # coordinates in the eigenbasis
        zero = (h == 0)[:, None]
        h_safe = torch.where(zero, torch.ones_like(h[:, None]), h[:, None])
        u_step = (m_s - m_t) / h_safe + ((torch.sqrt(c_s / c_t) - 1) / h_safe * y) @ Q.T
        # h = 0: the marginal field m'_t + Q diag(c'(t) / (2 c(t))) Q^T (x - m_t)
        a, b, g = path.a(t)[:, None], path.b(t)[:, None], path.g(t)[:, None]
        da, db, dg = path.da(t)[:, None], path.db(t)[:, None], path.dg(t)[:, None]
        dm = da * self.m0 + db * self.m1
        dc = 2 * a * da * s0sq + 2 * g * dg + 2 * b * db * lam
        u_zero = dm + (dc / (2 * c_t) * y) @ Q.T
        return torch.where(zero, u_zero, u_step)

    def flow_map(self, t: Tensor, x: Tensor, s: Tensor, path: ProbabilityPath | None = None) -> Tensor:
        """Phi_{t -> s}(x): where the ODE of the marginal field carries x from time t to time s (closed form, see
        :meth:`average_velocity`)."""
        t = t.to(self.dtype).reshape(-1)
        h = s.to(self.dtype).reshape(-1) - t
        return x.to(self.dtype) + h[:, None] * self.average_velocity(t, x, h, path)


# ----------------------------------------------------------------------------------------------------------------
# Loss and gradient variance of the Lemma-1 family, in closed form
# ----------------------------------------------------------------------------------------------------------------

class JointGaussianCoupling(GaussianCoupling):
    """Any jointly Gaussian coupling, given by its moments (m0, S00, m1, S11, S01 = Cov(x0, x1)); draws come from
    the Cholesky factor of the joint covariance. Its closed forms are those of :class:`GaussianCoupling`."""

    def __init__(self, m0, S00, m1, S11, S01, dtype: torch.dtype = torch.float64, device=None, name: str = "joint"):
        d = torch.as_tensor(m0).shape[0]
        super().__init__(m0, S00, m1, S11, S01, dtype, device)
        joint = torch.cat([torch.cat([self.S00, self.S01], 1), torch.cat([self.S01.T, self.S11], 1)], 0)
        self._chol = torch.linalg.cholesky(_sym(joint))
        self._d, self.name = d, name

    def sample(self, n: int, generator: torch.Generator) -> Pairing:
        z = torch.randn(n, 2 * self._d, generator=generator, device=generator.device, dtype=self.dtype).to(self.device)
        xy = z @ self._chol.T
        idx = torch.arange(n, device=self.device)
        return Pairing(self.m0 + xy[:, :self._d], self.m1 + xy[:, self._d:], idx, idx)

    def describe(self) -> dict:
        return {"coupling": "joint_gaussian", "name": self.name}


def gibbs_tilted_coupling(m0, S0, m1, S1, epsilon: float, dtype: torch.dtype = torch.float64,
                          device=None) -> JointGaussianCoupling:
    """The coupling that weighted CFM trains on, for independent Gaussian endpoints: density proportional to
    N(x0; m0, S0) N(x1; m1, S1) exp(-||x0 - x1||^2 / epsilon) (:class:`flowprobe.couplings.WeightedCoupling` over an
    independent coupling). It is Gaussian with precision and mean

        P = [[S0^{-1} + (2/eps) I, -(2/eps) I], [-(2/eps) I, S1^{-1} + (2/eps) I]],
        mu = P^{-1} [S0^{-1} m0; S1^{-1} m1],

    so its marginals are tilted toward each other: neither is N(m0, S0) or N(m1, S1) (eps -> infinity recovers the
    independent coupling)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    m0, m1 = (torch.as_tensor(v, dtype=dtype, device=device) for v in (m0, m1))
    S0, S1 = (torch.as_tensor(v, dtype=dtype, device=device) for v in (S0, S1))
    d = m0.shape[0]
    eye = torch.eye(d, dtype=dtype, device=device)
    k = 2.0 / float(epsilon)
    P0, P1 = torch.linalg.inv(S0), torch.linalg.inv(S1)
    P = torch.cat([torch.cat([P0 + k * eye, -k * eye], 1), torch.cat([-k * eye, P1 + k * eye], 1)], 0)
    cov = _sym(torch.linalg.inv(P))
    mean = cov @ torch.cat([P0 @ m0, P1 @ m1])
    return JointGaussianCoupling(mean[:d], cov[:d, :d], mean[d:], cov[d:, d:], cov[:d, d:], dtype, device,
                                 name=f"gibbs_tilted(eps={float(epsilon):g})")
