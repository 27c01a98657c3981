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


# ---- the key-blocked kernels (joint key sets) ------------------------------------------------------
@pytest.mark.slow
def test_key_blocked_subject_kernels_compile_without_spills():
    """The heaviest key-blocked launches (the subject op with the reference's gradient, Flux's head
    dim 128; cross-attention at S = 77): forward, per-row prep, dq and both dk/dv passes, sm_90 fp16."""
    res = _run("--dtypes", "fp16", "--arch", "90", "--head-dims", "", "--joint-head-dims", "128",
               "--only", "( joint_subj_ref S=4 | joint_xattn +S=77)")
    lines = [line for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL"))]
    for part in ("fwd ", "bwd_prep", "bwd_dq", "bwd_dkdv"):
        for mode in ("joint_subj_ref S=4 ", "joint_xattn    S=77"):
            assert any(part in line and mode in line for line in lines), (part, mode, res.stdout[-3000:])
    assert not [line for line in lines if line.startswith("FAIL") or "SPILLS" in line], "\n".join(lines)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _flux_layer(dtype_name: str = "float16"):
    import torch

    cj = importlib.import_module("semfid.kernels.compile_joint")
    return cj._tensors(128, {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype_name], 4)


def test_key_blocked_grids_fill_132_sms_on_a_flux_layer():
    """B = 1, 24 heads, 4608 queries and keys: every pass has one program per (tile, head), well
    over 132 programs; tiles come from the shapes only (no autotuning, no SM count)."""
    import torch

    fwd = importlib.import_module("semfid.kernels.joint_fwd")
    bwd = importlib.import_module("semfid.kernels.joint_bwd")
    q, k, v, k_ref, bias, ref_bias, tok = _flux_layer()
    rows, seg = (512, 4608), (0, 512)
    out, lse = fwd.allocate(q, v)
    a_t = torch.empty(1, 24, rows[1] - rows[0], 4, device="meta")
    _, _, grid, _ = fwd.launch(q, k, v, bias, tok, 0.1, rows, out, lse, a_t, k_ref, ref_bias, tok, seg,
                               torch.empty_like(lse), a_t)
    assert grid[0] * grid[1] >= 132 * 8, grid
    grads = [torch.empty_like(t) for t in (q, k, v, k_ref)]
    launches = bwd.launches(q, k, v, bias, tok, 0.1, rows, lse, out, torch.empty_like(out), None, *grads[:3],
                            k_ref=k_ref, ref_bias=ref_bias, ref_tokens=tok, segment=seg, lse_ref=lse,
                            diff=lse.new_empty(0), dloss=torch.empty(1, device="meta"), mean_heads=False,
                            detach_reference=False, dk_ref=grads[3])
    names = [kernel.__name__ for kernel, *_ in launches]
    assert names == ["_joint_bwd_prep_kernel", "_joint_bwd_dq_kernel", "_joint_bwd_dkdv_kernel",
                     "_joint_bwd_dkdv_kernel"]
    for kernel, grid, *_ in launches[:3]:
        assert grid[0] * grid[1] >= 132, (kernel.__name__, grid)
    # the dk/dv pass: one program per key block of each class (outside / segment), no partials
    _, block_n, _ = importlib.import_module("semfid.kernels._joint").tiles(torch.float16, 128, 4, backward=True)
    assert launches[2][1] == (512 // block_n + 4096 // block_n, 24)
    assert launches[3][1] == (512 // block_n, 24)  # k_ref's blocks


def test_key_blocked_routing_and_reasons():
    """Long keys, map_queries or ref_segment take the key-blocked kernels (per-head subject maps
    included: they do not spill there); their head-dim limit is a reason; the UNet's 77 keys stay
    on the one-pass kernels."""
    import dataclasses

    import torch
    from semfid._inputs import SubjectInputs, XattnInputs
    from semfid.backends import triton as adapter

    def subject(M, M_ref, rows=None, seg=None, D=64, mean=False):
        q = torch.empty(1, 2, 40, D, device="meta")
        k, k_ref = torch.empty(1, 2, M, D, device="meta"), torch.empty(1, 2, M_ref, D, device="meta")
        tok = torch.zeros(1, 2, dtype=torch.int64, device="meta")
        return SubjectInputs(q, k, k, k_ref, None, None, tok, tok, None, 0.3, mean, True, False,
                             map_start=rows[0] if rows else 0, map_stop=rows[1] if rows else None,
                             seg_start=seg[0] if seg else 0, seg_stop=seg[1] if seg else None)

    def reasons(inp):  # meta tensors stand for a compiled (GPU) launch: drop the device line
        return [r for r in adapter.TritonBackend.not_supported_reasons(inp) if not r.startswith("device=")]

    assert not adapter._key_blocked(subject(77, 77))
    assert any("head_reduce='none'" in r for r in reasons(subject(77, 77)))
    for inp in (subject(300, 7), subject(7, 300), subject(60, 20, rows=(20, 40), seg=(0, 20))):
        assert adapter._key_blocked(inp) and reasons(inp) == [], reasons(inp)
    assert any("head_dim=160 > 128" in r for r in reasons(subject(300, 7, D=160)))
    many = subject(300, 7)
    many = dataclasses.replace(many, tokens=torch.zeros(1, 33, dtype=torch.int64, device="meta"),
                               ref_tokens=torch.zeros(1, 33, dtype=torch.int64, device="meta"))
    assert any("num_selected=33 > 32 tokens" in r for r in reasons(many))
    q = torch.empty(1, 2, 40, 72, device="meta")
    k = torch.empty(1, 2, 300, 72, device="meta")
    xin = XattnInputs(q, k, k, None, None, 0.2, True)
    assert adapter._key_blocked(xin) and reasons(xin) == []
