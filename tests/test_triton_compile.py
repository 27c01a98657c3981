"""Compile checks of the Triton kernels for sm_80 / sm_90 without a GPU (DESIGN.md §6).

The full matrix (every arch, dtype, SD head dim, mode and reachable config of the xattn, subject
and split-sum kernels; it must compile with zero register spills) is ``python -m semfid.info
--compile-check`` (``semfid.kernels.compile_check``), which CI runs on its own step. To keep CI from paying for it twice, this file compiles only a quick subset through the same
entry point (fp16, head dim 64, every mode, both archs: ~20 compiles) and checks the autotuning
policy the full check relies on in plain Python (no compile).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton)")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "semfid.kernels.compile_check", *args],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_fp16_d64_configs_compile_without_spills_for_sm80_and_sm90():
    """Quick subset of ``--compile-check``: every fwd/bwd mode of SDXL's head dim 64 in fp16."""
    res = _run("--dtypes", "fp16", "--head-dims", "64")
    out = res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    assert lines, f"compile check printed no configs:\n{out[-4000:]}"
    failed = [line for line in lines if line.startswith("FAIL")]
    assert not failed, "configs failed to compile:\n" + "\n".join(failed)
    for arch in ("sm_80", "sm_90"):
        for mode in ("target", "reference", "per_head", "plain", "out+maps", "maps", "out",
                     "subj_mean", "subj_mapr", "split-sum"):
            assert any(arch in line and f" {mode} " in line for line in lines), (arch, mode)
    for line in lines:  # every line reports the compiler's numbers
        assert re.search(r"regs=\d+ +spill_bytes=\d+ +shared=\d+ +global_loads=(\d+x\d+B ?)+", line), line
    spills = [line for line in lines if "SPILLS" in line]
    gated = [line for line in spills if " subj_mean " in line or " subj_mapr " in line]
    assert not gated, "the one-pass subject op's configs spill registers:\n" + "\n".join(gated)
    assert res.returncode == 0, out[-2000:]
    assert re.search(r"\d+ configs: \d+ compiled, 0 failed, 0 spill registers \(\d+ s\)", res.stdout)
    others = [line for line in spills if " fp32 " not in line]
    if others:  # reported, never silently: each appears in the warning line too
        warning = next(line for line in res.stdout.splitlines() if line.startswith("warning: ") and "fp16/bf16" in line)
        assert str(len(others)) in warning


@pytest.mark.slow
def test_head_dim_40_tiles_load_16_bytes_per_thread():
    """SD1.5's head stride 40 is not a multiple of 16, so Triton's alignment analysis would give
    every q/k/v tile 2-byte loads there; the kernels' multiple-of-8 strides must bring the 16-byte
    vector loads back (read off the sm_90 PTX) for the training path's kernels."""
    res = _run("--dtypes", "fp16", "--head-dims", "40", "--arch", "90",
               "--only", r"(fwd.* target |fwd.* subj_mean S=16 |bwd.* subj_mean S=16 |bwd.* out\+maps )")
    lines = [line for line in res.stdout.splitlines() if line.startswith("ok ")]
    # Except the subject forward's 16-row tiles, which keep 2-byte loads on purpose (they spill
    # with vector loads; SD1.5's 4096 queries at head dim 40 run 32 or 64 rows).
    lines = [line for line in lines if not ("fwd" in line and "BLOCK_M=16 " in line)]
    assert len(lines) >= 4, res.stdout[-3000:] + res.stderr[-2000:]
    for line in lines:
        widths = dict((int(b), int(n)) for n, b in re.findall(r"(\d+)x(\d+)B", line.split("global_loads=")[1]))
        assert widths.get(16, 0) >= 2, f"no 16-byte tile loads at head dim 40: {line}"


@pytest.mark.slow
def test_strict_mode_fails_on_any_half_precision_spill():
    res = _run("--strict", "--dtypes", "fp16", "--head-dims", "64", "--arch", "80", "--only", "fwd.* target ")
    spilled = [line for line in res.stdout.splitlines() if "SPILLS" in line]
    assert (res.returncode != 0) == bool(spilled), res.stdout[-2000:]


