"""Closed-form per-sample gradients and gradient moments of the Lemma-1 field on Gaussian couplings: the exact
reference that the gradient-variance probes are checked against."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .gaussian import GaussianCoupling
from .paths import LinearPath, ProbabilityPath

__all__ = ["lemma_one_per_sample_gradients", "lemma_one_gradient_moments"]


def lemma_one_per_sample_gradients(t: Tensor, x_t: Tensor, u_t: Tensor, theta: Tensor, Theta: Tensor):
    """Per-sample gradients of l = ||u_t - v(x_t, t)||^2 for the Lemma-1 field, written out.

    With W = (I + t Theta)^{-1}, y = x_t - t theta and r = u_t - v: dv = W dtheta + W dTheta W y (because
    I - t Theta W = W), so grad_theta l = -2 W^T r and grad_Theta l = -2 (W^T r)(W y)^T. Returns
    (grad_theta (B, d), grad_Theta (B, d, d)). An independent check of autograd-based probes.
    """
    d = theta.shape[0]
    eye = torch.eye(d, dtype=x_t.dtype, device=x_t.device)
    W = torch.linalg.inv(eye + t.to(x_t.dtype)[:, None, None] * Theta.to(x_t.dtype))
    y = x_t - t.to(x_t.dtype)[:, None] * theta.to(x_t.dtype)
    q = (W @ y.unsqueeze(-1)).squeeze(-1)
    r = u_t - (theta.to(x_t.dtype) + q @ Theta.to(x_t.dtype).T)
    p = (W.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    return -2 * p, -2 * p.unsqueeze(-1) * q.unsqueeze(-2)


def _gauss_legendre(lo: float, hi: float, panels: int, order: int, dtype, device) -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(lo, hi, panels + 1)
    half = (edges[1:] - edges[:-1]) / 2
    mid = (edges[1:] + edges[:-1]) / 2
    nodes = (mid[:, None] + half[:, None] * x[None, :]).reshape(-1)
    weights = (half[:, None] * w[None, :]).reshape(-1)
    return (torch.as_tensor(nodes, dtype=dtype, device=device), torch.as_tensor(weights, dtype=dtype, device=device))


def _residual_moments(coupling: GaussianCoupling, path: ProbabilityPath, theta: Tensor, Theta: Tensor, t: Tensor):
    """Means and covariances, at each time of ``t``, of the residual r, p = W^T r and q = W y of the Lemma-1 field
    (see :func:`lemma_one_gradient_moments`): (m_r, m_p, m_q, S_rr, S_pp, S_qq, S_pq)."""
    dt, dev, d = coupling.dtype, coupling.device, coupling.d
    eye = torch.eye(d, dtype=dt, device=dev)
    # xi = (x0, x1, z): mean and covariance
    m_xi = torch.cat([coupling.m0, coupling.m1, torch.zeros(d, dtype=dt, device=dev)])
    Z = torch.zeros(d, d, dtype=dt, device=dev)
    S_xi = torch.cat([torch.cat([coupling.S00, coupling.S01, Z], 1),
                      torch.cat([coupling.S01.T, coupling.S11, Z], 1),
                      torch.cat([Z, Z, eye], 1)], 0)
    def mat(s):
        return s[:, None, None] * eye

    X = torch.cat([mat(path.a(t)), mat(path.b(t)), mat(path.g(t))], dim=2)     # x_t = X xi
    U = torch.cat([mat(path.da(t)), mat(path.db(t)), mat(path.dg(t))], dim=2)  # u_t = U xi
    W = torch.linalg.inv(eye + t[:, None, None] * Theta)
    TW = Theta @ W
    # r = (U - Theta W X) xi - theta + t Theta W theta ;  y = X xi - t theta ;  p = W^T r ;  q = W y
    R_lin = U - TW @ X
    r0 = -theta + t[:, None] * (TW @ theta)
    P_lin, p0 = W.transpose(-1, -2) @ R_lin, (W.transpose(-1, -2) @ r0.unsqueeze(-1)).squeeze(-1)
    Q_lin, q0 = W @ X, -(t[:, None] * (W @ theta))
    m_r = R_lin @ m_xi + r0
    m_p = P_lin @ m_xi + p0
    m_q = Q_lin @ m_xi + q0
    S_rr = R_lin @ S_xi @ R_lin.transpose(-1, -2)
    S_pp = P_lin @ S_xi @ P_lin.transpose(-1, -2)
    S_qq = Q_lin @ S_xi @ Q_lin.transpose(-1, -2)
    S_pq = P_lin @ S_xi @ Q_lin.transpose(-1, -2)
    return m_r, m_p, m_q, S_rr, S_pp, S_qq, S_pq


def _singular_on(Theta: Tensor, lo: float, hi: float) -> bool:
    """Whether I + t Theta is singular for some t in [lo, hi]: a real eigenvalue lambda with 1 + t lambda = 0."""
    ev = torch.linalg.eigvals(Theta)
    real = ev[ev.imag.abs() < 1e-12].real
    return bool(((real < 0) & (-1 / real >= lo) & (-1 / real <= hi)).any()) if real.numel() else False


def lemma_one_gradient_moments(coupling: GaussianCoupling, theta: Tensor, Theta: Tensor,
                               path: ProbabilityPath | None = None,
                               panels: int = 64, order: int = 16) -> dict[str, float]:
    """Closed-form loss and gradient variance of the Lemma-1 field at (theta, Theta), t ~ U(path.time_range).

    Given t, xi = (x0, x1, z) is Gaussian, and r = u_t - v(x_t, t), p = W^T r and q = W y (W = (I + t Theta)^{-1},
    y = x_t - t theta) are affine in xi. With g_theta = -2 p and g_Theta = -2 p q^T
    (:func:`lemma_one_per_sample_gradients`), Isserlis' theorem gives, for each t (m: means, S: covariances),

        E ||r||^2          = ||m_r||^2 + tr S_rr                                          (the loss)
        E ||g_theta||^2    = 4 (||m_p||^2 + tr S_pp)
        E ||g_Theta||_F^2  = 4 (||m_p||^2 ||m_q||^2 + ||m_p||^2 tr S_qq + ||m_q||^2 tr S_pp + 4 m_p^T S_pq m_q
                                + tr S_pp tr S_qq + 2 tr(S_pq S_pq^T))
        E g_theta = -2 m_p,   E g_Theta = -2 (S_pq + m_p m_q^T),

    integrated over t by composite Gauss-Legendre quadrature (``panels`` x ``order`` nodes; exact for the
    polynomial integrands at Theta = 0 and constant noise). Returns ``loss``, ``second_moment`` (E||g||^2),
    ``mean_grad_sq`` (||E g||^2) and ``gv`` = tr Cov(g) = E||g||^2 - ||E g||^2.

    If I + t Theta is singular for some t in the time range (Theta has a real eigenvalue <= -1/t_hi), the
    integrals diverge unless the residual r vanishes identically, which happens only for the pair field of a
    deterministic linear coupling on a noiseless path (theta = mu, Theta = A - I): ``loss`` and ``gv`` are then 0
    for that field and +inf otherwise (``singular`` is True in both cases).
    """
    path = path or LinearPath()
    dt, dev = coupling.dtype, coupling.device
    theta = torch.as_tensor(theta, dtype=dt, device=dev)
    Theta = torch.as_tensor(Theta, dtype=dt, device=dev)
    lo, hi = getattr(path, "time_range", (0.0, 1.0))
    t, w = _gauss_legendre(lo, hi, panels, order, dt, dev)
    w = w / (hi - lo)  # t ~ U(lo, hi)
    T = t.shape[0]
    m_r, m_p, m_q, S_rr, S_pp, S_qq, S_pq = _residual_moments(coupling, path, theta, Theta, t)
    def tr(S):
        return torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)

    loss_t = (m_r.pow(2).sum(-1) + tr(S_rr)).clamp_min(0)  # sums of squares: clamp rounding below 0
    mp2, mq2 = m_p.pow(2).sum(-1), m_q.pow(2).sum(-1)
    g_theta_sq = 4 * (mp2 + tr(S_pp))
    g_Theta_sq = 4 * (mp2 * mq2 + mp2 * tr(S_qq) + mq2 * tr(S_pp)
                      + 4 * (m_p.unsqueeze(-2) @ S_pq @ m_q.unsqueeze(-1)).reshape(T)
                      + tr(S_pp) * tr(S_qq) + 2 * S_pq.pow(2).sum((-1, -2))).clamp_min(0)
    g_theta_sq = g_theta_sq.clamp_min(0)
    mean_g_theta = -2 * (w[:, None] * m_p).sum(0)
    mean_g_Theta = -2 * (w[:, None, None] * (S_pq + m_p.unsqueeze(-1) * m_q.unsqueeze(-2))).sum(0)
    loss = float((w * loss_t).sum())
    second = float((w * (g_theta_sq + g_Theta_sq)).sum())
    mean_sq = float(mean_g_theta.pow(2).sum() + mean_g_Theta.pow(2).sum())
    if _singular_on(Theta, lo, hi):
        # The residual vanishes identically only for the pair field of a deterministic linear coupling on a
        # noiseless path (theta = mu, Theta = A - I); otherwise the t-integrals diverge at the singular time.
        pair_optimal = (coupling.deterministic_linear and path.deterministic
                        and torch.allclose(theta, coupling.mu) and torch.allclose(Theta, coupling.Theta))
        if pair_optimal:
            return {"loss": 0.0, "second_moment": 0.0, "mean_grad_sq": 0.0, "gv": 0.0, "singular": True}
        return {"loss": math.inf, "second_moment": math.inf, "mean_grad_sq": math.nan, "gv": math.inf,
                "singular": True}
    return {"loss": loss, "second_moment": second, "mean_grad_sq": mean_sq, "gv": max(second - mean_sq, 0.0),
            "singular": False}
