"""The validation layer of the SeFi-IDE recipe, part 2: the schemas of the files it reads.

* the learned-token folder (:mod:`semfid.sefi.learned`): ``sefi_config.json``'s fields and types,
  ``sefi_tokens.safetensors``' tensor names, shapes, dtypes and values;
* a training checkpoint (:mod:`semfid.sefi.checkpoints`): ``state.json`` and ``state.safetensors``,
  and a checkpoint's tensors against the module / optimizer they are loaded into;
* a diffusers folder's ``model_index.json`` (:mod:`semfid.sefi.pipeline`), with its scheduler class
  checked against :data:`SCHEDULERS` before diffusers is asked for it.

Each check raises :class:`~semfid.sefi.errors.SefiInputError` naming the file, the field or tensor, and
what was expected; a file that passes cannot make the code that reads it fail.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Dict, List, Mapping

import torch

from . import checks
from .errors import SefiInputError

Tensor = torch.Tensor

#: Scheduler classes a pipeline folder may name (``model_index.json``'s ``scheduler``).
SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
    "TCDScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
)


def _dict(what: str, value) -> dict:
    if not isinstance(value, dict):
        raise SefiInputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _field(data: dict, what: str, key: str):
    if key not in data:
        raise SefiInputError(f"{what} lacks the field {key!r}")
    return data[key]


def _string(what: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise SefiInputError(f"{what} must be a non-empty string, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# the learned-token folder
# ------------------------------------------------------------------------------------------------
def learned_config(config, path: str, format_version: int) -> dict:
    """Check ``sefi_config.json``: the fields :class:`~semfid.sefi.learned.LearnedSubject` needs."""
    config = _dict(path, config)
    out = dict(config)
    out["placeholder"] = checks.placeholder(f"{path}: placeholder", _field(config, path, "placeholder"))
    out["class_word"] = _string(f"{path}: class_word", _field(config, path, "class_word"))
    out["kind"] = _string(f"{path}: kind", _field(config, path, "kind"))
    for key, high in (("num_stages", checks.MAX_STAGES), ("num_vectors", checks.MAX_VECTORS),
                      ("cross_attention_dim", None), ("num_train_timesteps", None)):
        out[key] = checks.integer(f"{path}: {key}", _field(config, path, key), 1, high)
    widths = _field(config, path, "token_widths")
    if not isinstance(widths, list) or not widths:
        raise SefiInputError(f"{path}: token_widths must be a non-empty list of integers, got {widths!r}")
    out["token_widths"] = [checks.integer(f"{path}: token_widths[{i}]", w, 1) for i, w in enumerate(widths)]
    if out["num_stages"] > out["num_train_timesteps"]:
        raise SefiInputError(f"{path}: num_stages ({out['num_stages']}) exceeds num_train_timesteps "
                             f"({out['num_train_timesteps']})")
    version = config.get("format_version", format_version)
    if checks.integer(f"{path}: format_version", version, 1) > format_version:
        raise SefiInputError(f"{path}: format_version {version} is newer than this semfid reads "
                             f"({format_version}); update semfid")
    return out


def token_values(what: str, tensor: Tensor) -> Tensor:
    """Token vectors must be finite and at most :data:`~semfid.sefi.checks.MAX_TOKEN_ABS` in magnitude."""
    bad = ~torch.isfinite(tensor) | (tensor.abs() > checks.MAX_TOKEN_ABS)
    if bool(bad.any()):
        worst = tensor.reshape(-1)[bad.reshape(-1)][0].item()
        raise SefiInputError(f"{what} holds {int(bad.sum())} value(s) that are not finite or exceed "
                             f"{checks.MAX_TOKEN_ABS:g} in magnitude (e.g. {worst}); expected trained tokens")
    return tensor


def _finite_float(what: str, tensor: Tensor) -> Tensor:
    if not tensor.is_floating_point():
        raise SefiInputError(f"{what} must be a floating-point tensor, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise SefiInputError(f"{what} holds non-finite values")
    return tensor


def learned_tensors(tensors: Dict[str, Tensor], config: dict, path: str) -> List[Tensor]:
    """Check ``sefi_tokens.safetensors`` against the checked config; returns the pairs per encoder.

    Names: ``pairs.{e}`` for every text encoder ``e`` and ``module.*``, nothing else. ``pairs.{e}``:
    float32 [S, 2, n, d_e], finite, within ±MAX_TOKEN_ABS; ``module.*``: finite floating point.
    """
    widths = config["token_widths"]
    wanted = {f"pairs.{e}" for e in range(len(widths))}
    unknown = sorted(k for k in tensors if k not in wanted and not k.startswith("module."))
    if unknown:
        raise SefiInputError(f"{path}: unexpected tensor(s) {', '.join(unknown[:4])}; expected pairs.0.."
                             f"pairs.{len(widths) - 1} and module.*")
    pairs = []
    for e, width in enumerate(widths):
        name = f"pairs.{e}"
        want = (config["num_stages"], 2, config["num_vectors"], width)
        p = tensors.get(name)
        if p is None or tuple(p.shape) != want:
            raise SefiInputError(f"{path}: {name} should be {want}, got {None if p is None else tuple(p.shape)}")
        if p.dtype != torch.float32:
            raise SefiInputError(f"{path}: {name} must be float32, got {p.dtype}")
        pairs.append(token_values(f"{path}: {name}", p))
    for name, t in tensors.items():
        if name.startswith("module."):
            _finite_float(f"{path}: {name}", t)
    return pairs


# ------------------------------------------------------------------------------------------------
# training checkpoints
# ------------------------------------------------------------------------------------------------
_OPT_NAME = re.compile(r"optimizer\.(\d+)\.(\w+)$")


def checkpoint_meta(meta, path: str) -> dict:
    """Check ``state.json``: ``step``, ``optimizer`` (param groups, scalars) and ``config``."""
    meta = _dict(path, meta)
    checks.integer(f"{path}: step", _field(meta, path, "step"), 0)
    optimizer = _dict(f"{path}: optimizer", _field(meta, path, "optimizer"))
    groups = _field(optimizer, f"{path}: optimizer", "param_groups")
    if not isinstance(groups, list) or not groups:
        raise SefiInputError(f"{path}: optimizer.param_groups must be a non-empty list")
    for i, group in enumerate(groups):
        group = _dict(f"{path}: optimizer.param_groups[{i}]", group)
        params = _field(group, f"{path}: optimizer.param_groups[{i}]", "params")
        if not isinstance(params, list):
            raise SefiInputError(f"{path}: optimizer.param_groups[{i}].params must be a list")
        for j, p in enumerate(params):
            checks.integer(f"{path}: optimizer.param_groups[{i}].params[{j}]", p, 0)
        checks.number(f"{path}: optimizer.param_groups[{i}].lr", _field(group, path, "lr"), 0, low_open=True)
    scalars = _dict(f"{path}: optimizer.scalars", optimizer.get("scalars", {}))
    for name, value in scalars.items():
        if not _OPT_NAME.match(name):
            raise SefiInputError(f"{path}: optimizer scalar {name!r} is not named optimizer.<index>.<key>")
        checks.number(f"{path}: {name}", value)
    _dict(f"{path}: config", meta.get("config", {}))
    return meta


def checkpoint_tensors(tensors: Dict[str, Tensor], path: str) -> None:
    """Check ``state.safetensors``: ``rng`` (the CPU generator's uint8 state), ``module.*`` and
    ``optimizer.{index}.{key}``, every floating tensor finite."""
    rng = tensors.get("rng")
    want = torch.Generator().get_state()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != want.shape:
        got = None if rng is None else f"{rng.dtype} {tuple(rng.shape)}"
        raise SefiInputError(f"{path}: rng should be the training generator's state, uint8 {tuple(want.shape)}, "
                             f"got {got}")
    for name, t in tensors.items():
        if name == "rng":
            continue
        if not name.startswith("module.") and not _OPT_NAME.match(name):
            raise SefiInputError(f"{path}: unexpected tensor {name!r}; expected rng, module.*, optimizer.<i>.<key>")
        if t.is_floating_point():
            _finite_float(f"{path}: {name}", t)


def state_matches(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], what: str) -> None:
    """``got`` has exactly ``expected``'s tensor names, shapes and dtypes (before ``load_state_dict``)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise SefiInputError(f"{what}: tensors do not match the token module (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}); trained with other options or another model")
    for name, want in expected.items():
        t = got[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise SefiInputError(f"{what}: {name} should be {want.dtype} {tuple(want.shape)}, got {t.dtype} "
                                 f"{tuple(t.shape)}; trained with other options or another model")


def optimizer_matches(state: dict, optimizer, what: str) -> None:
    """A checkpoint's optimizer ``state`` fits ``optimizer``: the same settings per param group, and per
    parameter the state entries (names, shapes, dtypes) that one step of that optimizer creates."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    probe = copy.deepcopy(optimizer)  # its own parameter copies: the real ones are untouched
    for group in probe.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    probe.step()
    template = probe.state_dict()
    want_groups = json.loads(json.dumps(template["param_groups"]))
    if len(state["param_groups"]) != len(want_groups):
        raise SefiInputError(f"{what}: {len(state['param_groups'])} optimizer param groups, expected "
                             f"{len(want_groups)}; trained with other options")
    for i, (got, want) in enumerate(zip(state["param_groups"], want_groups)):
        differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if differ:
            raise SefiInputError(f"{what}: optimizer param group {i} differs in {', '.join(differ)} "
                                 f"(saved {[got.get(k) for k in differ]}, now {[want.get(k) for k in differ]})")
    want_state = template["state"]
    if state["state"] and set(state["state"]) != set(want_state):
        raise SefiInputError(f"{what}: optimizer state for parameters {sorted(state['state'])}, expected "
                             f"{sorted(want_state)}")
    for index, per_param in state["state"].items():
        if set(per_param) != set(want_state[index]):
            raise SefiInputError(f"{what}: optimizer state {index} holds {sorted(per_param)}, expected "
                                 f"{sorted(want_state[index])}")
        for key, value in per_param.items():
            want = want_state[index][key]
            if torch.is_tensor(want) != torch.is_tensor(value) or (
                    torch.is_tensor(want) and (value.shape != want.shape or value.dtype != want.dtype)):
                shown = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
                expected = f"{want.dtype} {tuple(want.shape)}" if torch.is_tensor(want) else type(want).__name__
                raise SefiInputError(f"{what}: optimizer.{index}.{key} should be {expected}, got {shown}")


# ------------------------------------------------------------------------------------------------
# a diffusers folder
# ------------------------------------------------------------------------------------------------
def model_index(index, path: str, required: List[str]) -> dict:
    """Check ``model_index.json``: the ``required`` components as ``[library, class]`` string pairs
    and an allowed scheduler class."""
    index = _dict(path, index)
    for name in required:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise SefiInputError(f"{path}: {name} must be a [library, class] pair of strings, got {entry!r}")
    scheduler = index["scheduler"][1]
    if scheduler not in SCHEDULERS:
        raise SefiInputError(f"{path}: scheduler class {scheduler!r} is not one of the supported "
                             f"{', '.join(SCHEDULERS)}")
    return index


__all__ = ["learned_config", "learned_tensors", "token_values", "checkpoint_meta", "checkpoint_tensors",
           "state_matches", "optimizer_matches", "model_index", "SCHEDULERS"]
