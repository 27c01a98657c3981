"""semfid: fused cross-attention that returns selected attention maps and the subject-wise
attention loss (SeFi-IDE) at fused-kernel cost, with diffusers processors for SD1.5 / SDXL.

``import semfid`` never fails because a kernel package is missing: missing Triton or a missing
CUDA extension show up as reasons in ``python -m semfid.info``.
"""

__version__ = "0.1.0"

from ._install_check import install_problem as _install_problem

if _install_problem(__file__):  # a clone in the current folder shadows the installed package (or none is)
    import warnings as _warnings

    _warnings.warn(_install_problem(__file__), UserWarning, stacklevel=2)

from .backends import available_backends
from .backends.base import set_verdict_source as _set_verdict_source
from .selftest import verdict_for as _verdict_for
from ._inputs import TokenSelection

# Selection by self-test verdict sits above both: the backends never import semfid.selftest.
_set_verdict_source(_verdict_for)
from .ops import attention_maps, cross_attention, subject_attention

__all__ = [
    "__version__",
    "cross_attention",
    "subject_attention",
    "attention_maps",
    "TokenSelection",
    "available_backends",
]
