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

if __name__ == "kernels":
    # Imported as a top-level package: the repository root is on sys.path (``python -m pytest`` or
    # ``python -m ...`` run from a clone), and this folder shadows the PyPI distribution named
    # ``kernels`` (Hugging Face's hub kernels, which transformers >= 5.25 depends on and imports
    # with every model). Hand the import over to that distribution, or fail as a missing package.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the folder kernels/ of the semfid repository is "
                                  "semfid.kernels, not that package)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what the import statement returns once this file has run
    _spec.loader.exec_module(_module)
else:
    from .joint_bwd import joint_subject_bwd, joint_xattn_bwd
    from .joint_fwd import joint_subject_fwd, joint_xattn_fwd
    from .subject_bwd import subject_bwd
    from .subject_fwd import subject_fwd
    from .xattn_bwd import xattn_bwd
    from .xattn_fwd import xattn_fwd

    __all__ = ["xattn_fwd", "xattn_bwd", "subject_fwd", "subject_bwd", "joint_xattn_fwd", "joint_xattn_bwd",
               "joint_subject_fwd", "joint_subject_bwd"]