def test_per_head_subject_maps_are_refused_on_a_gpu():
    """The per-head subject backward spills on sm_80/sm_90 (so the check leaves it out): the adapter
    must refuse it for compiled launches, with a reason, and keep it for the interpreter (CPU)."""
    import torch
    from semfid._inputs import SubjectInputs
    from semfid.backends.triton import TritonBackend

    def inp(device, mean_heads):
        t = torch.empty(1, 2, 5, 8, device=device)
        tok = torch.zeros(1, 2, dtype=torch.int64, device=device)
        return SubjectInputs(t, t, t, t, None, None, tok, tok, None, 0.3, mean_heads, True, False)

    gpu_like = "meta"  # stands for a compiled (non-CPU) launch without needing a GPU
    assert any("head_reduce='none'" in r for r in TritonBackend.not_supported_reasons(inp(gpu_like, False)))
    assert not any("head_reduce='none'" in r for r in TritonBackend.not_supported_reasons(inp(gpu_like, True)))
    assert not any("head_reduce='none'" in r for r in TritonBackend.not_supported_reasons(inp("cpu", False)))


def test_compile_failure_is_reported():
    """An impossible request (no such arch) must fail loudly, not pass silently."""
    res = _run("--quick", "--dtypes", "fp16", "--head-dims", "64", "--arch", "1")
    assert res.returncode != 0
    assert "FAIL" in res.stdout


# ---- the autotuning policy (pure Python) ---------------------------------------------------------
def _utils():
    return importlib.import_module("semfid.kernels._utils")


def _named(dtype, block_n: int, n_bucket: int, head_dim: int = 80, **flags) -> dict:
    """The launch arguments the prune reads (head dim 80 and all-on flags: no measured exclusion)."""
    import torch

    mode = {**dict(HAS_V=True, HAS_SEL=True, MEAN_HEADS=True, HAS_DO=True, HAS_G=True), **flags}
    return {"Q": torch.empty(0, dtype=dtype, device="meta"), "BLOCK_N": block_n,
            "N_BUCKET": n_bucket, "HEAD_DIM": head_dim, **mode}


@pytest.mark.parametrize("backward", [False, True])
def test_prune_never_empty_and_within_config_space(backward):
    import torch

    U = _utils()
    space = {(c.kwargs["BLOCK_M"], c.num_warps) for c in U.autotune_configs()}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for block_n in (16, 32, 64, 128, 256):
            for n_bucket in (1, 16, 32, 64, 128, 1024, 4096):
                for head_dim in (40, 64, 80, 160, 256):
                    for flags in ({}, dict(HAS_V=False), dict(HAS_G=False)):
                        named = _named(dtype, block_n, n_bucket, head_dim, **flags)
                        kept = U.candidate_configs(named, backward)
                        assert kept, (dtype, block_n, n_bucket, head_dim, flags)
                        for c in kept:
                            assert (c.kwargs["BLOCK_M"], c.num_warps) in space
                            assert c.kwargs["BLOCK_M"] <= max(32, n_bucket)


def test_prune_keeps_the_sd_tiles_within_the_register_budget():
    """77 keys (BLOCK_N 128): fp16/bf16 get 32x4 and 64x8; fp32 (FMA dots) 32x8 in backward and
    16x8 in the forward with values (32x8 spills there under triton 3.8); the autotuner's hook is
    the same function the check calls."""
    import torch

    U = _utils()
    for backward in (False, True):
        fp32_tiles = {(32, 8)} if backward else {(16, 8)}
        for dtype, expected in ((torch.float16, {(32, 4), (64, 8)}), (torch.bfloat16, {(32, 4), (64, 8)}),
                                (torch.float32, fp32_tiles)):
            kept = U.candidate_configs(_named(dtype, 128, 4096), backward)
            assert {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept} == expected, (backward, dtype)
    fwd = importlib.import_module("semfid.kernels.xattn_fwd")
    assert fwd._xattn_fwd_kernel_tuned.early_config_prune is U.prune_fwd_configs


