"""CPU smoke tests of benchmarks/: the baselines are right, the reference gate rejects wrong code,
and a tiny attn_speed run writes complete JSON records. No timing asserts."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from semfid.backends import torch as torch_backend

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH_DIR)

import attn_gate  # noqa: E402
import attn_launches  # noqa: E402
import attn_speed  # noqa: E402
import attn_timing  # noqa: E402
import baselines  # noqa: E402
from attn_cases import make_inputs, mode_call  # noqa: E402

CPU = torch.device("cpu")

# torch.compile on a 2-core CPU takes minutes: the compiled baselines (eager_compiled is the eager
# code; flex_attention has no CPU backward) are left out here, as in --quick.
CPU_BASELINES = [b for b in baselines.baseline_implementations()
                 if b.unavailable(CPU, torch.float32) is None and not b.compiles]


@pytest.mark.parametrize("impl", CPU_BASELINES + [attn_speed.semfid_implementation("auto")],
                         ids=lambda i: i.name)
@pytest.mark.parametrize("mode", baselines.MODES)
def test_implementation_matches_float64_reference(impl, mode):
    if impl.function(mode) is None:
        pytest.skip(f"{impl.name} has no {mode} mode")
    assert attn_speed.check_implementation(impl, mode, CPU, torch.float32) is None


def _wrong_scale_forward(q, k, v, scale):
    return baselines.eager_forward(q, k, v, scale * 1.5)


def _maps_summed_over_heads(q, k, v, tokens, scale):
    p = baselines.eager_probabilities(q, k, scale)
    return torch.matmul(p, v), p.index_select(-1, tokens).float().sum(dim=1)


def _loss_without_gradient(q, k, v, k_ref, tokens, scale):
    out, loss = baselines.eager_subject(q, k, v, k_ref, tokens, scale)
    return out, loss.detach()


@pytest.mark.parametrize("mode,wrong", [
    ("forward", dict(forward=_wrong_scale_forward)),
    ("forward_maps", dict(forward_maps=_maps_summed_over_heads)),
    ("subject_fwd_bwd", dict(subject=_loss_without_gradient)),
], ids=["wrong_scale", "maps_not_averaged", "loss_detached"])
def test_reference_check_rejects_wrong_implementation(mode, wrong):
    impl = dataclasses.replace(baselines.BASELINES["eager"], name="wrong", **wrong)
    problem = attn_speed.check_implementation(impl, mode, CPU, torch.float32)
    assert problem is not None and problem.startswith(("wrong result", "failed"))


def test_wrong_implementation_is_reported_and_never_timed():
    wrong = dataclasses.replace(baselines.BASELINES["eager"], name="wrong",
                                forward=_wrong_scale_forward)
    shape = attn_speed.SHAPES_BY_NAME["sd15_8"]
    results, skipped = attn_timing.run_benchmarks(
        [shape], [1], ["forward"], [wrong, baselines.BASELINES["eager"]], CPU, torch.float32,
        budget_s=0.0, compile_budget_s=0.0, copy_gbs=None, show_progress=False, log=lambda *a: None)
    assert [r.impl for r in results] == ["eager"]
    assert "REJECTED" in skipped["wrong/forward"]


def test_tiny_run_writes_complete_json_records(tmp_path, capsys):
    path = tmp_path / "records.json"
    argv = ["--quick", "--cases", "sd15_8", "--batch", "1", "--impl", "semfid", "eager",
            "sdpa_lse", "--budget-s", "0", "--no-progress", "--json", str(path)]
    assert attn_speed.main(argv) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "speedup of semfid" in text
    recs = json.loads(path.read_text())
    # semfid and eager in 3 modes, sdpa_lse in the 2 forward modes
    assert len(recs) == 8
    for rec in recs:
        assert set(attn_speed.RECORD_FIELDS) <= set(rec)
        assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["batch"] == 1
        assert rec["ms_median"] > 0 and rec["ms_iqr"] >= 0
        assert rec["peak_mib"] is None  # GPU only
        assert (rec["saved_mib"] is not None) == (rec["mode"] == "subject_fwd_bwd")
    assert {(r["impl"], r["mode"]) for r in recs} >= {("semfid", "subject_fwd_bwd"),
                                                     ("eager", "forward_maps")}


def test_saved_bytes_counts_each_storage_once():
    from _bench_utils import SavedBytes

    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    with SavedBytes() as counter:
        # mul saves x and its view x.t() (one storage); sin saves its input (a second storage)
        y = (x * x.t()).sum() + (x * 2).sin().sum()
    assert counter.nbytes == 2 * x.numel() * 4
    del y


def test_compiled_baselines_declare_a_compile_budget():
    compiled = {b.name for b in baselines.baseline_implementations() if b.compiles}
    assert {"eager_compiled", "flex_attention"} <= compiled
    assert not baselines.BASELINES["eager"].compiles


def test_compile_budget_stops_a_compiling_implementation():
    """A spent budget (override 0 s) skips the compiling implementation per case, not the others."""
    slow = dataclasses.replace(baselines.BASELINES["eager"], name="slow_compiler", compile_budget_s=60.0)
    shape = attn_speed.SHAPES_BY_NAME["sd15_8"]
    results, skipped = attn_timing.run_benchmarks(
        [shape], [1], ["forward"], [slow, baselines.BASELINES["eager"]], CPU, torch.float32,
        budget_s=0.0, compile_budget_s=0.0, show_progress=False, log=lambda *a: None)
    assert [r.impl for r in results] == ["eager"]
    assert "compile time budget spent" in skipped["slow_compiler/forward (some cases)"]


def test_not_implemented_is_reported_as_unsupported_not_wrong():
    def no_backward(q, k, v, k_ref, tokens, scale):
        raise NotImplementedError("no backward on this device")

    impl = dataclasses.replace(baselines.BASELINES["eager"], name="nobwd", subject=no_backward)
    problem = attn_gate.check_implementation(impl, "subject_fwd_bwd", CPU, torch.float32)
    assert problem.startswith(attn_gate.UNSUPPORTED) and "no backward" in problem


def _one_subject_call(impl):
    x = make_inputs(batch=2, n_q=33, heads=2, head_dim=8, device=CPU, dtype=torch.float32)
    return mode_call(impl, "subject_fwd_bwd", x)


def test_launch_counter_sees_kernels_not_views():
    def two_kernels():
        x = torch.randn(4, 5)  # randn: one kernel (counted: the mode is entered before)
        y = x.t().contiguous()  # t: a view (not counted); contiguous: one copy kernel
        return y.view(-1)      # view: not counted

    seen = attn_launches.observe(two_kernels)
    assert seen.launches == 2, seen.kernels
    assert seen.bytes == 3 * 4 * 5 * 4  # randn writes x; the copy reads x and writes y


def test_launch_counter_opens_semfid_ops_and_counts_baselines(monkeypatch):
    # the shape is small enough for the CPU core's plain loops, which no dispatch mode sees
    monkeypatch.setattr(torch_backend, "_SMALL_WORK", 0)
    floor = attn_launches.observe(_one_subject_call(baselines.BASELINES["sdpa_floor"]))
    eager = attn_launches.observe(_one_subject_call(baselines.BASELINES["eager"]))
    ours = attn_launches.observe(_one_subject_call(attn_speed.semfid_implementation("torch")))
    assert 0 < floor.launches < eager.launches
    # the torch backend's body (matmuls, exp, ...) is seen, not one opaque semfid op
    assert not any(k.startswith("semfid") for k in ours.kernels) and ours.launches > 5
    assert floor.bytes > 0 and eager.bytes > floor.bytes


@pytest.mark.slow
def test_triton_path_is_counted_in_an_interpreter_child():
    """The child mechanism, on the maps op every Triton build has."""
    got = attn_launches.triton_path(["sd15_8"], 1, torch.float32, mode="forward_maps")
    assert "error" not in got, got
    assert got["kernels"].get("triton._xattn_fwd_kernel") == 1
    assert got["recording_changes_count"] is False
    case = got["cases"]["sd15_8"]
    assert case["launches"] == sum(case["kernels"].values()) and case["bytes"] > 0


@pytest.mark.slow
def test_triton_subject_path_is_counted_when_the_backend_has_it():
    got = attn_launches.triton_path(["sd15_8"], 1, torch.float32)
    if "error" in got and "cannot run them" in got["error"]:
        pytest.skip(f"the triton backend cannot run the subject op here: {got['error']}")
    assert "error" not in got, got
    assert any(k.startswith("triton.") for k in got["kernels"])
    assert got["recording_changes_count"] is False


@pytest.mark.slow
def test_train_step_smoke_reports_overhead_and_load(tmp_path, capsys):
    pytest.importorskip("diffusers")
    import train_step

    path = tmp_path / "steps.json"
    argv = ["--models", "sd15", "--steps", "1", "--warmup", "1", "--variants", "semfid", "floor",
            "--json", str(path)]
    assert train_step.main(argv) == 0
    text = capsys.readouterr().out
    assert "interleaved" in text and "load average" in text
    rows = {r["variant"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"semfid", "floor"}
    assert rows["floor"]["overhead_vs_floor_pct"] == 0.0
    assert rows["floor"]["paired_overhead_vs_floor_pct"] == 0.0
    assert rows["semfid"]["paired_overhead_vs_floor_pct"] is not None
    assert rows["semfid"]["ms_median"] > 0 and rows["semfid"]["load_avg_1m_end"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_train_step_runs_the_dit_twins(tmp_path, capsys, model):
    """--models flux / sd3: the same variants and JSON as the UNets; the fused loss equals the
    explicit joint softmax's, and installed-without-a-block saves exactly what the stock step saves."""
    pytest.importorskip("diffusers")
    import train_step

    path = tmp_path / "steps.json"
    threads = torch.get_num_threads()
    try:
        argv = ["--models", model, "--res", "64", "--batch", "1", "--steps", "1", "--warmup", "1",
                "--threads", "1", "--json", str(path)]
        assert train_step.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "FAILED" not in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"semfid", "explicit", "installed", "floor"}
    assert rows["semfid"]["loss_rel_diff_vs_explicit"] < 1e-4
    saved = {v: r["saved_mib"] for v, r in rows.items()}
    assert saved["installed"] == saved["floor"] < saved["semfid"] < saved["explicit"]
    assert rows["installed"]["paired_overhead_vs_floor_pct"] is not None
