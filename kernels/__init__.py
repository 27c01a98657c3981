"""Triton kernels of semfid (installed as ``semfid.kernels``); imports only torch and triton.

Launchers (flat signatures of CONTRACT.md; each allocates its outputs):

* :func:`xattn_fwd` — out, lse and the selected probability columns in one pass.
* :func:`xattn_bwd` — dq, dk, dv with the map gradient folded into dP.
* :func:`subject_fwd` — the one-pass subject-wise loss: out, lse, lse_ref, loss, maps, diff.
* :func:`subject_bwd` — its gradients dq, dk, dv, dk_ref in one kernel pass.
* :func:`joint_xattn_fwd` / :func:`joint_xattn_bwd`, :func:`joint_subject_fwd` /
  :func:`joint_subject_bwd` — the same ops walking the keys in blocks (online softmax): any number
  of keys (joint [image, text] key sets), map query ranges, a reference segment (split lse).

Every launch runs under ``torch.cuda.device(q.device)`` (and so on that device's current stream).
Set ``TRITON_INTERPRET=1`` before importing triton to run them on CPU tensors (fixed tiles).
``python -m semfid.kernels.compile_check`` compiles every reachable config for sm_80 / sm_90.
"""

from .joint_bwd import joint_subject_bwd, joint_xattn_bwd
from .joint_fwd import joint_subject_fwd, joint_xattn_fwd
from .subject_bwd import subject_bwd
from .subject_fwd import subject_fwd
from .xattn_bwd import xattn_bwd
from .xattn_fwd import xattn_fwd

__all__ = ["xattn_fwd", "xattn_bwd", "subject_fwd", "subject_bwd", "joint_xattn_fwd", "joint_xattn_bwd",
           "joint_subject_fwd", "joint_subject_bwd"]