def test_measured_spill_exclusions_are_honoured():
    """Every entry of SPILL_EXCLUSIONS removes its config for its shape, in every query bucket."""
    U = _utils()
    assert U.SPILL_EXCLUSIONS
    for backward, dtype, head_dim, flags, config in U.SPILL_EXCLUSIONS:
        for n_bucket in (64, 256, 1024, 4096):
            kept = U.candidate_configs(_named(dtype, 128, n_bucket, head_dim, **flags), backward)
            assert kept and config not in {(c.kwargs["BLOCK_M"], c.num_warps) for c in kept}


# ---- grids and reproducibility (pure Python) -----------------------------------------------------
# (B, H, N, D, S) of the SD cross-attention layers at batch 2 (SD1.5 512 px, SDXL 1024 px).
SD_LAYERS = [(2, 8, 4096, 40, 2), (2, 8, 1024, 80, 2), (2, 8, 256, 160, 2), (2, 8, 64, 160, 2),
             (2, 10, 4096, 64, 2), (2, 20, 1024, 64, 2), (2, 8, 4096, 40, 77)]


def test_subject_grids_per_sd_shape():
    """Head-mean grids (one program per row block and batch item, looping over heads) reach 128+
    programs on the 4096- and 1024-query layers (132 SMs on an H100/H200); printed per shape."""
    import torch

    fwd = importlib.import_module("semfid.kernels.subject_fwd")
    C = importlib.import_module("semfid.kernels._common")
    for B, H, N, D, S in SD_LAYERS:
        q = torch.empty(B, H, N, D, dtype=torch.float16, device="meta")
        rows = []
        for mean in (True, False):
            block_m, warps = fwd.config(q, mean, S)
            gx, gy = fwd.grid(q, mean, block_m)
            rows.append(f"{'mean' if mean else 'per-head'} grid ({gx}, {gy}) = {gx * gy} programs "
                        f"(BLOCK_M {block_m}, {warps} warps)")
            if N >= 1024:
                assert gx * gy >= 128, (B, H, N, D, S, mean)
        splits, per_split = C.backward_splits(N, B * H)
        print(f"B={B} H={H} N={N} D={D} S={S}: " + "; ".join(rows)
              + f"; backward ({splits}, {B * H}) = {splits * B * H} programs")


def test_backward_splits_and_tiles_depend_on_shapes_only():
    """dk/dv bits depend on the splits and the tile order: both come from the shapes (no device,
    SM count or autotune run enters), and xattn's backward runs one fixed config per shape."""
    import inspect

    import torch

    C = importlib.import_module("semfid.kernels._common")
    sig = inspect.signature(C.backward_splits)
    assert list(sig.parameters) == ["num_queries", "batch_heads"]
    assert C.backward_splits(4096, 16) == C.backward_splits(4096, 16)
    for N in (1, 17, 130, 1024, 4096):
        splits, rows = C.backward_splits(N, 16)
        assert rows % C.BWD_ROW_GRANULE == 0 and (splits - 1) * rows < N <= splits * rows
    bwd = importlib.import_module("semfid.kernels.xattn_bwd")
    assert not hasattr(bwd, "_xattn_bwd_kernel_tuned")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        named = _named(dtype, 128, 4096)
        args = [named.get(n) for n in bwd._xattn_bwd_kernel.arg_names]
        cfg = bwd.fixed_config(args, {})
        kept = _utils().candidate_configs(named, True)
        assert cfg == kept[0], "the backward runs the policy's first config, never a tuned one"
    sub = importlib.import_module("semfid.kernels.subject_bwd")
    assert sub.config(torch.empty(1, 1, 1, 64, dtype=torch.float16), False, 1) == (32, 4)
    assert sub.config(torch.empty(1, 1, 1, 64, dtype=torch.float16), False, 2) == (32, 8)
