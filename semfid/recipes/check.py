"""``python -m semfid.recipes.check --diffusers DIR``: run every recipe on diffusers' real example scripts.

For each supported script of a diffusers checkout: the stock script, the stock script with only
``install(unet)`` (``install(transformer)`` for Flux / SD3) added, and the copy ``semfid-recipe``
writes (the very function behind the command) run a few steps on tiny random pipelines
(``semfid-tiny-pipeline``), on the CPU, offline. Checked:

- installed with no block == stock, bit for bit (the saved LoRA / learned embedding);
- the recipe with ``--semfid_weight 0`` == stock, bit for bit;
- the recipe on: a finite, non-zero subject loss at every step (textual inversion: from the second;
  its placeholder starts as the initializer token, so the first loss is exactly 0), and the trained
  weights (the LoRA weights of ``to_k`` / ``to_v``; the learned embedding) differ from the weight-0
  run's;
- with gradient checkpointing == without, bit for bit; prior preservation, ``--train_text_encoder``,
  ``--caption_column``, bf16 mixed precision run with a finite non-zero subject loss;
- a mistyped identifier and ``--pre_compute_text_embeddings`` are refused, naming them;
- the saved weights reload into a fresh pipeline.

The scripts need torchvision, peft (and datasets for ``--caption_column``) besides diffusers;
``--python`` names the interpreter that runs them (default: this one). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .patcher import apply_recipe, apply_steps
from .patches import RECIPES, Step

_LOSS_LINE = re.compile(r"semfid subject loss (\S+) \(weight")
_IDENTIFIER, _CLASS = "sks", "dog"
_INSTANCE, _CLASS_PROMPT = f"a photo of {_IDENTIFIER} {_CLASS}", f"a photo of {_CLASS}"
#: the line that installs semfid with no block, after the recipe's set-up anchor ("installed" runs)
_INSTALL_ONLY = "__import__('semfid.diffusers', fromlist=['install']).install({model})"
#: the tiny pipeline each script trains
_PIPELINE = {"textual-inversion": "sd15", "dreambooth-lora": "sd15", "dreambooth-lora-sdxl": "sdxl",
             "dreambooth-lora-flux": "flux", "dreambooth-lora-sd3": "sd3"}


@dataclass
class Run:
    """One run of one script: its command line, exit status, subject losses and output folder."""

    name: str
    rc: int
    out: Path
    losses: List[float]
    log: str
    seconds: float


@dataclass
class Row:
    kind: str
    variant: str
    ok: bool
    detail: str
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    status: str = ""  # "n/a" when this environment cannot run the variant; else pass / FAIL from ok


def _fixtures(work: Path, kinds: Sequence[str]) -> Dict[str, Path]:
    """Tiny pipelines (those ``kinds`` train), two instance and two class images, a caption dataset."""
    import numpy as np
    from PIL import Image

    from ..sefi.tiny import build_tiny_pipeline
    from ..testing.tiny_dit import build_tiny_dit_pipeline

    paths = {_PIPELINE[k]: work / f"tiny-{_PIPELINE[k]}" for k in kinds}
    for kind, path in paths.items():
        if not (path / "model_index.json").exists():
            (build_tiny_pipeline if kind in ("sd15", "sdxl") else build_tiny_dit_pipeline)(kind, path)
    rng = np.random.default_rng(0)
    for name in ("instance", "class", "captions"):
        (work / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(work / name / f"{i}.png")
    captions = [f"a photo of {_IDENTIFIER} {_CLASS} on the beach", f"a {_IDENTIFIER} {_CLASS} sitting in the park"]
    (work / "captions" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n" for i, c in enumerate(captions)))
    return {**paths, "instance": work / "instance", "class": work / "class", "captions": work / "captions"}


def _base_args(kind: str, fx: Dict[str, Path], steps: int) -> List[str]:
    common = ["--resolution", "64", "--train_batch_size", "1", "--max_train_steps", str(steps), "--seed", "0",
              "--checkpointing_steps", "100000", "--report_to", "tensorboard"]
    if kind == "textual-inversion":
        return common + ["--pretrained_model_name_or_path", str(fx["sd15"]), "--train_data_dir", str(fx["instance"]),
                         "--placeholder_token", "<sks>", "--initializer_token", _CLASS, "--save_steps", "100000",
                         "--learning_rate", "0.01"]
    dit = ["--max_sequence_length", "32"] if RECIPES[kind].model == "transformer" else []
    return common + dit + ["--pretrained_model_name_or_path", str(fx[_PIPELINE[kind]]), "--instance_data_dir",
                           str(fx["instance"]), "--instance_prompt", _INSTANCE, "--class_prompt", _CLASS_PROMPT,
                           "--rank", "4", "--learning_rate", "0.001"]


def _prior(fx: Dict[str, Path]) -> List[str]:
    return ["--with_prior_preservation", "--class_data_dir", str(fx["class"]), "--num_class_images", "2"]


def _run(python: str, script: Path, args: Sequence[str], out: Path, name: str, reuse: bool = False) -> Run:
    record = out.parent / f"{name}.json"
    if reuse and record.exists():
        saved = json.loads(record.read_text())
        if saved["argv"] == [str(script), *args]:
            return Run(name, saved["rc"], out, saved["losses"], saved["log"], saved["seconds"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.run([python, str(script), *args, "--output_dir", str(out)], cwd=script.parent, env=env,
                          capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    losses = [float(m) for m in _LOSS_LINE.findall(log)]
    result = Run(name, proc.returncode, out, losses, log, time.perf_counter() - start)
    record.write_text(json.dumps({"argv": [str(script), *args], "rc": result.rc, "losses": losses,
                                  "log": log[-20000:], "seconds": result.seconds}))
    return result


def _weights(run: Run) -> Dict[str, "object"]:
    from safetensors.torch import load_file

    files = sorted(run.out.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{run.name}: no .safetensors in {run.out}")
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def _same(a: Run, b: Run) -> str:
    """'' when both runs saved bit-identical weights, else what differs."""
    import torch

    wa, wb = _weights(a), _weights(b)
    if wa.keys() != wb.keys():
        return f"different tensors saved ({len(wa)} vs {len(wb)})"
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    return f"{len(diff)}/{len(wa)} tensors differ (first: {diff[0]})" if diff else ""


def _changed(on: Run, off: Run, kind: str) -> str:
    """How many of the to_k / to_v (joint blocks: and add_k_proj) LoRA tensors (or the embedding) the
    subject loss changed."""
    import torch

    w_on, w_off = _weights(on), _weights(off)
    keys = [k for k in w_on if kind == "textual-inversion"
            or re.search(r"\.(to_[kv]|add_k_proj)\.lora[._](A|B|down|up)\.", k)]
    moved = [k for k in keys if not torch.equal(w_on[k], w_off[k])]
    what = ("learned embedding" if kind == "textual-inversion" else
            "to_k/to_v/add_k_proj LoRA tensors" if RECIPES[kind].model == "transformer" else "to_k/to_v LoRA tensors")
    return f"{len(moved)}/{len(keys)} {what} changed by the loss"


def _reload(run: Run, kind: str, fx: Dict[str, Path]) -> str:
    """'' when the saved weights load into a fresh pipeline (and equal the file), else why not."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(fx[_PIPELINE[kind]])
    if kind == "textual-inversion":
        pipe.load_textual_inversion(str(run.out / "learned_embeds.safetensors"), token="<sks>")
        saved = _weights(run)["learned_embeds.safetensors:<sks>"]
        emb = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
        return "" if torch.equal(emb, saved.reshape(emb.shape).to(emb.dtype)) else "reloaded embedding differs"
    pipe.load_lora_weights(str(run.out), weight_name="pytorch_lora_weights.safetensors")
    model = RECIPES[kind].model
    params = dict(getattr(pipe, model).named_parameters())
    saved = {k: v for k, v in _weights(run).items() if f":{model}." in k}
    loaded = {re.sub(r"\.lora_([AB])\.[^.]+\.", r".lora_\1.", n): p for n, p in params.items() if ".lora_" in n}
    bad = 0
    for key, value in saved.items():
        name = key.split(f":{model}.", 1)[1].replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        bad += not (name in loaded and torch.equal(loaded[name].detach().to(value.dtype), value))
    return f"{bad}/{len(saved)} {model} LoRA tensors not reloaded as saved" if bad or not saved else ""


