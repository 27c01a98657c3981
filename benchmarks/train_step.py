"""One whole UNet training step with SeFi-IDE's subject loss on every cross-attention layer.

Gradients flow to the text states (the UNet is frozen, as in SeFi-IDE, where only the tokens train).
Four ways of running the same step:

* ``semfid``    semfid's processors (``semfid.diffusers.install`` + ``ctl.subject_loss``);
* ``explicit``  an explicit-softmax processor that stores the maps of every cross-attention layer and
                computes the loss from them afterwards (Prompt-to-Prompt's AttentionStore /
                FastComposer style; ``unet_train_step.py``, on ``baselines.eager_*``);
* ``installed`` semfid's processors installed, no block active: the plain denoising step, which must
                cost what the floor costs (the stock math and kernels, ``install``'s promise);
* ``floor``     plain ``AttnProcessor2_0`` (SDPA) and no attention loss: the cost of the step itself.

``--models flux sd3``: the same step on the Flux.1-dev and SD3.5-medium transformers (the subject
loss in every joint layer, after semfid's one no-grad reference forward; ``explicit`` = full joint
softmaxes; ``floor`` = diffusers' own Flux / SD3 processors): ``dit_train_step.py``.

Reported: step time (median ± IQR), peak GPU memory, the bytes autograd saves for backward in one
step (``saved MiB``: deterministic, also on a CPU; not with ``--compile``), and the cost over the floor, as a
ratio of medians and paired (the median over rounds of step / the floor's step in the same round).
SD1.5 and SDXL; on CPU their structural twins (same layout, tiny widths) by default, on GPU the
full-size configs with random weights at 512 / 1024 px. Every round draws new reference states and
a new token list (same length), as a training loop does.

``--compile``: each variant gets its own copy of the UNet, set up once and wrapped in
``torch.compile(unet, fullgraph=True, mode=...)`` (``default``; on a GPU also ``reduce-overhead``,
CUDA graphs); the table adds how many graphs Dynamo compiled after each variant's first step
(``recompiles``: 0 is the goal — a training loop must not recompile when only tensor values change).

    python benchmarks/train_step.py                       # CPU: twins; GPU: full size, bf16
    python benchmarks/train_step.py --models sd15 --size full --res 256 --steps 3
    python benchmarks/train_step.py --compile             # compiled floor / explicit / semfid
    python benchmarks/train_step.py --models flux sd3     # the DiT twins (256 px, 512 / 333 text tokens)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _bench_utils import (  # noqa: E402
    MIB, SavedBytes, _summarize, environment, format_environment, load_average,
)
from unet_train_step import ExplicitSoftmaxStoreProcessor, MapStore, build_unet, unet_step_fields  # noqa: E402
from dit_train_step import (  # noqa: E402
    DIT_MODELS, TWIN_RES, build_dit, dit_prediction, dit_step_fields, explicit_joint, is_dit,
    stock_processor,
)

LOSS_WEIGHT = 0.003  # λ of SeFi-IDE (DESIGN.md §1)
NUM_TOKENS = 10
VARIANTS = ("semfid", "explicit", "installed", "floor")
MODELS = {  # name -> (full-size config, structural twin, pixel resolution of the full-size run)
    "sd15": ("sd15_unet", "sd15_unet_twin", 512),
    "sdxl": ("sdxl_unet", "sdxl_unet_twin", 1024),
    **DIT_MODELS,  # flux, sd3
}


# ------------------------------------------------------------------------------------------------
# model and inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class StepInputs:
    sample: torch.Tensor
    timestep: torch.Tensor
    key_states: torch.Tensor        # the trained text states: leaf, requires grad
    reference_states: torch.Tensor  # reference prompt, no grad
    noise: torch.Tensor
    tokens: torch.Tensor
    added_cond: Optional[dict]
    dit_kwargs: Optional[dict] = None  # Flux / SD3: the call's other arguments (dit_train_step.py)


def make_step_inputs(unet, batch: int, latent: int, device, dtype, seed: int = 0) -> StepInputs:
    if is_dit(unet):
        return StepInputs(**dit_step_fields(unet, batch, latent, device, dtype, seed), added_cond=None,
                          tokens=torch.arange(1, 1 + NUM_TOKENS, device=device))
    return StepInputs(**unet_step_fields(unet, batch, latent, device, dtype, seed), dit_kwargs=None,
                      tokens=torch.arange(1, 1 + NUM_TOKENS, device=device))


# ------------------------------------------------------------------------------------------------
# one step per variant
# ------------------------------------------------------------------------------------------------
def _denoise_loss(unet, x: StepInputs) -> torch.Tensor:
    if x.dit_kwargs is not None:
        pred = dit_prediction(unet, x)
    else:
        pred = unet(x.sample, x.timestep, encoder_hidden_states=x.key_states,
                    added_cond_kwargs=x.added_cond).sample
    return F.mse_loss(pred.float(), x.noise.float())


class Variant:
    """Sets its processors on the UNet (``setup``), runs one step, undoes itself (``teardown``).

    With ``compile_mode`` it owns a copy of the UNet instead, set up once and compiled
    (``torch.compile(copy, fullgraph=True, mode=compile_mode)``); setup / teardown do nothing then.
    """

    def __init__(self, name: str, unet, compile_mode: Optional[str] = None):
        self.name, self.unet = name, unet
        self.ctl = None
        self.store = MapStore()
        self.compile_mode = compile_mode
        self.model = unet
        if compile_mode is not None:
            self.unet = copy.deepcopy(unet)
            self._setup()
            self.model = torch.compile(self.unet, fullgraph=True, mode=compile_mode)

    def setup(self) -> None:
        if self.compile_mode is None:
            self._setup()

    def _setup(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor(stock_processor(self.unet))
        if self.name in ("semfid", "installed") or (self.name == "explicit" and is_dit(self.unet)):
            from semfid.diffusers import install

            self.ctl = install(self.unet)
        elif self.name == "explicit":
            procs = {}
            for key in self.unet.attn_processors:
                name = key[: -len(".processor")]
                procs[key] = (ExplicitSoftmaxStoreProcessor(self.store, name)
                              if name.endswith("attn2") else AttnProcessor2_0())
            self.unet.set_attn_processor(procs)

    def teardown(self) -> None:
        if self.compile_mode is None:
            self.close()

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.uninstall()
            self.ctl = None
        self.unet.set_attn_processor(stock_processor(self.unet))

    def step(self, x: StepInputs):
        """Forward + backward; returns (attention loss [B] or None, d key_states)."""
        attn_loss = None
        if self.name == "semfid" or (self.name == "explicit" and is_dit(self.unet)):
            explicit = explicit_joint(self.unet) if self.name == "explicit" else contextlib.nullcontext()
            with explicit, self.ctl.subject_loss(x.reference_states, x.tokens) as rec:
                denoise = _denoise_loss(self.model, x)
            attn_loss = rec.loss
        elif self.name == "explicit":
            self.store.tokens, self.store.reference_states = x.tokens, x.reference_states
            self.store.maps.clear()
            try:
                denoise = _denoise_loss(self.model, x)
            finally:
                self.store.tokens = self.store.reference_states = None
            attn_loss = self.store.loss()
            self.store.maps.clear()
        else:
            denoise = _denoise_loss(self.model, x)
        total = denoise if attn_loss is None else denoise + LOSS_WEIGHT * attn_loss.mean()
        (grad,) = torch.autograd.grad(total, x.key_states)
        return (None if attn_loss is None else attn_loss.detach()), grad


def refresh_step_values(x: StepInputs, gen: torch.Generator) -> None:
    """New reference states and a new token list of the same length, as each training step has."""
    x.reference_states = torch.randn(x.reference_states.shape, generator=gen).to(x.reference_states)
    x.tokens = (1 + torch.randperm(x.key_states.shape[1] - 1, generator=gen)[:NUM_TOKENS]).to(x.tokens.device)


def compiled_graphs() -> int:
    """Graphs Dynamo compiled so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_model(model: str, size: str, res: Optional[int], batch: int, device, dtype, steps: int,
              warmup: int, variants: List[str], log=print, compile_mode: Optional[str] = None) -> List[dict]:
    full_name, twin_name, full_res = MODELS[model]
    config_name = full_name if size == "full" else twin_name
    t0 = time.perf_counter()
    unet = (build_dit if model in DIT_MODELS else build_unet)(config_name, device, dtype)
    if res is None:
        twin_res = TWIN_RES if model in DIT_MODELS else unet.config.sample_size * 8
        res = full_res if size == "full" else twin_res
    latent = res // 8
    x = make_step_inputs(unet, batch, latent, device, dtype)
    n_params = sum(p.numel() for p in unet.parameters())
    compiled = "" if compile_mode is None else f", torch.compile(fullgraph=True, mode={compile_mode!r})"
    log(f"\n{model} ({config_name}, {n_params / 1e6:.1f} M params, built in {time.perf_counter() - t0:.1f} s): "
        f"{res} px (latent {latent}x{latent}), batch {batch}, {str(dtype).replace('torch.', '')}{compiled}")

    rows, losses, grads, samples, peaks, recompiles, saved = [], {}, {}, {}, {}, {}, {}
    live: List[Variant] = []
    for name in variants:  # first step of each: warm-up, and the loss/gradient compared below
        t0 = time.perf_counter()
        variant = None
        try:
            variant = Variant(name, unet, compile_mode)
            variant.setup()
            with SavedBytes() if compile_mode is None else contextlib.nullcontext() as counter:
                losses[name], grads[name] = variant.step(x)
            saved[name] = None if counter is None else counter.mib
            live.append(variant)
            samples[name], recompiles[name] = [], 0
            if compile_mode is not None:
                log(f"  {name}: first (compiling) step {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            log(f"  {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            if variant is not None:
                variant.close()
        finally:
            if variant is not None:
                variant.teardown()

    # Round-robin over the variants, so load from other processes hits all of them alike.
    gen = torch.Generator().manual_seed(1)
    for rep in range(max(0, warmup - 1) + steps):
        refresh_step_values(x, gen)
        for variant in live:
            variant.setup()
            try:
                graphs = compiled_graphs()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                variant.step(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= max(0, warmup - 1):
                    samples[variant.name].append((time.perf_counter() - t0) * 1e3)
                recompiles[variant.name] += compiled_graphs() - graphs
            finally:
                variant.teardown()
    if device.type == "cuda":
        for variant in live:
            variant.setup()
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                variant.step(x)
                torch.cuda.synchronize()
                peaks[variant.name] = torch.cuda.max_memory_allocated() / MIB
            finally:
                variant.teardown()

    for variant in live:
        timing = _summarize(samples[variant.name])
        peak = peaks.get(variant.name)
        rows.append({"model": model, "config": config_name, "variant": variant.name, "res": res,
                     "batch": batch, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                     "ms_median": round(timing.median_ms, 3), "ms_iqr": round(timing.iqr_ms, 3),
                     "steps": timing.reps, "peak_mib": None if peak is None else round(peak, 1),
                     "saved_mib": None if saved[variant.name] is None else round(saved[variant.name], 2),
                     "compile": compile_mode,
                     "recompiles": None if compile_mode is None else recompiles[variant.name]})

    floor = next((r for r in rows if r["variant"] == "floor"), None)
    for r in rows:
        r["overhead_vs_floor_pct"] = (None if floor is None
                                      else round(100 * (r["ms_median"] / floor["ms_median"] - 1), 1))
        # Paired: the median over rounds of this variant's step over the floor's step of the same
        # round (neighbours in time), so load that drifts during the run cancels out.
        paired = None
        if floor is not None and samples.get("floor"):
            pairs = [t / f for t, f in zip(samples[r["variant"]], samples["floor"])]
            paired = round(100 * (statistics.median(pairs) - 1), 1) if pairs else None
        r["paired_overhead_vs_floor_pct"] = paired
    if "semfid" in losses and "explicit" in losses:
        # Same weights, same inputs: both variants compute the same loss and gradients.
        a, b = losses["semfid"].float(), losses["explicit"].float()
        loss_rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        grad_rel = float((grads["semfid"].float() - grads["explicit"].float()).abs().max()
                         / grads["explicit"].float().abs().max().clamp_min(1e-30))
        log(f"  semfid vs explicit: attention loss rel. diff {loss_rel:.2e}, "
            f"text-state grad rel. diff {grad_rel:.2e}")
        for r in rows:
            r["loss_rel_diff_vs_explicit"] = round(loss_rel, 8) if r["variant"] == "semfid" else None
    for variant in live:
        variant.close()
    del unet, x, live
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_rows(rows: List[dict]) -> str:
    header = ["model", "config", "res", "B", "dtype", "compile", "variant", "step ms (median±IQR)",
              "peak MiB", "saved MiB", "loss cost vs floor", "paired", "recompiles"]
    table = [[r["model"], r["config"], str(r["res"]), str(r["batch"]), r["dtype"], r.get("compile") or "-",
              r["variant"],
              f"{r['ms_median']:.1f}±{r['ms_iqr']:.1f}",
              "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}",
              "-" if r.get("saved_mib") is None else f"{r['saved_mib']:.1f}",
              "-" if r["overhead_vs_floor_pct"] is None or r["variant"] == "floor"
              else f"{r['overhead_vs_floor_pct']:+.1f}%",
              "-" if r.get("paired_overhead_vs_floor_pct") is None or r["variant"] == "floor"
              else f"{r['paired_overhead_vs_floor_pct']:+.1f}%",
              "-" if r.get("recompiles") is None else str(r["recompiles"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(t) for t in table])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd15", "sdxl"])
    p.add_argument("--size", choices=["twin", "full"], default=None,
                   help="full-size config or its structural twin (default: full on GPU, twin on CPU)")
    p.add_argument("--res", type=int, default=None,
                   help="image resolution in pixels (default: 512 / 1024 full size, the twin's own)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: bfloat16 on GPU (random weights overflow fp16 less), float32 on CPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile'd variants (each on its own UNet copy, fullgraph=True)")
    p.add_argument("--compile-modes", nargs="+", default=None,
                   choices=["eager", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile modes, each a run of its own ('eager': not compiled); default "
                        "with --compile: 'default', on a GPU also 'reduce-overhead' (CUDA graphs)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import diffusers

        import semfid.diffusers  # noqa: F401
    except ImportError as exc:
        print(f"train_step skipped: {exc} (pip install 'semfid[diffusers]')")
        return 3
    diffusers.utils.logging.set_verbosity_error()  # its fp16-cast advice is about from_pretrained
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but this torch sees no CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    size = args.size or ("full" if device.type == "cuda" else "twin")
    env = environment(device)
    print("semfid train_step: UNet / DiT step, subject loss on every layer attending to the text, "
          "grads to the text states")
    print(format_environment(env))
    modes: List[Optional[str]] = [None]
    if args.compile or args.compile_modes:
        modes = [None if m == "eager" else m for m in args.compile_modes or (
            ["default", "reduce-overhead"] if device.type == "cuda" else ["default"])]
    rows: List[dict] = []
    for model in args.models:
        for mode in modes:
            done = run_model(model, size, args.res, args.batch, device, dtype, args.steps, args.warmup,
                             args.variants, compile_mode=mode)
            if len(args.models) * len(modes) > 1:  # each model's table as soon as it is measured
                print(format_rows(done), flush=True)
            rows += done
    print()
    print(format_rows(rows))
    print(f"medians of {args.steps} interleaved steps per variant (paired: median over rounds of "
          f"step / the floor's step in the same round); {load_average()} at the end "
          f"(load average {env['load_avg_1m']} at the start)")
    machine = env.get("gpu") or f"CPU: {env['cpu']} ({env['cpu_count']} cores)"
    if device.type == "cuda" and size == "full":
        for r in rows:
            if r["variant"] == "semfid" and r["overhead_vs_floor_pct"] is not None:
                ok = "met" if r["overhead_vs_floor_pct"] <= 10 else "NOT met"
                print(f"target (loss cost ≤ 10% over the floor), {r['model']}: {ok} "
                      f"({r['overhead_vs_floor_pct']:+.1f}%)")
    if args.json:
        for r in rows:
            r.update(machine=machine, date_utc=env["date_utc"], torch=env["torch"],
                     load_avg_1m=env["load_avg_1m"],
                     load_avg_1m_end=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
