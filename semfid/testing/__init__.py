"""Tools for checking semfid, shared by the tests, the benchmarks and ``semfid.selftest``.

Everything public here is used only by tests and benchmarks; nothing is needed to run the ops, train or
generate (the one exception: :mod:`semfid.sefi.tiny` builds its tiny pipelines from the UNet twins).

* :mod:`.reference` — float64 explicit-softmax reference of every op and flash-attention's
  tolerance rule (a backend's error at most ~2x plain PyTorch's at the same dtype, 3x for gradients).
* :mod:`.memory` — a deterministic counter of the bytes autograd saves for backward.
* :mod:`.unets` — the SD1.5 / SDXL base UNet configs and their structural twins (same layer names,
  tiny widths) in ``configs/``, and a loader that builds random-weight UNets from them.
* :mod:`.dits` — the same for the SD3 / SD3.5, Flux.1 dev and PixArt-Σ transformers.
* :mod:`.dit_layers` — random inputs of one Flux / SD3 / PixArt-Σ attention layer at 1024 px, as
  diffusers passes them (the GPU tests and timings of the key-blocked kernels).
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
from .dits import DIT_CONFIGS, dit_from_config, load_dit_config
from .unets import UNET_CONFIGS, load_unet_config, unet_from_config

__all__ = [
    "SavedBytes", "saved_tensor_bytes", "assert_close_rule", "attention_ref", "gather_maps",
    "max_error", "probabilities", "subject_ref", "ulp_atol", "UNET_CONFIGS", "load_unet_config",
    "unet_from_config", "DIT_CONFIGS", "load_dit_config", "dit_from_config",
]