def _not_here(run: Run) -> str:
    """Why this environment cannot run the variant at all ('' when it can)."""
    found = re.search(r"The version of PEFT you are using is not compatible, please use a version >= ([0-9][0-9A-Za-z.]*)", run.log)
    return f"n/a here: transformers needs peft>={found.group(1)} for text-encoder LoRA" if found else ""


def _loss_ok(run: Run, steps: int, kind: str) -> str:
    """'' when the run logged a finite subject loss at every step, positive where it must be.

    Textual inversion starts the placeholder at the initializer token's embedding, so at the first
    step target and reference prompts encode alike and the loss is exactly 0; from the second on > 0.
    """
    if run.rc != 0:
        return f"exit {run.rc}: {_tail(run.log)}"
    if len(run.losses) != steps:
        return f"{len(run.losses)} subject losses logged for {steps} steps"
    first = 1 if kind == "textual-inversion" else 0
    if not all(math.isfinite(x) and x >= 0 for x in run.losses) or not all(x > 0 for x in run.losses[first:]):
        return f"subject loss not finite, or not positive from step {first}: {run.losses}"
    return ""


def _tail(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip() and "Warning" not in ln]
    return " | ".join(lines[-2:])[-300:]


def check_script(kind: str, diffusers: Path, work: Path, fx: Dict[str, Path], python: str, steps: int,
                 bf16: bool, reuse: bool = False) -> List[Row]:
    """Every variant of one script (see the module docstring), as table rows."""
    recipe = RECIPES[kind]
    stock_src = (diffusers / recipe.script).read_text()
    folder = work / kind
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {"stock": stock_src, "recipe": apply_recipe(kind, stock_src, recipe.script)}
    setup = next(s for s in recipe.steps
                 if s.action == "after" and s.anchor.startswith(("unet.add", "transformer.add", "placeholder")))
    scripts["installed"] = apply_steps([Step("after", setup.anchor, (_INSTALL_ONLY.format(model=recipe.model),))],
                                       stock_src, recipe.script, kind)
    for name, text in scripts.items():
        (folder / f"{name}.py").write_text(text)
    base = _base_args(kind, fx, steps)
    runs: Dict[str, Run] = {}

    def run(name: str, script: str, extra: Sequence[str] = ()) -> Run:
        args = list(base)
        if "--dataset_name" in extra:  # the images come from the caption dataset instead
            i = args.index("--instance_data_dir")
            del args[i:i + 2]
        runs[name] = _run(python, folder / f"{script}.py", [*args, *extra], folder / "runs" / name, name, reuse)
        return runs[name]

    rows: List[Row] = []

    def row(variant: str, detail: str, r: Run, ok: Optional[bool] = None) -> None:
        rows.append(Row(kind, variant, (not detail) if ok is None else ok, detail or "ok", r.losses, r.seconds))

    stock = run("stock", "stock")
    if stock.rc != 0:
        row("stock", f"stock script failed: {_tail(stock.log)}", stock)
        return rows
    inst = run("installed", "installed")
    row("installed, no block == stock", (_tail(inst.log) if inst.rc else _same(inst, stock)) or "bitwise", inst,
        inst.rc == 0 and not _same(inst, stock))
    zero = run("weight0", "recipe", ["--semfid_weight", "0"])
    row("recipe, weight 0 == stock", (_tail(zero.log) if zero.rc else _same(zero, stock)) or "bitwise", zero,
        zero.rc == 0 and not _same(zero, stock))
    on = run("on", "recipe")
    bad = _loss_ok(on, steps, kind)
    if bad:
        row("recipe on", bad, on)
    else:
        changed, reload = _changed(on, zero, kind), _reload(on, kind, fx)
        row("recipe on", f"{changed}; reload: {reload or 'ok'}", on, not changed.startswith("0/") and not reload)
    ckpt = run("checkpointing", "recipe", ["--gradient_checkpointing"])
    bad = _loss_ok(ckpt, steps, kind) or _same(ckpt, on)
    row("recipe on, gradient checkpointing == without", bad or "bitwise", ckpt, not bad)
    variants = {"dreambooth-lora": {"prior preservation": _prior(fx), "--train_text_encoder": ["--train_text_encoder"]},
                "dreambooth-lora-sdxl": {"prior preservation": _prior(fx),
                                         "--train_text_encoder": ["--train_text_encoder"],
                                         "--caption_column": ["--dataset_name", str(fx["captions"]),
                                                              "--caption_column", "text", "--image_column", "image"],
                                         "--caption_column + prior preservation": [
                                             "--dataset_name", str(fx["captions"]), "--caption_column", "text",
                                             "--image_column", "image", *_prior(fx)]},
                "dreambooth-lora-flux": {"prior preservation": _prior(fx)},
                "dreambooth-lora-sd3": {"prior preservation": _prior(fx)}}
    for variant, extra in variants.get(kind, {}).items():
        r = run(variant, "recipe", extra)
        if _not_here(r):
            rows.append(Row(kind, f"recipe on, {variant}", True, _not_here(r), [], r.seconds, status="n/a"))
        else:
            row(f"recipe on, {variant}", _loss_ok(r, steps, kind), r)
    if bf16:
        r = run("bf16", "recipe", ["--mixed_precision", "bf16"])
        row("recipe on, bf16 mixed precision", _loss_ok(r, steps, kind), r)
    wrong = run("wrong identifier", "recipe", ["--semfid_identifier", "zzq"])
    said = "appears in none of the" in wrong.log and "'zzq'" in wrong.log
    row("--semfid_identifier zzq (in no prompt) refused", "refused naming it" if said and wrong.rc else
        f"exit {wrong.rc}: {_tail(wrong.log)}", wrong, bool(said and wrong.rc))
    if kind == "dreambooth-lora":
        pre = run("pre-compute", "recipe", ["--pre_compute_text_embeddings"])
        said = "--pre_compute_text_embeddings is not supported by the semfid recipe" in pre.log
        row("--pre_compute_text_embeddings refused", "refused at start-up naming the flag" if said and pre.rc
            else f"exit {pre.rc}: {_tail(pre.log)}", pre, bool(said and pre.rc))
    return rows


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table."""
    out = ["| script | variant | result | subject loss per step | detail | s |", "|---|---|---|---|---|---|"]
    for r in rows:
        losses = ", ".join(f"{x:.3g}" for x in r.losses) or "-"
        out.append(f"| {r.kind} | {r.variant} | {r.status or ('pass' if r.ok else 'FAIL')} | {losses} | {r.detail} | "
                   f"{r.seconds:.0f} |")
    return "\n".join(out)


def _bf16_ok() -> bool:
    import torch

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:
        return False


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semfid.recipes.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusers", required=True, type=Path, help="a checkout of diffusers' repository")
    parser.add_argument("--work", type=Path, default=Path("semfid-recipe-check"), help="scratch folder")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the scripts")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run")
    parser.add_argument("--only", action="append", choices=sorted(RECIPES), help="check only these scripts")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs already in --work made with the same command line (their logs)")
    args = parser.parse_args(argv)
    missing = [RECIPES[k].script for k in RECIPES if not (args.diffusers / RECIPES[k].script).is_file()]
    if missing:
        parser.error(f"--diffusers {args.diffusers} lacks {missing}: give a checkout of diffusers' repository")
    work = args.work.resolve()
    kinds = args.only or list(RECIPES)
    fx = _fixtures(work, kinds)
    rows: List[Row] = []
    for kind in kinds:
        rows += check_script(kind, args.diffusers.resolve(), work, fx, args.python, args.steps,
                             bf16=not args.no_bf16 and _bf16_ok(), reuse=args.reuse)
        print(table([r for r in rows if r.kind == kind]), flush=True)
    print("\n" + table(rows))
    return 0 if all(r.ok for r in rows) else 1  # n/a rows are not failures


if __name__ == "__main__":
    sys.exit(main())
