"""What the CUDA kernels of ``csrc/`` support: the one table every consumer reads.

* ``csrc/generate_kernels.py`` writes one instantiation per (head dim, dtype) from it, and the C++
  header ``csrc/semfid_limits.h`` (the constants and the head-dim switch the host code and the error
  messages of ``semfid_api.cpp`` use);
* the adapter :mod:`semfid.backends.cuda` explains refusals with it, without loading the extension.

Plain constants, no imports: changing a value here and running ``python csrc/generate_kernels.py``
updates every consumer (``--check`` fails in the tests until then).
"""

#: Head dims with a compiled kernel: SD1.5's 40 / 80 / 160, SDXL's 64, and 128.
HEAD_DIMS = (40, 64, 80, 128, 160)

#: Keys per head staged in shared memory at once (SD cross-attention has 77 text tokens).
MAX_KEYS = 128

#: Selected tokens per row (the head-mean forward keeps a [64, S] fp32 tile per block on chip).
MAX_SELECTED = 128

#: Element types with a compiled kernel: file-name tag -> CUDA C++ type. The torch dtypes are
#: float16 and bfloat16; lse, maps and the loss are float32.
DTYPES = {"fp16": "__half", "bf16": "__nv_bfloat16"}
