"""Property-based fuzz of the readers of the files semfid-generate and semfid-train --resume load.

Whatever ``sefi_config.json`` / ``sefi_tokens.safetensors`` / a checkpoint's ``state.json`` /
``state.safetensors`` hold (mutated fields of any JSON type, tensors of any name, shape, dtype and value,
truncated or flipped bytes), reading them either gives objects the code can use (checked here by using
them) or raises :class:`SefiInputError`; nothing else. Bounded: a few dozen derandomized examples each.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("safetensors")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from semfid.sefi import schemas  # noqa: E402
from semfid.sefi.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from semfid.sefi.errors import SefiInputError  # noqa: E402
from semfid.sefi.learned import CONFIG_FILE, TOKENS_FILE, load_learned, save_learned  # noqa: E402
from semfid.sefi.tokens import SefiTokens  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

S, N, WIDTH = 2, 1, 8

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.uint8, torch.int64]
special = st.sampled_from([0.0, 1.0, -3.5, 1e30, -1e30, float("nan"), float("inf"), float("-inf")])


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=4)))
    dtype = draw(st.sampled_from(DTYPES))
    t = torch.full(shape, draw(special), dtype=torch.float64)
    if t.numel() and draw(st.booleans()):
        t.view(-1)[0] = draw(special)
    if not dtype.is_floating_point:
        t = torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-100, 100)
    return t.to(dtype)


def _mutate_dict(draw, base: dict, keys) -> object:
    """A whole random JSON value, or ``base`` with some fields replaced by random values or removed."""
    if draw(st.integers(0, 5)) == 0:
        return draw(json_values)
    data = json.loads(json.dumps(base))
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(json_values | st.integers(-3, 40))
    return data


def _mutate_tensors(draw, base: dict, names) -> dict:
    out = dict(base)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
        if draw(st.booleans()) and name in out:
            out.pop(name)
        else:
            out[name] = draw(tensors())
    return {k: v.clone().contiguous() for k, v in out.items()}


def _corrupt_bytes(draw, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if draw(st.booleans()):
        path.write_bytes(bytes(data[: draw(st.integers(0, len(data) - 1))]))
    else:
        i = draw(st.integers(0, len(data) - 1))
        data[i] = (data[i] + draw(st.integers(1, 255))) % 256
        path.write_bytes(bytes(data))


CONFIG = dict(placeholder="<v*>", class_word="person", num_stages=S, num_vectors=N, kind="sd15",
              token_widths=[WIDTH], cross_attention_dim=WIDTH, num_train_timesteps=1000)


@functools.lru_cache(maxsize=None)
def _valid_learned_files() -> tuple:
    """The bytes of a valid learned-token folder (written once)."""
    with tempfile.TemporaryDirectory() as tmp:
        module = SefiTokens([torch.randn(WIDTH)], S, N, "attention")
        save_learned(tmp, [p.detach() for p in module.all_pairs()], module.state_dict(), CONFIG)
        return tuple((name, (Path(tmp) / name).read_bytes()) for name in (CONFIG_FILE, TOKENS_FILE))


def _valid_learned(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _valid_learned_files():
        (folder / name).write_bytes(data)
    return CONFIG


def _fresh():
    module = SefiTokens([torch.randn(WIDTH)], S, N, "direct")
    return module, torch.optim.AdamW(module.parameters(), lr=1e-3)


def _valid_checkpoint(folder: Path):
    module, opt = _fresh()
    module.all_pairs()[0].sum().backward()
    opt.step()
    return save_checkpoint(folder, 1, module.state_dict(), opt.state_dict(), torch.Generator().get_state(), {})


@FUZZ
@given(st.data())
def test_learned_folder_reader_gives_usable_subject_or_clear_error(data):
    draw = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = _valid_learned(folder)
        how = draw(st.sampled_from(["config", "tensors", "bytes"]))
        if how == "config":
            (folder / CONFIG_FILE).write_text(json.dumps(_mutate_dict(draw, config, list(config) + ["format_version"])))
        elif how == "tensors":
            from safetensors.torch import load_file

            base = load_file(str(folder / TOKENS_FILE))
            save_file(_mutate_tensors(draw, base, ["pairs.0", "pairs.1", "module.generators.0.slots", "junk"]),
                      str(folder / TOKENS_FILE))
        else:
            _corrupt_bytes(draw, folder / draw(st.sampled_from([CONFIG_FILE, TOKENS_FILE])))
        try:
            subject = load_learned(folder)
        except SefiInputError:
            return
        # accepted: everything generation relies on holds
        assert isinstance(subject.placeholder, str) and subject.placeholder
        assert 1 <= subject.num_stages <= subject.num_train_timesteps
        for p, w in zip(subject.pairs, subject.token_widths):
            assert p.dtype == torch.float32 and p.shape == (subject.num_stages, 2, subject.num_vectors, w)
            assert bool(torch.isfinite(p).all()) and float(p.abs().max()) <= 1e4


@FUZZ
@given(st.data())
def test_checkpoint_reader_gives_loadable_state_or_clear_error(data):
    draw = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        folder = _valid_checkpoint(Path(tmp))
        module, opt = _fresh()
        how = draw(st.sampled_from(["meta", "tensors", "bytes"]))
        if how == "meta":
            meta = json.loads((folder / "state.json").read_text())
            (folder / "state.json").write_text(json.dumps(_mutate_dict(draw, meta, ["step", "optimizer", "config"])))
        elif how == "tensors":
            from safetensors.torch import load_file

            base = load_file(str(folder / "state.safetensors"))
            save_file(_mutate_tensors(draw, base, ["rng", "module.generators.0.pairs", "optimizer.0.exp_avg",
                                                   "optimizer.0.step", "optimizer.7.exp_avg", "junk"]),
                      str(folder / "state.safetensors"))
        else:
            _corrupt_bytes(draw, folder / draw(st.sampled_from(["state.json", "state.safetensors"])))
        try:
            ckpt = load_checkpoint(folder)
            schemas.state_matches(module.state_dict(), ckpt.module_state, str(folder))
            schemas.optimizer_matches(ckpt.optimizer_state, opt, str(folder))
        except SefiInputError:
            return
        # accepted: the trainer's load sequence and a further step work
        module.load_state_dict(ckpt.module_state)
        opt.load_state_dict(ckpt.optimizer_state)
        torch.Generator().set_state(ckpt.generator_state)
        module.all_pairs()[0].sum().backward()
        opt.step()


def test_the_unmutated_files_are_accepted(tmp_path):
    _valid_learned(tmp_path / "learned")
    assert load_learned(tmp_path / "learned").num_stages == S
    ckpt = load_checkpoint(_valid_checkpoint(tmp_path / "run"))
    module, opt = _fresh()
    schemas.state_matches(module.state_dict(), ckpt.module_state, "x")
    schemas.optimizer_matches(ckpt.optimizer_state, opt, "x")
