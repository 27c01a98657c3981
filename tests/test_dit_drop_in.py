"""diffusers' processor rebuilds on an installed SD3 / Flux twin (as diffusers' own test files run them).

``load_ip_adapter`` / ``unload_ip_adapter`` rebuild processors as ``type(old)()`` (Flux's single-stream
layers on load, every non-IP layer on unload), and ``copy.deepcopy`` copies them: with semfid
installed the bare processors must run the stock math, and the next block must record again.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from semfid.diffusers import install
from semfid.diffusers.families.flux import SemfidFluxAttnProcessor
from semfid.diffusers.families.sd3 import SemfidJointAttnProcessor

from _dit_calls import make_call, twin

STOCK = {"sd3": JointAttnProcessor2_0, "flux": FluxAttnProcessor}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_processors_rebuilt_with_no_arguments_run_stock_and_are_adopted(family):
    torch.manual_seed(0)
    model = twin(family)
    kw = make_call(family, batch=1, text=5, h=3, w=2)
    with torch.no_grad():
        ref = model(**kw).sample
        ctl = install(model)
        with ctl.capture([1, 3]) as before:
            model(**kw)
        # diffusers' load / unload_ip_adapter: {name: type(old)()} through set_attn_processor
        model.set_attn_processor({n: type(p)() for n, p in model.attn_processors.items()})
        bare = [p for p in model.attn_processors.values() if type(p).__name__.startswith("Semfid")]
        assert bare and all(p.owner is None and not p.active for p in bare)
        assert _close(model(**kw).sample, ref)  # no controller, no block: the stock output
        with ctl.capture([1, 3]) as after:  # the block adopts them: maps recorded again
            assert _close(model(**kw).sample, ref)
    assert set(after.maps) == set(before.maps) == set(ctl.layers)
    for name, maps in before.maps.items():
        assert torch.equal(after.maps[name], maps), name
    assert all(p.owner is not None for p in model.attn_processors.values()
               if type(p).__name__.startswith("Semfid"))
    ctl.uninstall()  # the adopted layers get the stock processor back, not a bare semfid one
    assert {type(p) for p in model.attn_processors.values()} == {STOCK[family]}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_uninstall_puts_stock_where_diffusers_rebuilt_a_semfid_processor(family):
    """No block between the rebuild and uninstall(): the bare (ownerless) semfid processors that
    diffusers' ``type(old)()`` left become the stock class (Flux: with the attention backend set)."""
    model = twin(family)
    if family == "flux":
        model.set_attention_backend("_native_math")
    backends = {p._attention_backend for p in model.attn_processors.values()
                if hasattr(p, "_attention_backend")}
    ctl = install(model)
    names = list(model.attn_processors)[:3]
    model.set_attn_processor({n: (type(p)() if n in names else p) for n, p in model.attn_processors.items()})
    assert all(type(model.attn_processors[n]).__name__.startswith("Semfid") for n in names)
    ctl.uninstall()
    procs = model.attn_processors
    assert {type(p) for p in procs.values()} == {STOCK[family]}
    if family == "flux":  # kept by the installed processors; a bare one has none to keep
        assert {procs[n]._attention_backend for n in procs if n not in names} == backends != {None}


def test_no_owner_means_inactive():
    assert not SemfidJointAttnProcessor(active=True).active
    assert not SemfidFluxAttnProcessor("x", None, active=True).active
    assert SemfidFluxAttnProcessor("x", object(), active=True).active


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_deepcopy_of_an_installed_dit_is_stock(family):
    torch.manual_seed(0)
    model = twin(family)
    if family == "flux":
        model.set_attention_backend("_native_math")  # kept through install and the copy
    kw = make_call(family, batch=1, text=5, h=3, w=2)
    with torch.no_grad():
        ref = model(**kw).sample
        install(model)
        dup = copy.deepcopy(model)
        assert {type(p) for p in dup.attn_processors.values()} == {STOCK[family]}
        assert _close(dup(**kw).sample, ref)
    if family == "flux":
        assert {str(p._attention_backend) for p in dup.attn_processors.values()} == \
            {str(p._attention_backend) for p in model.attn_processors.values()} != {"None"}
