"""Float64 reference of semfid's ops and the flash-attention tolerance rule.

Written independently of the code under test (explicit softmax, autograd through it), and imported
by the tests, the benchmarks' correctness gate and ``semfid.selftest``.
``attention_ref(..., upcast=False)`` runs the same math at the input dtype: the error of "plain
PyTorch at that dtype", against which a backend's error is judged (DESIGN.md §6).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor


def _bias4(bias: Optional[Tensor]) -> Optional[Tensor]:
    if bias is None:
        return None
    if bias.dim() == 2:  # [B, M]
        return bias[:, None, None, :]
    if bias.dim() == 3:  # [B, 1, M]
        return bias[:, :, None, :]
    return bias


def probabilities(q: Tensor, k: Tensor, scale: Optional[float], bias: Optional[Tensor],
                  upcast: bool = True) -> Tensor:
    """softmax(q kᵀ · scale + bias) [B, H, N, M]; rows whose keys are all -inf give 0."""
    dtype = torch.float64 if upcast else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    b = _bias4(bias)
    if b is not None:
        logits = logits + b.to(dtype)
    all_masked = torch.isneginf(logits).all(dim=-1, keepdim=True)
    logits = logits.masked_fill(all_masked, 0.0)
    return torch.softmax(logits, dim=-1).masked_fill(all_masked, 0.0)


def gather_maps(p: Tensor, select: Union[Tensor, Sequence[int]], head_reduce: str) -> Tensor:
    """P[..., select] -> [B, H, N, S] or head mean [B, N, S]."""
    sel = torch.as_tensor(select, dtype=torch.long, device=p.device)
    B, H, N, _ = p.shape
    if sel.dim() == 1:
        sel = sel.expand(B, -1)
    maps = torch.gather(p, -1, sel[:, None, None, :].expand(B, H, N, sel.shape[-1]))
    return maps.mean(dim=1) if head_reduce == "mean" else maps


def _rows_of(map_queries: Optional[Tuple[int, int]]) -> slice:
    """The query rows the maps and the loss cover (all of them by default)."""
    return slice(None) if map_queries is None else slice(*map_queries)


def attention_ref(q, k, v, *, scale=None, attn_bias=None, select=None, head_reduce="mean",
                  upcast=True, map_queries=None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """out = P v, and the maps P[:, :, map_queries][..., select] when ``select`` is given (P over
    all M keys); ``v`` may be None for the maps alone."""
    p = probabilities(q, k, scale, attn_bias, upcast)
    out = None if v is None else torch.matmul(p, v.to(p.dtype))
    if select is None:
        return out
    return out, gather_maps(p[:, :, _rows_of(map_queries)], select, head_reduce)


def reference_keys(k: Tensor, k_ref: Tensor, attn_bias: Optional[Tensor],
                   ref_attn_bias: Optional[Tensor], ref_segment: Optional[Tuple[int, int]]
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """The reference key sequence ``cat(k[:, :, :start], k_ref, k[:, :, stop:])`` and its bias
    [B, H or 1, 1, len] (the bias of the keys outside the segment, then ``ref_attn_bias``).
    With no segment (the UNet meaning) these are ``k_ref`` and ``ref_attn_bias``."""
    if ref_segment is None:
        return k_ref, ref_attn_bias
    start, stop = ref_segment
    keys = torch.cat([k[:, :, :start], k_ref, k[:, :, stop:]], dim=2)
    if attn_bias is None and ref_attn_bias is None:
        return keys, None
    B, H = k.shape[:2]
    M, M_ref = k.shape[2], k_ref.shape[2]
    b = _bias4(attn_bias) if attn_bias is not None else k.new_zeros(B, 1, 1, M, dtype=torch.float64)
    r = (_bias4(ref_attn_bias) if ref_attn_bias is not None
         else k.new_zeros(B, 1, 1, M_ref, dtype=torch.float64))
    heads = max(b.shape[1], r.shape[1])
    b = b.to(torch.float64).expand(B, heads, 1, M)
    r = r.to(torch.float64).expand(B, heads, 1, M_ref)
    return keys, torch.cat([b[..., :start], r, b[..., stop:]], dim=-1)


def _rows(tokens, B: int):
    """[S] / [B, S] tensor, list, or ragged list of per-row lists -> list of B index lists."""
    if isinstance(tokens, Tensor):
        t = tokens.detach().cpu().long()
        return [t.tolist()] * B if t.dim() == 1 else t.tolist()
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], (list, tuple)):
        return [list(r) for r in tokens]
    return [list(tokens)] * B


def subject_ref(q, k, v, k_ref, *, tokens, ref_tokens=None, scale=None, attn_bias=None,
                ref_attn_bias=None, head_reduce="mean", detach_reference=True,
                return_maps=False, upcast=True, map_queries=None, ref_segment=None):
    """(out, loss) or (out, loss, maps_t) of :func:`semfid.subject_attention`, row by row.

    ``tokens`` / ``ref_tokens`` may be ragged (a list of per-row lists): row b's loss is the mean
    over its own ``len(tokens[b])`` columns. ``maps_t`` is returned padded to the longest row,
    with zeros in the padding columns. ``map_queries`` / ``ref_segment`` as in the op: P_r is an
    explicit softmax over :func:`reference_keys` (a second full attention: this is a reference).
    """
    B = q.shape[0]
    p = probabilities(q, k, scale, attn_bias, upcast)
    out = torch.matmul(p, v.to(p.dtype))
    keys_r, bias_r = reference_keys(k, k_ref, attn_bias, ref_attn_bias, ref_segment)
    p_ref = probabilities(q, keys_r, scale, bias_r, upcast)
    if detach_reference:
        p_ref = p_ref.detach()
    rows = _rows_of(map_queries)
    p, p_ref = p[:, :, rows], p_ref[:, :, rows]
    rows_t = _rows(tokens, B)
    rows_r = _rows(tokens if ref_tokens is None else ref_tokens, B)
    losses, maps = [], []
    width = max(len(r) for r in rows_t)
    for b in range(B):
        a_t = gather_maps(p[b:b + 1], rows_t[b], head_reduce)
        a_r = gather_maps(p_ref[b:b + 1], rows_r[b], head_reduce)
        losses.append((a_t - a_r).square().mean())
        maps.append(torch.nn.functional.pad(a_t, (0, width - a_t.shape[-1])))
    loss = torch.stack(losses)
    if return_maps:
        return out, loss, torch.cat(maps)
    return out, loss


def max_error(x: Tensor, ref: Tensor) -> float:
    """max |x − ref| in float64, treating matching non-finite entries as equal."""
    x64, r64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    same = (x64 == r64) | (torch.isnan(x64) & torch.isnan(r64))
    diff = (x64 - r64).abs().masked_fill(same, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_close_rule(name: str, got: Tensor, ref64: Tensor, plain: Tensor, *, factor: float = 2.0,
                      atol: float = 0.0) -> None:
    """Flash-attention's rule: err(got) ≤ factor · err(plain PyTorch at the same dtype) + atol.

    ``atol`` absorbs the case where plain PyTorch is exact to the last bit (fp32 on tiny inputs):
    pass a few ulps of the dtype there.
    """
    if got.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}")
    err, base = max_error(got, ref64), max_error(plain, ref64)
    if not (err <= factor * base + atol):
        diff = (got.detach().to(torch.float64) - ref64.detach()).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(
            f"{name}: max error {err:.3e} > {factor} x plain-PyTorch error {base:.3e} + {atol:.1e}; "
            f"worst at index {idx}: got {float(got.detach().to(torch.float64)[idx]):.6g}, "
            f"reference {float(ref64[idx]):.6g}"
        )


def ulp_atol(dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """A few units in the last place of ``dtype`` at ``magnitude``."""
    return 4 * torch.finfo(dtype).eps * magnitude
