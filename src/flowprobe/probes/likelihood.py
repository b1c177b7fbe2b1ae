"""Log-density of samples under a flow, by the instantaneous change of variables; bits per dimension of images.

A velocity field v(t, x) carries the source density p_0 (t = 0) to p_1 (t = 1) along dx/dt = v(t, x), and the
log-density along a trajectory obeys d log p_t(x_t) / dt = -div v(t, x_t) (Chen et al. 2018, FFJORD). Integrating
the augmented ODE

    d/dt [x, l] = [v(t, x), div v(t, x)]

*backward* from (x_1, 0) at t = 1 to t = 0 gives the source point x_0 and l(0) = int_1^0 div v dt, so

    log p_1(x_1) = log p_0(x_0) + l(0) = log p_0(x_0) - int_0^1 div v(t, x_t) dt.

:func:`log_likelihood` solves it with torchdiffeq's adaptive solvers (``dopri5`` by default; fixed-grid methods
with ``steps``). The divergence is

- ``"exact"``: tr(dv/dx) by one vector-Jacobian product per dimension (D backward passes; low dimension);
- ``"hutchinson"``: z^T (dv/dx) z with a probe z, E z z^T = I (Rademacher signs, or standard normal), an
  unbiased estimate of the trace. Each probe z_k is drawn once and kept along the whole trajectory (FFJORD), so
  each of the ``n_probes`` augmented coordinates l_k is an unbiased estimate of the integral; the K estimates
  share one solve of x (the trajectory does not depend on the probes) and are independent given it. The result
  holds all K estimates, their mean (the per-sample log-likelihood) and its standard error sd_k / sqrt(K).

Conventions are those of FAIR's ``flow_matching.solver.ODESolver.compute_likelihood`` (same augmented ODE, same
time direction, same sign), which the tests check value for value; a Rademacher probe is drawn as the sign of a
standard normal draw, as there, so one probe from the same seed gives the same estimate.

Bits per dimension of 8-bit images (pixels p in {0..255}, uniform dequantisation y = p + u, u ~ U[0, 1)^D, and
model space x = y / s - 1, s = 127.5 as flowprobe's pixel scaling p / 127.5 - 1): the density of y is
p_y(y) = p_x(x) |dx/dy| = p_x(x) s^{-D}, and -E_u log2 p_y(p + u) bounds the discrete -log2 P(p) from above
(Jensen), so

    bpd = -log p_x(x) / (D ln 2) + log2(s)          (s = 127.5: + 6.994; s = 128: + 7, score_sde's offset)

(:func:`bits_per_dim`, :func:`dequantize`). With s = 128 (x = (p + u) / 128 - 1 in [-1, 1)) this is the convention
of score_sde and of the original rectified-flow code (their ``offset = 7``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["log_likelihood", "Likelihood", "exact_divergence", "hutchinson_divergence", "draw_probes",
           "standard_normal_log_prob", "gaussian_log_prob", "bits_per_dim", "dequantize", "on_pixel_grid",
           "DIVERGENCES", "PROBES", "ADAPTIVE_METHODS", "FIXED_METHODS", "PIXEL_SCALE"]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
#: torchdiffeq's adaptive methods (``rtol`` / ``atol``) and the fixed-grid ones (``steps``) accepted here
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "rk4")
#: flowprobe's pixel scaling: x = p / 127.5 - 1
PIXEL_SCALE = 127.5


def gaussian_log_prob(x: Tensor, std: float = 1.0, mean: Tensor | float = 0.0) -> Tensor:
    """log N(x; mean, std^2 I) per sample over all non-batch dimensions:
    -||x - mean||^2 / (2 std^2) - (D / 2) log(2 pi std^2), shape (N,)."""
    d = x[0].numel()
    sq = (x - mean).reshape(x.shape[0], -1).pow(2).sum(1)
    return -0.5 * sq / std ** 2 - 0.5 * d * math.log(2 * math.pi * std ** 2)


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """log N(x; 0, I) per sample (flowprobe's image source and default source), shape (N,)."""
    return gaussian_log_prob(x)


def draw_probes(shape: tuple[int, ...], n_probes: int, kind: str = "rademacher",
                generator: torch.Generator | None = None, dtype=torch.float32, device=None) -> Tensor:
    """(n_probes, *shape) probes with E z z^T = I: ``rademacher`` signs (the sign of a standard normal draw, as
    flow_matching draws them) or ``gaussian`` N(0, I)."""
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
    z = torch.randn((n_probes, *shape), generator=generator, dtype=dtype,
                    device=device if generator is None else generator.device).to(device)
    return z if kind == "gaussian" else (z < 0).to(dtype) * 2 - 1


def _vjp(v: Tensor, x: Tensor, w: Tensor, retain: bool) -> Tensor:
    """w^T dv/dx, zeros where v does not depend on x."""
    if not v.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(v, x, grad_outputs=w, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """div v = sum_i d v_i / d x_i per sample, shape (N,), by one vector-Jacobian product per dimension.
    ``v = net(t, x)`` must have been computed from ``x`` (requires_grad) with samples independent of each other."""
    n, d = x.shape[0], x[0].numel()
    flat = torch.zeros(n, d, dtype=x.dtype, device=x.device)
    div = torch.zeros(n, dtype=x.dtype, device=x.device)
    for i in range(d):
        flat.zero_()
        flat[:, i] = 1
        g = _vjp(v, x, flat.view_as(x), retain=i < d - 1)
        div = div + g.reshape(n, d)[:, i]
    return div


def hutchinson_divergence(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """z_k^T (dv/dx) z_k per probe and sample, shape (K, N), for probes (K, N, ...) with E z z^T = I: each row
    is an unbiased estimate of div v."""
    k = probes.shape[0]
    out = [(_vjp(v, x, probes[j], retain=j < k - 1) * probes[j]).reshape(x.shape[0], -1).sum(1) for j in range(k)]
    return torch.stack(out)


@dataclass
class Likelihood:
    """Per-sample log p_1(x_1) in nats and how it was obtained.

    ``log_prob`` (N,): the log-likelihood (Hutchinson: the mean of the K estimates); ``draws`` (K, N): the K
    independent Hutchinson estimates (None for the exact divergence); ``stderr`` (N,): their standard error
    sd / sqrt(K) (None for exact or K = 1); ``source_log_prob`` (N,): log p_0(x_0); ``divergence_integral`` (N,):
    int_0^1 div v dt (mean over probes), so log_prob = source_log_prob - divergence_integral; ``x0``: the source
    points reached; ``nfe``: evaluations of the net."""

    log_prob: Tensor
    draws: Tensor | None
    stderr: Tensor | None
    source_log_prob: Tensor
    divergence_integral: Tensor
    x0: Tensor
    nfe: int
    divergence: str
    probe: str | None
    n_probes: int
    method: str
    rtol: float
    atol: float
    steps: int | None = None

    @property
    def dim(self) -> int:
        return int(self.x0[0].numel())

    def summary(self) -> dict:
        """Mean log-likelihood over samples with its standard error (sd over samples / sqrt(N); for Hutchinson
        this includes the probe noise, each sample's estimate being independent) and the solver settings."""
        n = self.log_prob.shape[0]
        lp = self.log_prob.double()
        se = float(lp.std() / math.sqrt(n)) if n > 1 else float("nan")
        out = {"n": n, "dim": self.dim, "mean_log_likelihood": float(lp.mean()), "stderr": se,
               "divergence": self.divergence, "method": self.method, "nfe": self.nfe}
        if self.steps is None:
            out.update(rtol=self.rtol, atol=self.atol)
        else:
            out["steps"] = self.steps
        if self.divergence == "hutchinson":
            out.update(probe=self.probe, n_probes=self.n_probes)
            if self.stderr is not None:  # the probes' share of the uncertainty of the mean: sqrt(sum se_i^2) / N
                out["mean_probe_stderr"] = float(self.stderr.double().mean())
                out["probe_stderr_of_mean"] = float(self.stderr.double().pow(2).sum().sqrt() / n)
        return out


def _check(divergence: str, probe: str, n_probes: int, method: str, steps: int | None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    if not (isinstance(n_probes, int) and n_probes >= 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if method not in ADAPTIVE_METHODS + FIXED_METHODS:
        raise ValueError(f"method must be one of {ADAPTIVE_METHODS + FIXED_METHODS}, got {method!r}")
    if method in FIXED_METHODS and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"method {method}: a fixed-grid method needs steps >= 1")


def _solve_batch(net, x1: Tensor, probes: Tensor | None, method: str, rtol: float, atol: float,
                 steps: int | None) -> tuple[Tensor, Tensor, int]:
    """(x0, l(0), nfe) of the augmented ODE from t = 1 to t = 0 for one batch; l has shape (N,) or (K, N)."""
    from torchdiffeq import odeint

    n = x1.shape[0]
    nfe = 0

    def dynamics(t, state):
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            v = net(t.to(x.dtype).expand(n), x)
            div = exact_divergence(v, x) if probes is None else hutchinson_divergence(v, x, probes)
        return v.detach(), div.detach()

    l0 = x1.new_zeros((n,) if probes is None else (probes.shape[0], n))
    times = torch.tensor([1.0, 0.0], dtype=torch.float64 if x1.dtype == torch.float64 else torch.float32,
                         device=x1.device)
    options = {} if steps is None else {"step_size": 1.0 / steps}
    xs, ls = odeint(dynamics, (x1, l0), times, method=method, rtol=rtol, atol=atol, options=options)
    return xs[-1], ls[-1], nfe


@torch.no_grad()
def log_likelihood(net: Callable[[Tensor, Tensor], Tensor], x1: Tensor,
                   source_log_prob: Callable[[Tensor], Tensor] | None = None, *, divergence: str = "exact",
                   probe: str = "rademacher", n_probes: int = 1, method: str = "dopri5", rtol: float = 1e-5,
                   atol: float = 1e-5, steps: int | None = None, generator: torch.Generator | None = None,
                   batch_size: int | None = None) -> Likelihood:
    """log p_1(x1) per sample under the flow of ``net(t, x)`` from the source density ``source_log_prob`` (default
    N(0, I)), by the augmented ODE of the module docstring solved from t = 1 to t = 0.

    ``x1``: (N, D) vectors or (N, C, H, W) images, in the net's dtype (float64 for tight tolerances).
    ``divergence``: "exact" (D backward passes per evaluation) or "hutchinson" with ``n_probes`` probes of kind
    ``probe`` ("rademacher" or "gaussian") drawn from ``generator``, fixed along each trajectory. ``method``: an
    adaptive torchdiffeq method with ``rtol`` / ``atol``, or euler / midpoint / rk4 with ``steps`` uniform steps.
    ``batch_size``: samples per solve (default all; each batch is its own adaptive solve). The net's parameters
    get no gradient and the returned tensors carry no graph; the net's train/eval mode is left as it is.
    A few-step net ``net(t, x, h)`` is called without h, i.e. h = 0: its instantaneous velocity."""
    _check(divergence, probe, n_probes, method, steps)
    source_log_prob = source_log_prob or standard_normal_log_prob
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must be a non-empty batch (N, ...), got shape {tuple(x1.shape)}")
    bs = batch_size or x1.shape[0]
    x0s, ls, nfe = [], [], 0
    for start in range(0, x1.shape[0], bs):
        xb = x1[start:start + bs]
        probes = None
        if divergence == "hutchinson":
            probes = draw_probes(tuple(xb.shape), n_probes, probe, generator, xb.dtype, xb.device)
        x0, l0, k = _solve_batch(net, xb, probes, method, rtol, atol, steps)
        x0s.append(x0)
        ls.append(l0)
        nfe += k
    x0 = torch.cat(x0s)
    logdet = torch.cat(ls, dim=-1)  # l(0) = int_1^0 div v dt
    src = source_log_prob(x0).to(x0.dtype)
    if divergence == "exact":
        return Likelihood(src + logdet, None, None, src, -logdet, x0, nfe, divergence, None, 0, method, rtol, atol,
                          steps)
    draws = src[None] + logdet
    stderr = draws.std(0) / math.sqrt(n_probes) if n_probes > 1 else None
    return Likelihood(draws.mean(0), draws, stderr, src, -logdet.mean(0), x0, nfe, divergence, probe, n_probes,
                      method, rtol, atol, steps)


def on_pixel_grid(x: Tensor, scale: float = PIXEL_SCALE, tol: float = 1e-4) -> bool:
    """True when every value of x is p / scale - 1 for an integer pixel p in {0..255} (8-bit images in model
    space, as :func:`flowprobe.data.arrays.load_data` makes them)."""
    p = (x + 1) * scale
    return bool(((p - p.round()).abs() <= tol * scale).all() and p.min() >= -0.5 and p.max() <= 255.5)


def dequantize(x: Tensor, generator: torch.Generator | None = None, scale: float = PIXEL_SCALE) -> Tensor:
    """Uniform dequantisation in model space: the pixels p = round((x + 1) scale) of 8-bit images x = p / scale - 1
    become x' = (p + u) / scale - 1 with u ~ U[0, 1) per value (drawn from ``generator``)."""
    p = ((x + 1) * scale).round().clamp(0, 255)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                   device=x.device if generator is None else generator.device).to(x.device)
    return (p + u) / scale - 1


def bits_per_dim(log_prob: Tensor, dim: int, scale: float = PIXEL_SCALE) -> Tensor:
    """Bits per dimension of dequantised 8-bit images from their model-space log-density (nats):

        bpd = -log p_x(x) / (D ln 2) + log2(scale),

    for x = (p + u) / scale - 1 (:func:`dequantize`): p_y(y) = p_x(x) scale^{-D} for y = p + u in pixel units, and
    -log2 p_y / D is the usual bits per (256-level) dimension, an upper bound on the discrete -log2 P(p) / D once
    averaged over u. scale = 127.5 is flowprobe's pixel scaling; 128 gives score_sde's / rectified flow's + 7."""
    return -log_prob / (dim * math.log(2)) + math.log2(scale)
