"""``semfid-train`` / ``semfid-generate`` under bad input: a table of cases run in process.

Every case calls ``train_main`` / ``generate_main`` with an argv and asserts: the documented exit code
(2, or argparse's 2), no traceback on stderr, a last stderr line ``prog: error: ...`` naming the
argument or file and what was expected, and not one file written or changed anywhere under the test's
folder (the pipeline, the inputs, the runs). The second half checks the faithful behaviours (16-bit and
palette images, whole-word placeholders, file modes, honest resumes, stopping on non-finite values) and
that a training run killed during a checkpoint write resumes bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from semfid.sefi import checks  # noqa: E402
from semfid.sefi.cli import generate_main, train_main  # noqa: E402
from semfid.sefi.images import load_images  # noqa: E402
from semfid.sefi.learned import CONFIG_FILE, TOKENS_FILE, load_learned  # noqa: E402
from semfid.sefi.tiny import build_tiny_pipeline  # noqa: E402
from semfid.sefi.train import SefiTrainer  # noqa: E402

RES = "32"


def _png(path: Path, array: np.ndarray, mode=None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` (the pixel data is one tiny IDAT)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _tree(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size, modification time and mode (links not followed)."""
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            out[os.path.join(top, name)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


# ------------------------------------------------------------------------------------------------
# fixtures: one tiny pipeline, images, one trained run (3 steps, checkpoints at 1 and 2)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def env(work) -> dict:
    e = {"work": work, "sd15": build_tiny_pipeline("sd15", work / "sd15")}
    rng = np.random.default_rng(0)
    e["face"] = _png(work / "face.png", (rng.random((40, 48, 3)) * 255).astype(np.uint8))
    e["other"] = _png(work / "other.png", (rng.random((40, 48, 3)) * 255).astype(np.uint8))
    e["garbage"] = work / "garbage.png"
    e["garbage"].write_bytes(b"not an image")
    e["bomb"] = _png_header_only(work / "bomb.png", 20000, 20000)
    e["big"] = _png_header_only(work / "big.png", 9000, 9000)
    e["a_file"] = work / "a_file.txt"
    e["a_file"].write_text("x")
    e["dir_png"] = work / "folder.png"
    e["dir_png"].mkdir()
    e["only_config"] = work / "only-config"
    e["only_config"].mkdir()
    (e["only_config"] / CONFIG_FILE).write_text("{}")
    e["run"] = work / "run"
    rc = train_main(["--model", str(e["sd15"]), "--image", str(e["face"]), "--output", str(e["run"]),
                     "--steps", "3", "--resolution", RES, "--checkpoint-every", "1", "--quiet"])
    assert rc == 0
    return e


def _train(e, *extra, output=None) -> List[str]:
    out = output or e["work"] / "new-run"
    return ["--model", str(e["sd15"]), "--image", str(e["face"]), "--output", str(out), "--steps", "2",
            "--resolution", RES, "--quiet", *map(str, extra)]


def _generate(e, *extra, embeddings=None, prompt="a photo of <v*>") -> List[str]:
    return ["--model", str(e["sd15"]), "--embeddings", str(embeddings or e["run"]), "--prompt", prompt,
            "--output", str(e["work"] / "never.png"), "--steps", "2", "--resolution", RES, "--quiet",
            *map(str, extra)]


def _copy_run(e, name: str) -> Path:
    dst = e["work"] / "copies" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(e["run"], dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _edit_tensors(path: Path, edit: Callable[[dict], dict]) -> None:
    save_file(edit(load_file(str(path))), str(path))


def _embeddings(e, name: str, config=None, tensors=None) -> Path:
    """A copy of the trained run's output folder with its config / tensors edited."""
    folder = _copy_run(e, name)
    shutil.rmtree(folder / "checkpoints")
    if config:
        _edit_json(folder / CONFIG_FILE, config)
    if tensors:
        _edit_tensors(folder / TOKENS_FILE, tensors)
    return folder


def _checkpoint_run(e, name: str, meta=None, tensors=None, which: str = "step-000002") -> Path:
    """A copy of the trained run with the checkpoint ``which`` edited, the other one removed."""
    folder = _copy_run(e, name)
    for other in (folder / "checkpoints").iterdir():
        if other.name != which:
            shutil.rmtree(other)
    ckpt = folder / "checkpoints" / which
    if meta:
        _edit_json(ckpt / "state.json", meta)
    if tensors:
        _edit_tensors(ckpt / "state.safetensors", tensors)
    return folder


def _set(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


def _drop(key):
    def edit(d):
        d.pop(key)
        return d
    return edit


def _pairs(fn):
    def edit(t):
        t["pairs.0"] = fn(t["pairs.0"])
        return t
    return edit


def _resume(e, name, *extra, **edits) -> List[str]:
    folder = _checkpoint_run(e, name, **edits) if edits else _copy_run(e, name)
    return _train(e, "--resume", *extra, output=folder)


def _model_with_index(e, name: str, edit) -> Path:
    folder = e["work"] / "models" / name
    if not folder.exists():
        folder.mkdir(parents=True)
        for sub in e["sd15"].iterdir():
            (folder / sub.name).symlink_to(sub)
        (folder / "model_index.json").unlink()
        index = json.loads((e["sd15"] / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(edit(index)))
    return folder


# ------------------------------------------------------------------------------------------------
# the table: (id, command, argv builder, pattern the error line must hold)
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    command: str  # "train" or "generate"
    argv: Callable[[dict], List[str]]
    pattern: str
    status: int = 2


T, G = "train", "generate"
CASES = [
    # -- argument values
    Case("seed-2**70", T, lambda e: _train(e, "--seed", 2 ** 70), "--seed"),
    Case("seed-negative", T, lambda e: _train(e, "--seed", -1), "--seed"),
    Case("seed-not-int", T, lambda e: _train(e, "--seed", "1.5"), "--seed"),
    Case("lr-inf", T, lambda e: _train(e, "--lr", "inf"), "--lr"),
    Case("lr-nan", T, lambda e: _train(e, "--lr", "nan"), "--lr"),
    Case("lr-zero", T, lambda e: _train(e, "--lr", "0"), "--lr"),
    Case("lr-huge", T, lambda e: _train(e, "--lr", "1e30"), "--lr"),
    Case("attn-weight-nan", T, lambda e: _train(e, "--attn-loss-weight", "nan"), "--attn-loss-weight"),
    Case("attn-weight-negative", T, lambda e: _train(e, "--attn-loss-weight", "-1"), "--attn-loss-weight"),
    Case("steps-zero", T, lambda e: _train(e, "--steps", "0"), "--steps"),
    Case("steps-not-int", T, lambda e: _train(e, "--steps", "1e3"), "--steps"),
    Case("stages-zero", T, lambda e: _train(e, "--stages", "0"), "--stages"),
    Case("stages-too-many", T, lambda e: _train(e, "--stages", "1001"), "--stages"),
    Case("num-vectors-100", T, lambda e: _train(e, "--num-vectors", "100"), "--num-vectors"),
    Case("batch-size-zero", T, lambda e: _train(e, "--batch-size", "0"), "--batch-size"),
    Case("resolution-60", T, lambda e: _train(e, "--resolution", "60"), "--resolution"),
    Case("resolution-huge", T, lambda e: _train(e, "--resolution", "65536"), "--resolution"),
    Case("checkpoint-every-negative", T, lambda e: _train(e, "--checkpoint-every", "-1"), "--checkpoint-every"),
    Case("mode-bogus", T, lambda e: _train(e, "--mode", "bogus"), "--mode"),
    # -- templates and placeholders
    Case("template-extra-field", T, lambda e: _train(e, "--template", "a photo of {} {x}"), "--template"),
    Case("template-open-brace", T, lambda e: _train(e, "--template", "a photo of {}{"), "--template"),
    Case("template-two-fields", T, lambda e: _train(e, "--template", "{} and {}"), "--template"),
    Case("template-no-field", T, lambda e: _train(e, "--template", "a photo of the face"), "--template"),
    Case("template-glued", T, lambda e: _train(e, "--template", "a photo of x{}y"), "--template"),
    Case("placeholder-empty", T, lambda e: _train(e, "--placeholder", ""), "--placeholder"),
    Case("placeholder-space", T, lambda e: _train(e, "--placeholder", "two words"), "--placeholder"),
    Case("placeholder-braces", T, lambda e: _train(e, "--placeholder", "<{}>"), "--placeholder"),
    Case("placeholder-a-word", T, lambda e: _train(e, "--placeholder", "dog"), "already a word"),
    Case("placeholder-in-template", T, lambda e: _train(e, "--placeholder", "a"), "--placeholder"),
    Case("placeholder-in-class", T, lambda e: _train(e, "--placeholder", "<p>", "--class-word", "<p>s"),
         "--placeholder"),
    # -- images
    Case("image-missing", T, lambda e: _train(e)[:2] + ["--image", str(e["work"] / "missing.png")] + _train(e)[4:],
         "--image"),
    Case("image-folder", T, lambda e: _train(e)[:2] + ["--image", str(e["work"])] + _train(e)[4:], "--image"),
    Case("image-garbage", T, lambda e: _train(e)[:2] + ["--image", str(e["garbage"])] + _train(e)[4:],
         "cannot decode image"),
    Case("image-bomb-20000", T, lambda e: _train(e)[:2] + ["--image", str(e["bomb"])] + _train(e)[4:], "--image"),
    Case("image-9000", T, lambda e: _train(e)[:2] + ["--image", str(e["big"])] + _train(e)[4:], "8192 x 8192"),
    # -- output paths and existing runs
    Case("output-a-file", T, lambda e: _train(e, output=e["a_file"]), "--output"),
    Case("output-under-a-file", T, lambda e: _train(e, output=e["a_file"] / "sub"), "--output"),
    Case("output-read-only", T, lambda e: _train(e, output=Path("/proc/semfid-test-run")), "not writable"),
    Case("output-only-config", T, lambda e: _train(e, output=e["only_config"]), "already holds"),
    Case("output-existing-run", T, lambda e: _train(e, output=e["run"]), "already holds"),
    # -- the model folder
    Case("model-missing", T, lambda e: ["--model", str(e["work"] / "nope")] + _train(e)[2:], "does not exist"),
    Case("model-index-list", T, lambda e: ["--model", str(_model_with_index(e, "list", lambda i: [1]))]
         + _train(e)[2:], "JSON object"),
    Case("model-scheduler-os", T, lambda e: ["--model", str(_model_with_index(
        e, "os", _set("scheduler", ["diffusers", "os"])))] + _train(e)[2:], "scheduler class 'os'"),
    Case("model-unet-not-pair", G, lambda e: ["--model", str(_model_with_index(
        e, "unet", _set("unet", "UNet2DConditionModel")))] + _generate(e)[2:], "unet must be"),
    # -- resume
    Case("resume-nothing", T, lambda e: _train(e, "--resume"), "holds no checkpoint"),
    Case("resume-other-lr", T, lambda e: _resume(e, "lr", "--steps", "3", "--checkpoint-every", "1", "--lr", "0.5"),
         "--lr"),
    Case("resume-other-image", T, lambda e: [a if a != str(e["face"]) else str(e["other"]) for a in
                                             _resume(e, "img", "--steps", "3", "--checkpoint-every", "1")],
         "--image"),
    Case("resume-steps-below", T, lambda e: _resume(e, "steps", "--steps", "1"), "--steps"),
    Case("ckpt-json-list", T, lambda e: _resume(e, "jl", "--steps", "3", meta=lambda m: [m]), "JSON object"),
    Case("ckpt-json-no-step", T, lambda e: _resume(e, "ns", "--steps", "3", meta=_drop("step")), "'step'"),
    Case("ckpt-step-float", T, lambda e: _resume(e, "sf", "--steps", "3", meta=_set("step", 1.5)), "step"),
    Case("ckpt-no-rng", T, lambda e: _resume(e, "nr", "--steps", "3", tensors=_drop("rng")), "rng"),
    Case("ckpt-nan-moment", T, lambda e: _resume(e, "nm", "--steps", "3", tensors=lambda t: {
        k: (v * float("nan") if k.endswith("exp_avg") else v) for k, v in t.items()}), "non-finite"),
    Case("ckpt-wrong-shape", T, lambda e: _resume(e, "ws", "--steps", "3", "--checkpoint-every", "1", tensors=lambda t: {
        k: (v[..., :-1].contiguous() if k == "module.generators.0.slots" else v) for k, v in t.items()}),
        "should be"),
    # -- generation: values and paths
    Case("gen-seed-2**70", G, lambda e: _generate(e, "--seed", 2 ** 70), "--seed"),
    Case("gen-guidance-nan", G, lambda e: _generate(e, "--guidance-scale", "nan"), "--guidance-scale"),
    Case("gen-guidance-inf", G, lambda e: _generate(e, "--guidance-scale", "inf"), "--guidance-scale"),
    Case("gen-guidance-negative", G, lambda e: _generate(e, "--guidance-scale", "-2"), "--guidance-scale"),
    Case("gen-steps-zero", G, lambda e: _generate(e, "--steps", "0"), "--steps"),
    Case("gen-steps-above-T", G, lambda e: _generate(e, "--steps", "5000"), "--steps"),
    Case("gen-resolution-12", G, lambda e: _generate(e, "--resolution", "12"), "--resolution"),
    Case("gen-output-read-only", G, lambda e: _generate(e)[:6] + ["--output", "/proc/semfid.png"] + _generate(e)[8:],
         "--output"),
    Case("gen-output-a-file", G, lambda e: _generate(e)[:6] + ["--output", str(e["a_file"])] + _generate(e)[8:],
         "--output"),
    Case("gen-output-folder-named-png", G, lambda e: _generate(e)[:6] + ["--output", str(e["dir_png"])]
         + _generate(e)[8:], "--output"),
    Case("gen-maps-a-file", G, lambda e: _generate(e, "--attention-maps", e["a_file"]), "--attention-maps"),
    Case("gen-prompt-glued", G, lambda e: _generate(e, prompt="a photo of <v*>x"), "contains none"),
    Case("gen-prompt-too-long", G, lambda e: _generate(e, prompt="a " * 80 + "<v*>"), "tokens long"),
    # -- generation: the embeddings folder
    Case("emb-a-file", G, lambda e: _generate(e, embeddings=e["a_file"]), "is a file"),
    Case("emb-missing", G, lambda e: _generate(e, embeddings=e["work"] / "nope"), "does not exist"),
    Case("emb-config-number", G, lambda e: _generate(e, embeddings=_embeddings(e, "num", config=lambda c: 3)),
         "JSON object"),
    Case("emb-stages-five", G, lambda e: _generate(e, embeddings=_embeddings(e, "five", _set("num_stages", "five"))),
         "num_stages"),
    Case("emb-stages-5.7", G, lambda e: _generate(e, embeddings=_embeddings(e, "57", _set("num_stages", 5.7))),
         "num_stages"),
    Case("emb-stages-0-empty", G, lambda e: _generate(e, embeddings=_embeddings(
        e, "s0", _set("num_stages", 0), _pairs(lambda p: p[:0].contiguous()))), "num_stages"),
    Case("emb-widths-int", G, lambda e: _generate(e, embeddings=_embeddings(e, "wi", _set("token_widths", 32))),
         "token_widths"),
    Case("emb-T-zero", G, lambda e: _generate(e, embeddings=_embeddings(e, "t0", _set("num_train_timesteps", 0))),
         "num_train_timesteps"),
    Case("emb-no-placeholder", G, lambda e: _generate(e, embeddings=_embeddings(e, "np", _drop("placeholder"))),
         "placeholder"),
    Case("emb-placeholder-empty", G, lambda e: _generate(e, embeddings=_embeddings(e, "pe", _set("placeholder", ""))),
         "placeholder"),
    Case("emb-placeholder-a-word", G, lambda e: _generate(
        e, embeddings=_embeddings(e, "pw", _set("placeholder", "dog")), prompt="a photo of dog"), "already a word"),
    Case("emb-placeholders-contain", G, lambda e: _generate(
        e, "--embeddings", _embeddings(e, "pc", _set("placeholder", "<v*>>"))), "collide"),
    Case("emb-same-twice", G, lambda e: _generate(e, "--embeddings", e["run"]), "collide"),
    Case("emb-nan", G, lambda e: _generate(e, embeddings=_embeddings(e, "nan", tensors=_pairs(lambda p: p * np.nan))),
         "pairs.0"),
    Case("emb-inf", G, lambda e: _generate(e, embeddings=_embeddings(e, "inf", tensors=_pairs(lambda p: p + np.inf))),
         "pairs.0"),
    Case("emb-1e30", G, lambda e: _generate(e, embeddings=_embeddings(
        e, "big", tensors=_pairs(lambda p: torch.full_like(p, 1e30)))), "pairs.0"),
    Case("emb-int32", G, lambda e: _generate(e, embeddings=_embeddings(
        e, "i32", tensors=_pairs(lambda p: p.to(torch.int32)))), "float32"),
    Case("emb-wrong-shape", G, lambda e: _generate(e, embeddings=_embeddings(
        e, "sh", tensors=_pairs(lambda p: p[:, :, :, :-1].contiguous()))), "pairs.0 should be"),
    Case("emb-extra-tensor", G, lambda e: _generate(e, embeddings=_embeddings(
        e, "ex", tensors=lambda t: dict(t, **{"pairs.1": t["pairs.0"].clone()}))), "unexpected"),
    Case("emb-corrupt-file", G, lambda e: _generate(e, embeddings=_truncated(e)), "cannot read"),
]


def _truncated(e) -> Path:
    folder = _embeddings(e, "trunc")
    data = (folder / TOKENS_FILE).read_bytes()
    (folder / TOKENS_FILE).write_bytes(data[: len(data) // 2])
    return folder


def _run_main(command: str, argv: List[str], capsys):
    main = train_main if command == T else generate_main
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_before_any_work(case, env, capsys):
    argv = case.argv(env)  # builds the case's inputs first: they are not the command's writes
    capsys.readouterr()
    before = _tree(env["work"])
    rc, err = _run_main(case.command, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert rc == case.status, err
    assert lines and lines[-1].startswith(f"semfid-{case.command}: error: "), err
    assert case.pattern in lines[-1], err
    assert _tree(env["work"]) == before, "the command wrote or changed files"


# ------------------------------------------------------------------------------------------------
# faithful behaviours
# ------------------------------------------------------------------------------------------------
def test_sixteen_bit_palette_and_alpha_images_convert_faithfully(tmp_path):
    ramp = (np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)  # 0 .. 65246
    sixteen = _png(tmp_path / "g16.png", ramp)
    assert Image.open(sixteen).mode.startswith("I")
    got = np.asarray(load_images([sixteen])[0], dtype=np.float64)
    np.testing.assert_allclose(got[..., 0], ramp / 257.0, atol=0.5 + 1e-9)
    assert np.array_equal(got[..., 0], got[..., 2])
    rgb = (np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(np.asarray(load_images([tmp_path / "p.png"])[0]), np.asarray(palette.convert("RGB")))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, :] = (10, 20, 30, 255)  # top half opaque, bottom half transparent black
    _png(tmp_path / "a.png", rgba)
    got = np.asarray(load_images([tmp_path / "a.png"])[0])
    assert (got[:4] == (10, 20, 30)).all() and (got[4:] == 255).all()


def test_placeholders_match_as_whole_words():
    pattern = checks.placeholder_pattern(["cat", "a", "<v*>"])
    assert pattern.findall("a painting of a cat in the category <v*>x <v*>, cats") == ["a", "a", "cat", "<v*>"]
    with pytest.raises(ValueError, match="collide"):
        checks.distinct_placeholders({"<v1>": "x", "<v1>b": "y"})


def test_written_files_share_one_mode(env):
    modes = {f: (env["run"] / f).stat().st_mode & 0o777 for f in (TOKENS_FILE, CONFIG_FILE)}
    ckpt = env["run"] / "checkpoints" / "step-000002"
    modes.update({f: (ckpt / f).stat().st_mode & 0o777 for f in ("state.json", "state.safetensors")})
    assert len(set(modes.values())) == 1, modes


@pytest.mark.slow
@pytest.mark.parametrize("corruption", ["truncated", "wrong-shape"])
def test_resume_falls_back_past_a_corrupt_checkpoint_and_records_it(env, capsys, corruption):
    run = _copy_run(env, f"fallback-{corruption}")
    for f in (TOKENS_FILE, CONFIG_FILE):
        (run / f).unlink()
    newest = run / "checkpoints" / "step-000002" / "state.safetensors"
    if corruption == "truncated":
        newest.write_bytes(newest.read_bytes()[:100])
    else:  # readable, but a tensor does not fit the token module
        _edit_tensors(newest, lambda t: {k: (v[..., :-1].contiguous() if k == "module.generators.0.slots" else v)
                                         for k, v in t.items()})
    rc = train_main(_train(env, "--resume", "--steps", "3", "--checkpoint-every", "1", output=run))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "warning: skipped the corrupt checkpoint step-000002" in err and "resuming from step-000001" in err
    assert torch.equal(load_learned(run).pairs[0], load_learned(env["run"]).pairs[0])  # bit-identical
    training = json.loads((run / CONFIG_FILE).read_text())["training"]
    assert training["resumed_from"] == 1 and training["steps_done"] == 3 and training["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["loss", "token"])
def test_training_stops_at_the_first_non_finite_value(env, capsys, monkeypatch, failure):
    out = env["work"] / f"diverge-{failure}"
    if failure == "loss":  # the loss of the third step is NaN
        losses = SefiTrainer.losses

        def nan_on_third(self, *args, **kwargs):
            mse, subject = losses(self, *args, **kwargs)
            return (mse * float("nan"), subject) if self.step_count == 2 else (mse, subject)

        monkeypatch.setattr(SefiTrainer, "losses", nan_on_third)
    else:  # any token change beyond a tiny bound counts as a diverged value
        monkeypatch.setattr(checks, "MAX_TOKEN_ABS", 1e-30)
    rc = train_main(_train(env, "--steps", "4", "--checkpoint-every", "1", output=out))
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err, err
    step = 3 if failure == "loss" else 1
    assert f"training diverged at step {step}" in err, err
    assert not (out / TOKENS_FILE).exists() and not (out / CONFIG_FILE).exists()
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    assert kept == (["step-000001", "step-000002"] if failure == "loss" else [])


# ------------------------------------------------------------------------------------------------
# crash safety: SIGKILL during a checkpoint write, then --resume: bit-identical to an uninterrupted run
# ------------------------------------------------------------------------------------------------
#: (checkpoint, file, moment) at which the run is killed: before a file is renamed into place, or right
#: after (for state.json: a complete checkpoint, not yet pruned).
KILL_POINTS = [("step-000001", "state.safetensors", "before"), ("step-000002", "state.safetensors", "before"),
               ("step-000002", "state.safetensors", "after"), ("step-000002", "state.json", "before"),
               ("step-000002", "state.json", "after")]


def _killed_run(argv: List[str], step: str, target: str, moment: str) -> int:
    """Run ``semfid-train argv`` in a forked child (no second import of torch) that SIGKILLs itself at
    the kill point; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            real_replace = os.replace

            def replace(src, dst):
                if os.path.basename(str(dst)) == target and step in str(dst):
                    if moment == "after":
                        real_replace(src, dst)
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_replace(src, dst)

            os.replace = replace
            train_main(argv)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the killed training run hung")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_during_checkpoint_write_resumes_bit_identical(env, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions in the forked children and here
    try:
        reference = env["work"] / "reference-1-thread"
        args = ["--steps", "3", "--checkpoint-every", "1"]
        assert train_main(_train(env, *args, output=reference)) == 0
        want = load_learned(reference).pairs[0]
        identical = 0
        for i, point in enumerate(KILL_POINTS):
            out = env["work"] / f"killed-{i}"
            argv = _train(env, *args, output=out)
            status = _killed_run(argv, *point)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            assert not (out / TOKENS_FILE).exists()
            rc = train_main(argv + ["--resume"])
            if point[0] == "step-000001" and point[2] == "before":  # no complete checkpoint: said so
                assert rc == 2 and "holds no checkpoint" in capsys.readouterr().err
                rc = train_main(argv)  # and a fresh start is allowed
            assert rc == 0, capsys.readouterr().err
            identical += torch.equal(load_learned(out).pairs[0], want)
    finally:
        torch.set_num_threads(threads)
    print(f"kill-and-resume: {len(KILL_POINTS)} trials, {identical} identical finals")
    assert identical == len(KILL_POINTS)


@pytest.mark.slow
def test_sampling_refuses_non_finite_latents(env):
    """The last guard of semfid-generate: latents that overflowed are an error, never a black image."""
    from semfid.sefi.errors import SefiInputError
    from semfid.sefi.pipeline import load_components
    from semfid.sefi.sample import SefiSampler

    subject = load_learned(env["run"])
    sampler = SefiSampler(load_components(env["sd15"]), [subject])
    try:  # pairs that bypass the reader's checks (the API's override)
        huge = {subject.placeholder: [torch.full_like(p, 3e38) for p in subject.pairs]}
        with pytest.raises(SefiInputError, match="non-finite latents"):
            sampler.sample(["a photo of <v*>"], 0, steps=2, resolution=int(RES), pairs=huge, progress=False)
    finally:
        sampler.close()
