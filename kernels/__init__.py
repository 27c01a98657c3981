"""Triton kernels of semfid (installed as ``semfid.kernels``); imports only torch and triton.

Launchers (they write into / return torch tensors; shapes as in ``semfid.backends.base``):

* :func:`xattn_fwd` — out, lse and the selected probability columns in one pass.
* :func:`xattn_bwd` — dq, dk, dv with the map gradient folded into dP.

Set ``TRITON_INTERPRET=1`` before importing triton to run them on CPU tensors (fixed tile,
no autotuning).
"""

from .xattn_bwd import xattn_bwd
from .xattn_fwd import xattn_fwd

__all__ = ["xattn_fwd", "xattn_bwd"]
