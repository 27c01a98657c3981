"""SD (UNet) launch shapes of the compile check, and the one-pass subject kernels' launches.

Used by :mod:`.compile_check` (which compiles them); imports only torch and triton.
"""

from __future__ import annotations

import importlib

SD_HEAD_DIMS = (40, 64, 80, 160, 256)  # SD1.5: 40/80/160; SDXL: 64; 256 = the kernels' limit
NUM_KEYS = 77  # CLIP text tokens
NUM_SELECTED = 2  # xattn kernels
SUBJECT_SELECTED = (1, 16, 77)  # subject kernels: one token, a long list, every CLIP token
# SD query counts (SD1.5 at 512 px: 4096/1024/256/64; SDXL at 1024 px: 4096/1024). Every bucket is
# handed to the prune: the union of the configs it keeps is what the check compiles.
QUERY_BUCKETS = (64, 256, 1024, 4096)

_TYPES = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}
SD_HEADS = {40: 8, 64: 10, 80: 8, 160: 8}  # heads per head dim in SD1.5 / SDXL (others: 4)

# subject modes: (mean_heads, detach_reference, return_maps)
SUBJECT_FWD_MODES = {
    "subj_mean": (True, True, False),      # SeFi-IDE's training default
    "subj_mapr": (True, False, True),      # reference gets gradients (lse_ref), maps returned
}
# Per-head subject maps (head_reduce="none") are refused on a GPU by semfid.backends.triton: their
# backward spills at every tile tried (16-32 rows, 4-16 warps, sm_90 fp16 D=64: 8-1584 B), so
# launches never reach those configs there and the check leaves them out.
SUBJECT_BWD_MODES = {
    "subj_mean": (True, True, False),
    "subj_mapr": (True, False, True),      # dk_ref and the map gradient
}


def subject_tensors(head_dim: int, dtype: str, num_queries: int, num_selected: int, mean: bool,
                    detach: bool, maps: bool):
    """Meta tensors of one SD subject-op launch (the layouts diffusers hands over) and
    the forward outputs its launcher allocates."""
    import torch

    fwd = importlib.import_module("semfid.kernels.subject_fwd")
    dt = getattr(torch, _TYPES[dtype].split(".")[1])
    B, H, N, M, D = 2, SD_HEADS.get(head_dim, 4), num_queries, NUM_KEYS, head_dim
    meta = dict(device="meta", dtype=dt)
    q, k, v, k_ref = (torch.empty(B, n, H, D, **meta).transpose(1, 2) for n in (N, M, M, M))
    bias = torch.empty(B, 1, M, device="meta").expand(B, H, M)
    tokens = torch.empty(num_selected, device="meta", dtype=torch.int64).expand(B, num_selected)
    block_m, warps = fwd.config(q, mean, num_selected)
    outs = fwd.allocate(q, v, tokens, mean, detach, maps, block_m)
    return (q, k, v, k_ref, bias, tokens), outs, (block_m, warps)


def subject_jobs(arch: int, dtype: str, d: int, quick: bool):
    """The subject kernels' launches: their tiles are fixed per shape class (no autotuning), so
    each (mode, S, query count) compiles exactly the config a launch runs."""
    import torch

    fwd = importlib.import_module("semfid.kernels.subject_fwd")
    bwd = importlib.import_module("semfid.kernels.subject_bwd")
    C = importlib.import_module("semfid.kernels._common")
    fwd_modes = {"subj_mean": SUBJECT_FWD_MODES["subj_mean"]} if quick else SUBJECT_FWD_MODES
    bwd_modes = {"subj_mean": SUBJECT_BWD_MODES["subj_mean"]} if quick else SUBJECT_BWD_MODES
    for S in SUBJECT_SELECTED:
        for mode, (mean, detach, maps) in fwd_modes.items():
            seen = set()
            for n in QUERY_BUCKETS:
                (q, k, v, kr, bias, tok), outs, (bm, w) = subject_tensors(d, dtype, n, S, mean, detach, maps)
                if (bm, w) in seen:
                    continue
                seen.add((bm, w))
                out, lse, lse_ref, mp, diff, part = outs
                args, cx = fwd.launch_args(q, k, v, kr, bias, bias, tok, tok, None, d ** -0.5, mean,
                                           detach, maps, out, lse, lse_ref, mp, diff, part, bm)
                cx["DOT_UPCAST"], cx["SPLIT_DOT"] = False, True
                yield (f"fwd sm_{arch} {dtype} D={d:<3} {mode:<9} S={S:<2} BLOCK_M={bm:<3} warps={w} "
                       f"stages=1", fwd._subject_fwd_kernel, args, cx, w, 1, arch, d)
        for mode, (mean, detach, maps) in bwd_modes.items():
            (q, k, v, kr, bias, tok), outs, _ = subject_tensors(d, dtype, max(QUERY_BUCKETS), S, mean,
                                                                 detach, maps)
            out, lse, lse_ref, mp, diff, _ = outs
            bm, w = bwd.config(q, not detach or not mean, S)
            splits, rows = C.backward_splits(q.shape[2], q.shape[0] * q.shape[1])
            dout = torch.empty_like(out)
            dloss = torch.empty(q.shape[0], device="meta")
            dq, dk_part, dv_part, dkr_part = bwd.allocate(q, k, v, kr, splits, True, not detach)
            args, cx = bwd.launch_args(q, k, v, kr, bias, bias, tok, tok, None, d ** -0.5, mean, detach,
                                       lse, lse_ref, diff, dout, dloss, mp if maps else None, dq,
                                       dk_part, dv_part, dkr_part, rows, bm)
            cx["DOT_UPCAST"], cx["SPLIT_DOT"] = False, True
            yield (f"bwd sm_{arch} {dtype} D={d:<3} {mode:<9} S={S:<2} BLOCK_M={bm:<3} warps={w} "
                   f"stages=1", bwd._subject_bwd_kernel, args, cx, w, 1, arch, d)
