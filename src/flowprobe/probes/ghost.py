"""Exact per-sample gradient norms without per-sample gradients ("ghost norms").

For a linear map out = W a + b applied at T positions (T = 1 for an MLP layer, T = tokens for a Linear on
a sequence, T = output pixels for a convolution after im2col), sample i has activations A_i (T x d_in) and
output gradients B_i = d l_i / d out_i (T x d_out), and its weight gradient is g_i^W = B_i^T A_i. So

    ||g_i^W||_F^2 = sum_{s,t} (A_i A_i^T)_{st} (B_i B_i^T)_{st}        ("Gram" form, cost T^2 (d_in + d_out))
                  = ||B_i^T A_i||_F^2                                  (materialised, cost T d_in d_out)

whichever is cheaper, and g_i^W . G = sum_t B_i[t] . (G A_i[t]) for any matrix G (the mean gradient, for
the standard error). The bias gradient is g_i^b = sum_t B_i[t]. nn.Linear uses these formulas. For
convolutions the T positions are the output pixels after im2col; rather than copying the im2col matrix,
the per-sample weight gradients B_i^T A_i are materialised by the convolution weight-gradient kernel run
once over all samples as a grouped convolution (groups = samples x conv groups): the same work as the
weight gradient of an ordinary backward pass, sub-batched so memory stays bounded. The alternative rule
``conv_rule="unfold"`` copies the im2col rows instead and treats the convolution as the Linear above
(batched matmuls, Gram form when cheaper); which is faster depends on the hardware and the layer's shape,
so ``conv_rule="auto"`` times both once per layer shape (the first time it meets it) and keeps the faster,
as cuDNN's autotuner does for convolution algorithms (:func:`conv_rule_choices` lists the choices).
GroupNorm / LayerNorm affine parameters have per-sample gradients sum over positions of B_i * xhat_i
(weight) and B_i (bias), with xhat the normalised input; these are small and materialised.

A and B come from a forward hook (the module input) and a hook on the module output's gradient, in one
backward pass of the **summed** loss sum_i l_i, so the output gradient of sample i is exactly
d l_i / d out_i (a mean would scale it by 1/n). This needs every sample's output to depend only on its
own input (true in eval mode; BatchNorm in train mode breaks it). A module called several times in one
forward gets its positions concatenated (weights) or its per-sample gradients summed (norms).

Covered: nn.Linear, nn.Conv1d, nn.Conv2d (zero padding), nn.GroupNorm, nn.LayerNorm. The parameters of
any other module (and shared parameters) are computed with the exact ``torch.func`` per-sample method; a
warning names those module types.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..objectives import squared_error
from .per_sample import batch_gradient, chunks, vmap_grads

__all__ = ["run_ghost", "ghost_plan", "GHOST_TYPES", "CONV_RULES", "conv_rule_choices", "reset_conv_rule_choices"]

GHOST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
#: How per-sample convolution weight gradients are formed (see :func:`run_ghost`); "auto" times the others.
CONV_RULES = ("grouped", "unfold", "auto")
#: The rules "auto" chooses from, and its choices so far: {layer-shape key: rule}.
_TIMED_RULES = ("grouped", "unfold")
_CHOICES: dict[tuple, str] = {}
#: Elements of the largest temporary a ghost computation builds at once (per module, per sub-batch).
_BUDGET = 1 << 26


def _conv_padding(module) -> tuple[int, ...] | None:
    """Explicit symmetric zero padding of a conv module, or None when the ghost rule does not apply."""
    if module.padding_mode != "zeros":
        return None
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * len(module.kernel_size)
        out = []
        for k, d in zip(module.kernel_size, module.dilation):  # "same"
            if (d * (k - 1)) % 2:
                return None
            out.append(d * (k - 1) // 2)
        return tuple(out)
    return tuple(pad)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_padding(module) is not None
    return isinstance(module, GHOST_TYPES)


def ghost_plan(net: nn.Module, params: list[tuple[str, nn.Parameter]]):
    """Which parameters get ghost norms: returns ([(module, {"weight"|"bias": param name})],
    fallback param names, sorted fallback module type names)."""
    pid = {id(p): name for name, p in params}
    owners: dict[int, int] = {}
    for mod in net.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    covered, fallback, types = [], [], set()
    for mod in net.modules():
        own = [(k, p) for k, p in mod.named_parameters(recurse=False) if id(p) in pid]
        if not own:
            continue
        ok = _supported(mod) and all(k in ("weight", "bias") and owners[id(p)] == 1 for k, p in own)
        if ok:
            covered.append((mod, {k: pid[id(p)] for k, p in own}))
        else:
            fallback += [pid[id(p)] for _, p in own]
            types.add(type(mod).__name__)
    order = {name: k for k, (name, _) in enumerate(params)}
    fallback.sort(key=order.__getitem__)
    return covered, fallback, sorted(types)


class _Recorder:
    """Forward hooks that keep each covered module's input and register a hook for its output gradient."""

    def __init__(self, modules):
        self.active = False
        self.acts: dict[nn.Module, list[Tensor]] = {m: [] for m in modules}
        self.grads: dict[nn.Module, dict[int, Tensor]] = {m: {} for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if not self.active:
            return
        k = len(self.acts[module])
        self.acts[module].append(inputs[0].detach())
        if isinstance(output, Tensor) and output.requires_grad:
            def keep(g, module=module, k=k):
                self.grads[module][k] = g.detach()
            output.register_hook(keep)

    def clear(self):
        for m in self.acts:
            self.acts[m].clear()
            self.grads[m].clear()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.clear()


def _weight_sq_dot(A: Tensor, B: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ||B_i^T A_i||_F^2 and <B_i^T A_i, ref> summed over G groups.

    A: (m, G, T, Din), B: (m, G, T, Dout), ref: (G, Dout, Din). Returns two (m,) tensors.
    """
    T, Din, Dout = A.shape[2], A.shape[3], B.shape[3]
    if T == 1:
        a, b = A[:, :, 0], B[:, :, 0]
        sq = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sum(1)
        dot = torch.einsum("mgo,goi,mgi->m", b, ref, a)
    elif T * T * (Din + Dout) < T * Din * Dout:
        sq = ((A @ A.transpose(-1, -2)) * (B @ B.transpose(-1, -2))).sum((1, 2, 3))
        dot = (B * (A @ ref.transpose(-1, -2))).sum((1, 2, 3))
    else:
        per = B.transpose(-1, -2) @ A  # (m, G, Dout, Din): the per-sample weight gradients
        sq = per.pow(2).sum((1, 2, 3))
        dot = (per * ref).sum((1, 2, 3))
    return sq, dot


def _sub_batches(m: int, per_sample: int):
    step = max(1, _BUDGET // max(1, per_sample))
    for a in range(0, m, step):
        yield slice(a, min(m, a + step))


def _module_sq_dot(mod: nn.Module, acts: list[Tensor], grads: dict[int, Tensor], names: dict[str, str],
                   ref: dict[str, Tensor], conv_rule: str = "grouped") -> dict[str, tuple[Tensor, Tensor]]:
    """{param name: (per-sample squared norms (m,), per-sample dots with ref (m,))} for one module."""
    calls = [(a, grads[k]) for k, a in enumerate(acts) if k in grads]
    m = acts[0].shape[0]
    dev = acts[0].device
    out = {}
    if not calls:  # the module's output did not reach the loss: zero gradients
        return {name: (torch.zeros(m, device=dev), torch.zeros(m, device=dev)) for name in names.values()}
    dtype = calls[0][1].dtype

    if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
        gw = gb = None
        for a, b in calls:
            a = a.to(dtype)
            if isinstance(mod, nn.GroupNorm):
                xhat = F.group_norm(a, mod.num_groups, eps=mod.eps)
                pw, pb = (b * xhat).reshape(m, mod.num_channels, -1).sum(2), b.reshape(m, mod.num_channels, -1).sum(2)
            else:
                ns = tuple(mod.normalized_shape)
                xhat = F.layer_norm(a, ns, eps=mod.eps)
                pw, pb = (b * xhat).reshape(m, -1, *ns).sum(1), b.reshape(m, -1, *ns).sum(1)
            gw = pw if gw is None else gw + pw
            gb = pb if gb is None else gb + pb
        for key, g in (("weight", gw), ("bias", gb)):
            if key in names:
                g = g.flatten(1)
                r = ref[names[key]].to(g.dtype).flatten()
                out[names[key]] = (g.pow(2).sum(1), g @ r)
        return out

    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if conv_rule == "auto":
            conv_rule = _tuned_rule(mod, calls, names, ref, m, dtype)
        return _CONV_FNS[conv_rule](mod, calls, names, ref, m, dtype)
    return _linear_sq_dot(mod, calls, names, ref, m, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _rule_key(mod, calls, names, m, dtype) -> tuple:
    """What the speed of a convolution rule depends on: the layer's hyper-parameters, the shapes of its
    inputs and output gradients (all calls), the sub-batch, dtype and device."""
    return (type(mod).__name__, tuple(mod.weight.shape), tuple(mod.stride), _conv_padding(mod), tuple(mod.dilation),
            mod.groups, tuple((tuple(a.shape[1:]), tuple(b.shape[1:])) for a, b in calls), m, tuple(sorted(names)),
            str(dtype), str(calls[0][0].device))


def _tuned_rule(mod, calls, names, ref, m, dtype, repeat: int = 2) -> str:
    """The faster of :data:`_TIMED_RULES` for this layer shape: each rule is run once to warm up (cuDNN
    autotuning, allocator), then timed ``repeat`` times (best of); the choice is cached for the process."""
    key = _rule_key(mod, calls, names, m, dtype)
    rule = _CHOICES.get(key)
    if rule is None:
        dev = calls[0][0].device
        best = {}
        for r in _TIMED_RULES:
            _CONV_FNS[r](mod, calls, names, ref, m, dtype)
            for _ in range(repeat):
                _sync(dev)
                start = time.perf_counter()
                _CONV_FNS[r](mod, calls, names, ref, m, dtype)
                _sync(dev)
                best[r] = min(best.get(r, float("inf")), time.perf_counter() - start)
        rule = _CHOICES[key] = min(best, key=best.get)
    return rule


def conv_rule_choices() -> dict[str, str]:
    """The rules ``conv_rule="auto"`` has chosen so far in this process, {description of the layer shape: rule}."""
    out = {}
    for key, rule in _CHOICES.items():
        kind, w, stride, pad, dil, groups, shapes, m, names, dtype, dev = key
        out[f"{kind} w{list(w)} s{list(stride)} p{list(pad)} d{list(dil)} g{groups} in{[list(a) for a, _ in shapes]} "
            f"x{m} {'+'.join(names)} {dtype} {dev}"] = rule
    return out


def reset_conv_rule_choices() -> None:
    """Forget the choices of ``conv_rule="auto"`` (the next pass times the rules again)."""
    _CHOICES.clear()


def _rows_sq_dot(layouts, wref: Tensor, m: int, per_sample: int) -> tuple[Tensor, Tensor]:
    """Per-sample ||g_i^W||^2 and g_i^W . ref of a weight used as a matrix over T positions: ``layouts(rows)``
    gives the (k, G, T, d_in) activations and (k, G, T, d_out) output gradients of those rows (all calls
    concatenated along T); sub-batched so one sub-batch's temporaries stay near ``_BUDGET`` elements."""
    sq, dot = [], []
    for rows in _sub_batches(m, per_sample):
        s_, d_ = _weight_sq_dot(*layouts(rows), wref)
        sq.append(s_)
        dot.append(d_)
    return torch.cat(sq), torch.cat(dot)


def _bias_sq_dot(gb: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """(m, d_out) per-sample bias gradients -> their squared norms and dots with ``ref``."""
    return gb.pow(2).sum(1), gb @ ref.to(gb.dtype).flatten()


def _conv_bias(calls, names, ref, m, out) -> dict:
    """Adds the per-sample bias terms of a convolution (sum of output gradients over positions) to ``out``."""
    if "bias" in names:
        gb = sum(b.reshape(m, b.shape[1], -1).sum(2) for _, b in calls)
        out[names["bias"]] = _bias_sq_dot(gb, ref[names["bias"]])
    return out


def _linear_sq_dot(mod: nn.Linear, calls, names, ref, m, dtype):
    """nn.Linear on inputs (m, ..., d_in): the T positions are all middle dimensions; several calls are
    concatenated along T. Gram or materialised form, whichever is cheaper (see _weight_sq_dot)."""
    out = {}
    d_in, d_out = mod.in_features, mod.out_features
    T = sum(a[0].numel() // d_in for a, _ in calls)
    if "weight" in names:
        def layouts(rows):
            return (torch.cat([a[rows].to(dtype).reshape(-1, 1, a[0].numel() // d_in, d_in) for a, _ in calls], 2),
                    torch.cat([b[rows].reshape(-1, 1, b[0].numel() // d_out, d_out) for _, b in calls], 2))

        wref = ref[names["weight"]].to(dtype).reshape(1, d_out, d_in)
        per_sample = T * (d_in + d_out) + min(2 * T * T, d_out * d_in) + T * d_out
        out[names["weight"]] = _rows_sq_dot(layouts, wref, m, per_sample)
    if "bias" in names:
        gb = sum(b.reshape(m, -1, d_out).sum(1) for _, b in calls)
        out[names["bias"]] = _bias_sq_dot(gb, ref[names["bias"]])
    return out


def _conv_sq_dot(mod, calls, names, ref, m, dtype):
    """nn.Conv1d / nn.Conv2d: per-sample weight gradients materialised with the convolution weight-gradient
    kernel, all samples at once as one grouped convolution (groups = samples x module groups): no im2col
    copy, and the same work as the weight gradient of an ordinary backward pass. Sub-batched by memory."""
    from torch.nn.grad import conv1d_weight, conv2d_weight

    out = {}
    conv_weight = conv1d_weight if isinstance(mod, nn.Conv1d) else conv2d_weight
    pad = _conv_padding(mod)
    w_shape = tuple(mod.weight.shape)
    if "weight" in names:
        wref = ref[names["weight"]].to(dtype).flatten()
        per_sample = mod.weight.numel() + sum(a[0].numel() + b[0].numel() for a, b in calls)
        sq, dot = [], []
        for rows in _sub_batches(m, per_sample):
            per = None
            for a, b in calls:
                a, b = a[rows].to(dtype), b[rows]
                k = a.shape[0]
                g = conv_weight(a.reshape(1, -1, *a.shape[2:]), (k * w_shape[0], *w_shape[1:]),
                                b.reshape(1, -1, *b.shape[2:]), stride=mod.stride, padding=pad,
                                dilation=mod.dilation, groups=k * mod.groups).reshape(k, -1)
                per = g if per is None else per + g
            sq.append(per.pow(2).sum(1))
            dot.append(per @ wref)
        out[names["weight"]] = (torch.cat(sq), torch.cat(dot))
    return _conv_bias(calls, names, ref, m, out)


def _im2col(mod, a: Tensor) -> Tensor:
    """(k, C_in, *spatial) -> (k, groups, L, C_in/groups * prod(kernel)): the im2col rows of each output
    position, split by convolution group (F.unfold orders columns channel-major, like weight.flatten(1))."""
    pad = _conv_padding(mod)
    ks, dil, st = mod.kernel_size, mod.dilation, mod.stride
    if isinstance(mod, nn.Conv1d):  # as a 2-D convolution of height 1
        a, ks, dil, pad, st = a.unsqueeze(2), (1, *ks), (1, *dil), (0, *pad), (1, *st)
    cols = F.unfold(a, ks, dilation=dil, padding=pad, stride=st)  # (k, C_in * prod(kernel), L)
    k, _, L = cols.shape
    return cols.reshape(k, mod.groups, -1, L).transpose(2, 3)


def _conv_unfold_sq_dot(mod, calls, names, ref, m, dtype):
    """nn.Conv1d / nn.Conv2d as a Linear over output positions: im2col copies of the inputs (T = output
    positions, d_in = C_in/groups * prod(kernel) per group), then :func:`_weight_sq_dot` (batched matmuls;
    Gram form when cheaper). More memory traffic than the grouped-convolution rule, but dense matmuls."""
    out = {}
    G, c_out = mod.groups, mod.out_channels
    if "weight" in names:
        def layouts(rows):
            return (torch.cat([_im2col(mod, a[rows].to(dtype)) for a, _ in calls], 2),
                    torch.cat([b[rows].reshape(-1, G, c_out // G, b[0][0].numel()).transpose(2, 3)
                               for _, b in calls], 2))

        wref = ref[names["weight"]].to(dtype).reshape(G, c_out // G, -1)
        d_in = wref.shape[-1]
        T = sum(b[0].numel() // c_out for _, b in calls)
        per_sample = T * (d_in * G + c_out) + min(2 * T * T * G, c_out * d_in) + T * c_out
        out[names["weight"]] = _rows_sq_dot(layouts, wref, m, per_sample)
    return _conv_bias(calls, names, ref, m, out)


_CONV_FNS = {"grouped": _conv_sq_dot, "unfold": _conv_unfold_sq_dot}


def run_ghost(net, params, t, x, u, reduction, chunk_size, mom, conv_rule: str = "auto") -> tuple[Tensor, list[str]]:
    """The ghost-norm pass of :func:`flowprobe.probes.grad_stats.per_sample_grad_stats`.

    Per chunk: one forward and one backward of sum_i l_i with hooks give sum_i g_i (the ordinary batch
    gradient) and, per covered parameter, ||g_i||^2 and g_i . g_ref; fallback parameters go through
    ``torch.func``. g_ref (the mean gradient, for the SE) comes from the same pass when the n samples fit
    in one chunk, else from one ordinary chunked backward pass first. ``conv_rule`` (one of
    ``CONV_RULES``): per-sample convolution weight gradients by one grouped convolution ("grouped"), by
    im2col and batched matmuls ("unfold"), or by whichever of the two is faster for each layer shape, timed
    the first time the shape is met ("auto"); the numbers agree, the speed depends on the hardware.
    Returns (losses, fallback types).
    """
    if conv_rule not in CONV_RULES:
        raise ValueError(f"conv_rule must be one of {CONV_RULES}, got {conv_rule!r}")
    n = x.shape[0]
    covered, fallback, types = ghost_plan(net, params)
    if fallback:
        warnings.warn(f"ghost norms do not cover module types {types}; their {len(fallback)} parameter tensors "
                      "use the exact per-sample (torch.func) method", stacklevel=3)
    single = n <= chunk_size
    losses = None
    if not single:
        sums, losses = batch_gradient(net, params, t, x, u, reduction, chunk_size)
        mom.ref = {nm: s / n for nm, s in sums.items()}
    col = {nm: k for k, nm in enumerate(mom.pnames)}
    by_name = dict(params)
    plist = [p for _, p in params]
    rec = _Recorder([mod for mod, _ in covered])
    chunk_losses = []
    try:
        for a, b in chunks(n, chunk_size):
            rec.clear()
            rec.active = True
            try:
                l = squared_error(net(t[a:b], x[a:b]), u[a:b], reduction)
                grads = torch.autograd.grad(l.sum(), plist, allow_unused=True)
            finally:
                rec.active = False
            chunk_losses.append(l.detach())
            for (nm, p), g in zip(params, grads):
                mom.add_sum(nm, torch.zeros_like(p) if g is None else g)
            if single:
                mom.ref = {nm: s / n for nm, s in mom.sums.items()}
            m = b - a
            # filled on the device and copied to the host once per chunk: a copy per module would
            # synchronise with the GPU ~2x per layer and serialise kernel launches with execution
            sq = torch.zeros(m, len(params), dtype=torch.float64, device=x.device)
            dot = torch.zeros(m, len(params), dtype=torch.float64, device=x.device)
            for mod, names in covered:
                for nm, (s, d) in _module_sq_dot(mod, rec.acts[mod], rec.grads[mod], names, mom.ref,
                                                       conv_rule).items():
                    sq[:, col[nm]] = s.double()
                    dot[:, col[nm]] = d.double()
            rec.clear()
            if fallback:
                fg = vmap_grads(net, fallback, by_name, t[a:b], x[a:b], u[a:b], reduction)
                for nm in fallback:
                    g = fg[nm].reshape(fg[nm].shape[0], -1).double()  # 0-dim parameters too
                    sq[:, col[nm]] = g.pow(2).sum(1)
                    dot[:, col[nm]] = g @ mom.ref[nm].flatten().to(g.device)
            mom.add_norms(sq, dot)
    finally:
        rec.remove()
    return (torch.cat(chunk_losses) if losses is None else losses), types
