"""The correctness gate: nothing is timed before it matches the float64 reference.

Each (implementation, mode) runs once on a small case (``attn_cases.CHECK_SHAPE``) on the device and
dtype of the run, against :mod:`semfid.testing`'s float64 reference, with flash-attention's rule:
max error <= 3x the error of plain PyTorch at the same dtype plus a few ulps, for the output, the
maps, the loss and the gradients of the output and of the loss (checked separately, so a missing
loss gradient cannot hide under the output's).
"""

from __future__ import annotations

from typing import Optional

import torch

from _bench_utils import short_error
from attn_cases import CHECK_SHAPE, make_inputs
from baselines import Implementation

#: Prefix of a gate verdict for a mode that this torch/device does not support (NotImplementedError):
#: reported as "not supported here", not as a wrong result.
UNSUPPORTED = "not supported here"


def _unsupported(exc: BaseException) -> bool:
    """True for NotImplementedError, also when a compiler wraps it (InductorError, BackendCompilerFailed)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NotImplementedError) or "NotImplementedError" in str(exc).split("\n")[0]:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_implementation(impl: Implementation, mode: str, device: torch.device, dtype: torch.dtype,
                         *, seed: int = 1) -> Optional[str]:
    """None when ``impl`` matches the float64 reference on a small case in ``mode``, else why not:
    ``"wrong result: ..."``, ``"failed: ..."`` or ``"not supported here: ..."``."""
    from semfid import testing as ref

    x = make_inputs(device=device, dtype=dtype, seed=seed, **CHECK_SHAPE)
    fn = impl.function(mode)
    if fn is None:
        return f"{impl.name} has no {mode} mode"

    def compare(name, got, ref64, plain):
        atol = ref.ulp_atol(dtype, float(ref64.detach().abs().max()) if ref64.numel() else 1.0)
        ref.assert_close_rule(name, got, ref64, plain, factor=3.0, atol=atol)

    def leaves(upcast_dtype):
        ts = [t.detach().to(upcast_dtype).requires_grad_(True) for t in (x.q, x.k, x.v)]
        return ts + [x.k_ref.detach().to(upcast_dtype)]

    try:
        if mode in ("forward", "forward_maps"):
            select = x.tokens if mode == "forward_maps" else None
            with torch.no_grad():
                got = fn(x.q, x.k, x.v, x.scale) if select is None else fn(x.q, x.k, x.v, x.tokens, x.scale)
                want = ref.attention_ref(x.q, x.k, x.v, scale=x.scale, select=select)
                plain = ref.attention_ref(x.q, x.k, x.v, scale=x.scale, select=select, upcast=False)
            if select is None:
                got, want, plain = (got,), (want,), (plain,)
            for name, g, w, p in zip(("out", "maps"), got, want, plain):
                compare(name, g, w, p)
            return None

        out, loss = fn(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
        results = {}
        for label, dtype_ in (("want", torch.float64), ("plain", dtype)):
            q, k, v, k_ref = leaves(dtype_)
            o, l = ref.subject_ref(q, k, v, k_ref, tokens=x.tokens, scale=x.scale,
                                   upcast=label == "want")
            d_out = torch.autograd.grad(o, (q, k, v), x.dout.to(dtype_), retain_graph=True)
            d_loss = torch.autograd.grad(l.sum(), (q, k))
            results[label] = (o, l, d_out, d_loss)
        want, plain = results["want"], results["plain"]
        compare("out", out, want[0], plain[0])
        d_out = torch.autograd.grad(out, (x.q, x.k, x.v), x.dout, retain_graph=True)
        for name, g, w, p in zip(("dq (from out)", "dk (from out)", "dv (from out)"), d_out, want[2], plain[2]):
            compare(name, g, w, p)
        if impl.is_floor:
            return None  # a floor computes no loss: only its output path is checked
        compare("loss", loss, want[1], plain[1])
        d_loss = torch.autograd.grad(loss.sum(), (x.q, x.k))
        for name, g, w, p in zip(("dq (from loss)", "dk (from loss)"), d_loss, want[3], plain[3]):
            compare(name, g, w, p)
        return None
    except AssertionError as exc:
        return f"wrong result: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure disqualifies the implementation
        if _unsupported(exc):
            return f"{UNSUPPORTED}: {short_error(exc)}"
        return f"failed: {short_error(exc)}"
