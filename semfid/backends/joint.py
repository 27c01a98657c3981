"""The ops over long and joint key sets (SD3 / Flux joint attention, PixArt cross-attention).

Built on one attention primitive with lse (:mod:`semfid.backends.primitives`: ``attend`` /
``attend_backward``, blocked over queries and keys), so nothing [B, H, N, M] exists at any time.

Maps from lse. A selected column of the softmax is ``A[i, s] = exp(q_i·k_sel(s)·scale +
bias_sel(s) − lse_i)``: once lse is known the maps cost a [Nm, S] product over the map queries.

The split log-sum-exp of the subject op (DESIGN.md §9). Let O be the keys outside the segment,
T the segment ``k[:, :, seg_start:seg_stop]`` and R the reference keys ``k_ref``::

    (o_O, L_O) = attend(q, k_O, v_O)        (o_T, L_T) = attend(q, k_T, v_T)
    lse_t = logaddexp(L_O, L_T)             out = o_O·e^(L_O − lse_t) + o_T·e^(L_T − lse_t)
    L_R   = logsumexp(q k_refᵀ·scale + ref_bias)   (map queries only: a [Nm, M_ref] product)
    lse_r = logaddexp(L_O, L_R)

The keys outside the segment are read once, and the two attend calls split the keys of one
attention: the reference costs only its own keys. Temporaries of the small products: the maps
[B, H, Nm, S], and the reference's logsumexp in query chunks of ``LSE_BLOCK_ELEMENTS`` logits.

Backward (the augmented-value identity, DESIGN.md §2): with ``vv = [v, E_sel]``,
``out' = [out, A]`` and ``dout' = [dO, G]`` the attention backward of ``out' = P vv`` is the
backward of out and the maps together (``dout' vvᵀ = dP``, ``rowsum(dout' ⊙ out') = rowsum(P ⊙
dP)``); rows outside the map queries carry G = 0. Primitives with ``attend_backward_delta`` (the
torch backend's) run it without the S extra columns: c = rowsum(G ⊙ A) joins the row term and
P ⊙ G E_selᵀ, nonzero on the selected columns only, is two [Nm, S] products
(:func:`_sparse_map_backward`). A detached reference adds nothing else. A
reference that is not detached adds one attention backward over the reference key sequence
``[k_O, k_ref]`` for the map queries, with ``vv = E_ref_tokens``, ``out' = A_r`` and
``dout' = G_r``: its gradient reaches q, the outside keys of k and k_ref.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._inputs import SubjectInputs, XattnInputs, accumulation_dtype
from .base import empty_forward_outputs, empty_subject_outputs, keeps_lse_ref
from .primitives import BLOCK_ELEMENTS
from .sdpa import head_reduce, like, one_hot_columns, per_head_grad

Tensor = torch.Tensor
INF = float("inf")
#: Logits per query chunk of the reference's own-keys logsumexp (fp32: 8 MiB). Larger products than
#: BLOCK_ELEMENTS': 15 % faster on the Flux 512-px layer's [1024, 512] x 24 heads (1 CPU thread).
LSE_BLOCK_ELEMENTS = 4 * BLOCK_ELEMENTS


# ------------------------------------------------------------------------------------------------
# key sets and selected columns
# ------------------------------------------------------------------------------------------------
def _outside(t: Optional[Tensor], start: int, stop: int) -> Optional[Tensor]:
    """t without positions start..stop-1 of dim 2 (a view when the segment touches an end)."""
    if t is None:
        return None
    M = t.shape[2]
    if start == 0:
        return t[:, :, stop:]
    if stop == M:
        return t[:, :, :start]
    return torch.cat([t[:, :, :start], t[:, :, stop:]], dim=2)


def _gather_keys(k: Tensor, index: Tensor) -> Tensor:
    """k [B, H, M, D] at index [B, S] -> [B, H, S, D]."""
    B, H, _, D = k.shape
    return torch.gather(k, 2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def _gather_bias(bias: Optional[Tensor], index: Tensor, heads: int) -> Optional[Tensor]:
    if bias is None:
        return None
    return torch.gather(bias, 2, index[:, None, :].expand(bias.shape[0], heads, index.shape[1]))


def _reference_sequence(inp: SubjectInputs) -> Tuple[Tensor, Optional[Tensor]]:
    """The reference key sequence cat(k[:, :, :a], k_ref, k[:, :, b:]) and its bias [B, H, L]."""
    a, b = inp.seg_start, inp.seg_stop
    keys = torch.cat([inp.k[:, :, :a], inp.k_ref, inp.k[:, :, b:]], dim=2)
    if inp.bias is None and inp.ref_bias is None:
        return keys, None
    B, H, M = inp.k.shape[:3]
    zeros = inp.q.new_zeros(B, H, 1, dtype=accumulation_dtype(inp.dtype))
    bias = inp.bias if inp.bias is not None else zeros.expand(B, H, M)
    ref = inp.ref_bias if inp.ref_bias is not None else zeros.expand(B, H, inp.k_ref.shape[2])
    return keys, torch.cat([bias[:, :, :a], ref, bias[:, :, b:]], dim=2)


def _reference_columns(inp: SubjectInputs) -> Tuple[Tensor, Optional[Tensor]]:
    """Keys [B, H, S, D] and bias [B, H, S] of ``ref_tokens`` on the reference key sequence,
    gathered from k and k_ref without building the sequence."""
    a, b = inp.seg_start, inp.seg_stop
    M, M_ref = inp.k.shape[2], inp.k_ref.shape[2]
    pos = inp.ref_tokens
    from_ref = (pos >= a) & (pos < a + M_ref)
    k_index = torch.where(pos < a, pos, pos - M_ref + (b - a)).clamp(0, M - 1)
    r_index = (pos - a).clamp(0, max(M_ref - 1, 0))
    H = inp.heads
    keys = _gather_keys(inp.k, k_index)
    if M_ref:
        keys = torch.where(from_ref[:, None, :, None], _gather_keys(inp.k_ref, r_index), keys)
    if inp.bias is None and inp.ref_bias is None:
        return keys, None
    acc = accumulation_dtype(inp.dtype)
    zero = inp.q.new_zeros(pos.shape[0], H, pos.shape[1], dtype=acc)
    bias = zero if inp.bias is None else _gather_bias(inp.bias, k_index, H)
    if M_ref:
        ref = zero if inp.ref_bias is None else _gather_bias(inp.ref_bias, r_index, H)
        bias = torch.where(from_ref[:, None, :], ref, bias)
    return keys, bias


def _maps(q: Tensor, rows: slice, keys: Tensor, bias: Optional[Tensor], lse: Tensor,
          scale: float) -> Tensor:
    """Per-head maps [B, H, Nm, S] = exp(q·keysᵀ·scale + bias − lse) (lse +inf: 0)."""
    acc = accumulation_dtype(q.dtype)
    s = torch.matmul(q[:, :, rows].to(acc), keys.to(acc).transpose(-1, -2)).mul_(scale)
    if bias is not None:
        s += bias[:, :, None, :]
    return torch.exp(s.sub_(lse[..., None]))


def _lse_over(q: Tensor, rows: slice, keys: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    """logsumexp of q·keysᵀ·scale + bias over the keys for the query rows [B, H, Nm] (-inf when
    there are none), in query chunks of at most LSE_BLOCK_ELEMENTS logits, worked in place."""
    acc = accumulation_dtype(q.dtype)
    B, H = q.shape[:2]
    qr = q[:, :, rows]
    n, M = qr.shape[2], keys.shape[2]
    lse = q.new_full((B, H, n), -INF, dtype=acc)
    if M == 0:
        return lse
    kt = keys.to(acc).transpose(-1, -2) * scale
    step = max(1, LSE_BLOCK_ELEMENTS // max(1, B * H * M))
    for start in range(0, n, step):
        s = torch.matmul(qr[:, :, start:start + step].to(acc), kt)
        if bias is not None:
            s += bias[:, :, None, :]
        m = s.amax(dim=-1, keepdim=True)
        m.masked_fill_(torch.isinf(m), 0.0)  # all keys -inf: log(0) = -inf below
        lse[:, :, start:start + step] = s.sub_(m).exp_().sum(dim=-1).log_().add_(m[..., 0])
    return lse


def _as_empty_neg(lse: Tensor) -> Tensor:
    """Contract lse (+inf: no key) -> math lse (-inf: no key)."""
    return lse.masked_fill(torch.isposinf(lse), -INF)


def _as_contract(lse: Tensor) -> Tensor:
    return lse.masked_fill(torch.isneginf(lse), INF)


def _combine(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor, out: Tensor) -> Tensor:
    """Softmax over two disjoint key sets from each one's (out, lse) (lse -inf: no key; out 0
    there): writes ``out`` (any layout) and returns the joint lse. One pass over the outputs:
    ``o1 + w2·(o2 − o1)`` with ``w2 = e^(l2 − lse)`` (the first set's weight is ``1 − w2``)."""
    lse = torch.logaddexp(l1, l2)
    w2 = torch.exp(l2 - lse.masked_fill(torch.isneginf(lse), 0.0))[..., None]
    if o1.dtype == o2.dtype == out.dtype == w2.dtype:
        torch.lerp(o1, o2, w2, out=out)
    else:
        out.copy_(torch.lerp(o1.to(w2.dtype), o2.to(w2.dtype), w2))
    return lse


# ------------------------------------------------------------------------------------------------
# cross_attention / attention_maps
# ------------------------------------------------------------------------------------------------
def _rows(inp) -> slice:
    return slice(inp.map_start, inp.map_stop)


def xattn_forward(kern, inp: XattnInputs):
    """(out, lse, maps) of the xattn contract: one attend call, the maps from lse."""
    q, k = inp.q, inp.k
    out, _, maps = empty_forward_outputs(q, k, inp.v, inp.select, inp.mean_heads, inp.num_map_queries)
    o, lse = kern.attend(q, k, inp.v if inp.v is not None else k[..., :1], inp.bias, inp.scale)
    if inp.v is not None:
        out.copy_(o)
    if inp.select is not None:
        a = _maps(q, _rows(inp), _gather_keys(k, inp.select),
                  _gather_bias(inp.bias, inp.select, inp.heads), lse[:, :, _rows(inp)], inp.scale)
        maps.copy_(head_reduce(a, inp.mean_heads))
    return out, lse.to(accumulation_dtype(q.dtype)).contiguous(), maps


def _full_rows(part: Tensor, inp, n: int) -> Tensor:
    """[B, H, Nm, S] placed in the map rows of zeros [B, H, N, S]."""
    full = part.new_zeros(*part.shape[:2], n, part.shape[3])
    full[:, :, _rows(inp)] = part
    return full


def _augmented_backward(kern, inp, keys, bias, v, out, lse, dout, columns, a, g):
    """Attention backward of [out, A] = P [v, E_columns] with [dout, G] (module docstring);
    a / g per head over the map rows, or None when there is no map gradient."""
    q = inp.q
    N = q.shape[2]
    if v is not None and dout is not None and g is not None:
        got = _sparse_map_backward(kern, inp, keys, bias, v, out, lse, dout, columns, a, g)
        if got is not None:
            return got
    vv, o, do = [], [], []
    if v is not None and dout is not None:
        vv, o, do = [v], [out], [dout]
    if g is not None:
        vv.append(one_hot_columns(columns, keys.shape[2], q.shape[1], q.dtype))
        o.append(_full_rows(a, inp, N).to(out.dtype if out is not None else q.dtype))
        do.append(_full_rows(g, inp, N).to(o[-1].dtype))
    if not vv:
        return None, None, None
    cat = (lambda ts: ts[0] if len(ts) == 1 else torch.cat([t.to(ts[0].dtype) for t in ts], dim=-1))
    return kern.attend_backward(q, keys, cat(vv), bias, inp.scale, cat(o), lse, cat(do))


def _sparse_map_backward(kern, inp, keys, bias, v, out, lse, dout, columns, a, g):
    """The same backward without the S extra value columns, where the primitive takes an extra
    row term ``c`` (``kern.attend_backward_delta``; None otherwise, or when it declines).

    With ``dout' = [dO, G]``, ``dS = P ⊙ (dO vᵀ + G E_colsᵀ − rowsum(dout' ⊙ out'))``. The row
    term is ``rowsum(dO ⊙ out) + c`` with ``c_i = Σ_s G_is A_is``, so one attention backward of
    (v, dO) with c added does all of dS but ``P ⊙ G E_colsᵀ``, which is nonzero on the selected
    columns only (``A ⊙ G``, [Nm, S]): dq += scale (A⊙G) k_cols, dk[cols] += scale (A⊙G)ᵀ q."""
    backward = getattr(kern, "attend_backward_delta", None)
    if backward is None:
        return None
    q, rows, acc = inp.q, _rows(inp), accumulation_dtype(inp.dtype)
    ag = a.to(acc) * g.to(acc)  # [B, H, Nm, S]
    c = q.new_zeros(q.shape[:3], dtype=acc)
    c[:, :, rows] = ag.sum(dim=-1)
    got = backward(q, keys, v, bias, inp.scale, out, lse, dout, c)
    if got is None:
        return None
    dq, dk, dv = got  # fresh tensors of the kernel's dtype: the two terms go in in place
    ag = ag.to(dq.dtype)
    B, H, S = ag.shape[0], ag.shape[1], ag.shape[3]
    dq[:, :, rows] += torch.matmul(ag, _gather_keys(keys, columns).to(dq.dtype)).mul_(inp.scale)
    dk_cols = torch.matmul(ag.transpose(-1, -2), q[:, :, rows].to(dk.dtype)).mul_(inp.scale)
    dk.scatter_add_(2, columns[:, None, :, None].expand(B, H, S, dk.shape[-1]), dk_cols)
    return dq, dk, dv


def xattn_backward(kern, inp: XattnInputs, out, lse, dout, dmaps):
    q, k, v = inp.q, inp.k, inp.v
    a = g = None
    if inp.select is not None and dmaps is not None:
        a = _maps(q, _rows(inp), _gather_keys(k, inp.select),
                  _gather_bias(inp.bias, inp.select, inp.heads), lse[:, :, _rows(inp)], inp.scale)
        g = per_head_grad(dmaps, inp.heads, inp.mean_heads, a.dtype)
    dq, dk, dvv = _augmented_backward(kern, inp, k, inp.bias, v, out, lse,
                                      dout if v is not None else None, inp.select, a, g)
    no_dv = q.new_empty(0) if v is None else torch.zeros_like(v)
    if dq is None:
        return torch.zeros_like(q), torch.zeros_like(k), no_dv
    has_dv = v is not None and dout is not None
    return like(q, dq), like(k, dk), (like(v, dvv[..., : v.shape[-1]]) if has_dv else no_dv)


# ------------------------------------------------------------------------------------------------
# subject_attention
# ------------------------------------------------------------------------------------------------
def _split_attention(kern, inp: SubjectInputs, out: Tensor) -> Tuple[Tensor, Tensor]:
    """Writes the attention output into ``out`` [B, H, N, Dv]; returns (lse_t, L_O) with -inf for
    no key (module docstring)."""
    a, b, q, acc = inp.seg_start, inp.seg_stop, inp.q, accumulation_dtype(inp.dtype)
    B, H, N, _ = q.shape
    parts = []
    for keys, v, bias in ((_outside(inp.k, a, b), _outside(inp.v, a, b), _outside(inp.bias, a, b)),
                          (inp.k[:, :, a:b], inp.v[:, :, a:b],
                           None if inp.bias is None else inp.bias[:, :, a:b])):
        if keys.shape[2]:
            o, lse = kern.attend(q, keys, v, bias, inp.scale)
            parts.append((o, _as_empty_neg(lse.to(acc))))
        else:
            parts.append(None)
    outside, segment = parts
    none = q.new_full((B, H, N), -INF, dtype=acc)
    if outside is None:
        out.copy_(segment[0])
        return segment[1], none
    if segment is None:
        out.copy_(outside[0])
        return outside[1], outside[1]
    return _combine(outside[0], outside[1], segment[0], segment[1], out), outside[1]


def _loss_coefficient(inp: SubjectInputs, dloss: Tensor, acc: torch.dtype) -> Tensor:
    """2 · dloss[b] · w[b, s] / (Nm · H_red), [B, 1, (1,) S]-broadcastable."""
    w = inp.weights.to(acc) if inp.weights is not None else torch.full(
        inp.tokens.shape, 1.0 / inp.num_selected, dtype=acc, device=inp.device)
    c = dloss.to(acc)[:, None] * w * (2.0 / (inp.num_map_queries * (1 if inp.mean_heads else inp.heads)))
    return c[:, None, :] if inp.mean_heads else c[:, None, None, :]


def subject_forward(kern, inp: SubjectInputs):
    """(out, lse, lse_ref, loss, maps, diff) of the subject contract through the split lse."""
    q, acc, rows = inp.q, accumulation_dtype(inp.dtype), _rows(inp)
    out, lse, lse_ref, loss, maps, diff = empty_subject_outputs(
        q, inp.v, inp.tokens, inp.mean_heads, inp.detach_reference, inp.return_maps,
        saves_lse=True, map_rows=inp.num_map_queries)
    lse_t, l_out = _split_attention(kern, inp, out)
    lse.copy_(_as_contract(lse_t))
    l_ref = _lse_over(q, rows, inp.k_ref, inp.ref_bias, inp.scale)
    lse_r = _as_contract(torch.logaddexp(l_out[:, :, rows], l_ref))
    a_t = _maps(q, rows, _gather_keys(inp.k, inp.tokens),
                _gather_bias(inp.bias, inp.tokens, inp.heads), lse[:, :, rows], inp.scale)
    a_r = _maps(q, rows, *_reference_columns(inp), lse_r, inp.scale)
    a_t, a_r = head_reduce(a_t, inp.mean_heads), head_reduce(a_r, inp.mean_heads)
    d = a_t - a_r
    w = inp.weights.to(acc) if inp.weights is not None else 1.0 / inp.num_selected
    w = w if inp.weights is None else (w[:, None, :] if inp.mean_heads else w[:, None, None, :])
    h_red = 1 if inp.mean_heads else inp.heads
    loss.copy_((d.square() * w).flatten(1).sum(dim=1) / (inp.num_map_queries * h_red))
    if inp.return_maps:
        maps.copy_(a_t)
    if inp.mean_heads:
        diff.copy_(d)
    if keeps_lse_ref(inp.mean_heads, inp.detach_reference):
        lse_ref.zero_()[:, :, rows] = lse_r
    return out, lse, lse_ref, loss, maps, diff


def subject_backward(kern, inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss, dmaps):
    """(dq, dk, dv, dk_ref): the target's augmented backward, plus the reference's over
    [k_O, k_ref] when it is not detached (module docstring)."""
    q, k, acc, rows = inp.q, inp.k, accumulation_dtype(inp.dtype), _rows(inp)
    H = inp.heads
    a_t = _maps(q, rows, _gather_keys(k, inp.tokens), _gather_bias(inp.bias, inp.tokens, H),
                lse[:, :, rows], inp.scale)
    ref_grad = dloss is not None and not inp.detach_reference
    a_r = None
    if dloss is not None and (ref_grad or not inp.mean_heads):
        a_r = _maps(q, rows, *_reference_columns(inp), lse_ref[:, :, rows], inp.scale)
    g = None
    if dloss is not None:
        d = diff if inp.mean_heads else a_t - a_r
        g = _loss_coefficient(inp, dloss, acc) * d
    g_t = g if dmaps is None else (dmaps.to(acc) if g is None else g + dmaps.to(acc))
    g_t = None if g_t is None else per_head_grad(g_t, H, inp.mean_heads, acc)
    dq, dk, dvv = _augmented_backward(kern, inp, k, inp.bias, inp.v, out, lse, dout, inp.tokens,
                                      a_t, g_t)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if dq is None else dq.to(acc)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device) if dk is None else dk.to(acc)
    dv = dvv[..., : inp.v.shape[-1]] if dvv is not None and dout is not None else None
    dk_ref = None
    if ref_grad:
        keys, bias = _reference_sequence(inp)
        g_r = per_head_grad(-g, H, inp.mean_heads, acc)
        e = one_hot_columns(inp.ref_tokens, keys.shape[2], H, q.dtype)
        dq_r, dkeys, _ = kern.attend_backward(q[:, :, rows], keys, e, bias, inp.scale, a_r,
                                              lse_ref[:, :, rows].contiguous(), g_r)
        dq[:, :, rows] += dq_r.to(acc)
        a, b, M_ref = inp.seg_start, inp.seg_stop, inp.k_ref.shape[2]
        dk[:, :, :a] += dkeys[:, :, :a].to(acc)
        dk[:, :, b:] += dkeys[:, :, a + M_ref:].to(acc)
        dk_ref = dkeys[:, :, a:a + M_ref]
    return (like(q, dq), like(k, dk), like(inp.v, dv),
            q.new_empty(0) if inp.detach_reference else like(inp.k_ref, dk_ref))
