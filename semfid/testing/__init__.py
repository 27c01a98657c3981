"""What the tests, the benchmarks and ``semfid.selftest`` share to check semfid's ops.

* :mod:`.reference` — float64 explicit-softmax reference of every op and flash-attention's
  tolerance rule (a backend's error at most ~2x plain PyTorch's at the same dtype, 3x for gradients).
* :mod:`.memory` — a deterministic counter of the bytes autograd saves for backward.

Not part of the training API; nothing here is needed to run the ops.
"""

from .memory import SavedBytes, saved_tensor_bytes
from .reference import (
    assert_close_rule,
    attention_ref,
    gather_maps,
    max_error,
    probabilities,
    subject_ref,
    ulp_atol,
)

__all__ = [
    "SavedBytes", "saved_tensor_bytes", "assert_close_rule", "attention_ref", "gather_maps",
    "max_error", "probabilities", "subject_ref", "ulp_atol",
]
