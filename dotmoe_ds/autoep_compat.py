"""One compatibility shim between DeepSpeed's AutoEP and transformers v5's output-capture registry.

The problem (DeepSpeed 0.19.8 with transformers 5.x): when AutoEP replaces an HF MoE block it
re-targets transformers' `router_logits` recorder, reading and restoring entries of
`transformers.utils.output_capturing._CAN_RECORD_REGISTRY` with plain-dict calls keyed by class
name strings: `registry.get(key, default)` and `registry[key] = value`. In transformers v5 that
registry is a `_CanRecordRegistry(dict)` whose `get(model)` takes a model (no default) and whose
`__setitem__` keys by `str(model.__class__)`. So `deepspeed.initialize` fails at start with

    TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given

(deepspeed/module_inject/auto_ep_presets/base.py), and a restore would file the entry under
"<class 'str'>".

The shim teaches `_CanRecordRegistry.get` / `__setitem__` the dict behaviour for string keys (the
class-name keys the registry stores anyway) and leaves every call with a model exactly as it was,
so transformers itself sees no change. It is applied only when `autoep_registry_is_broken()` — a
behavioural probe that runs DeepSpeed's own restore routine against a scratch registry — says the
installed pair is incompatible, so it switches itself off once either library is fixed.
"""
from __future__ import annotations

import functools
import types

_NO_DEFAULT = object()
_state = {"applied": False}


def _registry_class():
    try:
        from transformers.utils import output_capturing
    except ImportError:       # transformers v4: no such registry, nothing to reconcile
        return None
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    return type(registry) if isinstance(registry, dict) and type(registry) is not dict else None


def _deepspeed_install_routine():
    try:
        from deepspeed.module_inject.auto_ep_presets import base
    except ImportError:       # a DeepSpeed without AutoEP
        return None
    return getattr(base, "_install_instance_transformers_output_recorders", None)


def autoep_registry_is_broken() -> bool:
    """True when DeepSpeed's AutoEP cannot read/restore the installed transformers' registry.

    Runs DeepSpeed's `_install_instance_transformers_output_recorders` on an empty module with a
    fresh registry of transformers' class and a no-op hook installer: it must neither raise nor
    leave the registry changed (it restores what it touched)."""
    import torch

    cls, install = _registry_class(), _deepspeed_install_routine()
    if cls is None or install is None:
        return False
    registry = cls()
    registry.update({"<class 'probe.Kept'>": {"kept": 1}})
    before = dict(registry)
    fake = types.SimpleNamespace(_CAN_RECORD_REGISTRY=registry, maybe_install_capturing_hooks=lambda model: None)
    entries = {"<class 'probe.Kept'>": {"replaced": 2}, "<class 'probe.New'>": {"new": 3}}
    try:
        install(torch.nn.Module(), entries, fake, lambda model: 0)
    except TypeError:
        return True
    return dict(registry) != before


def _string_aware_get(original):
    @functools.wraps(original)
    def get(self, key, default=_NO_DEFAULT):
        if isinstance(key, str):
            return dict.get(self, key, None if default is _NO_DEFAULT else default)
        if default is _NO_DEFAULT:
            return original(self, key)
        return dict.get(self, str(key.__class__), default)
    get._dotmoe_autoep_shim = True
    return get


def _string_aware_setitem(original):
    @functools.wraps(original)
    def setitem(self, key, value):
        if isinstance(key, str):
            dict.__setitem__(self, key, value)
        else:
            original(self, key, value)
    setitem._dotmoe_autoep_shim = True
    return setitem


def apply_autoep_compat() -> bool:
    """Install the shim if (and only if) the probe finds the incompatibility; idempotent.

    Returns True when the shim is active after the call. Raises RuntimeError if the shim was
    applied and the probe still fails (a new incompatibility this shim does not cover)."""
    if _state["applied"]:
        return True
    if not autoep_registry_is_broken():
        return False
    cls = _registry_class()
    if not getattr(cls.get, "_dotmoe_autoep_shim", False):
        cls.get = _string_aware_get(cls.get)
        cls.__setitem__ = _string_aware_setitem(cls.__setitem__)
    if autoep_registry_is_broken():
        raise RuntimeError("dotmoe_ds.autoep_compat: DeepSpeed's AutoEP still cannot use transformers' "
                           "output-capture registry after the compatibility shim; this DeepSpeed/transformers "
                           "pair needs a new fix (see dotmoe_ds/autoep_compat.py)")
    _state["applied"] = True
    return True


def autoep_compat_active() -> bool:
    return _state["applied"]
