"""A handle's checkpoint: what :meth:`reflora.RefLoRAHandle.state_dict` writes and how it loads,
including checkpoints written by earlier releases (the migration hints in the errors).

The structure depends on the configuration only, never on the steps taken: a handle that
caches metrics (gradient space, ``interval > 1``) lists every pair under ``"cache"`` (zeros until
computed) and names the computed ones under ``"cached"``. So a freshly attached handle's state is
a complete template for ``torch.distributed.checkpoint``, which loads only the keys the template
has. Every tensor is ``r x r`` and the same on every rank (replicated): it loads into any world
size. Pairs are named canonically (:func:`reflora.pairs.canonical_name`), so a state loads into a
handle on the same model with or without DDP / ``torch.compile`` / FSDP wrappers.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from torch import Tensor

from reflora.cache import MetricCache
from reflora.config import RefLoRAConfig
from reflora.pairs import LoRAPair, canonical_name

__all__ = ["MATH_OPTIONS", "load_state", "save_state"]

# options that shape the saved state: they always have to match
_SHAPE_OPTIONS = ("variant", "space", "warmup_steps", "interval")
#: options that change only the arithmetic of later steps (refused unless ``strict=False``)
MATH_OPTIONS = ("resolved", "frame", "second_moment", "solver", "eps")


def save_state(config: RefLoRAConfig, pairs: tuple[LoRAPair, ...], step_count: int, cache: MetricCache) -> dict[str, Any]:
    """The checkpoint of a handle: options, step counter, pair names, cached metrics."""
    entries: dict[str, tuple[Tensor, Tensor]] = {}
    cached: list[str] = []
    if cache.enabled:
        for i, S, S_inv in cache.entries():
            entries[canonical_name(pairs[i].name)] = (S.clone(), S_inv.clone())
        cached = [canonical_name(pairs[i].name) for i in sorted(cache.valid())]
    return {
        "step_count": step_count,
        **{key: getattr(config, key) for key in _SHAPE_OPTIONS},
        **{key: getattr(config, key) for key in MATH_OPTIONS},
        "pair_names": [canonical_name(p.name) for p in pairs],
        "cache": entries,
        "cached": cached,
    }


def _same_schedule_from(state: dict[str, Any], config: RefLoRAConfig) -> bool:
    """Whether a checkpoint saved with another ``warmup_steps`` acts at the same steps as this
    configuration from its ``step_count`` on: both warmups over, and the same phase of
    ``interval``. (Checkpoints of runs that left ``warmup_steps`` at its default before it became
    3 where the gate is on then load with the new default.)"""
    w0, w1, t = int(state["warmup_steps"]), config.warmup_steps, int(state["step_count"])
    return state["interval"] == config.interval and t >= max(w0, w1) and (w0 - w1) % config.interval == 0


def _pair_mismatch(saved: list[str], names: list[str]) -> str:
    """The error for a checkpoint whose pairs are not this handle's: where they first differ."""
    first = next((i for i, (a, b) in enumerate(zip(saved, names)) if a != b), min(len(saved), len(names)))
    at = lambda xs: repr(xs[first]) if first < len(xs) else "(none)"  # noqa: E731
    return (
        f"checkpoint manages {len(saved)} pairs but this handle manages {len(names)}; they first differ at "
        f"position {first}: checkpoint {at(saved)} vs handle {at(names)} (names compared after dropping "
        "the wrapper segments of DDP / DataParallel 'module.', torch.compile '_orig_mod.', FSDP and "
        "activation checkpointing). Attach to the same pairs in the same order: find them on the "
        "same module (e.g. the PEFT model, not its base model), with the same adapters; pairs "
        "passed as (A, B) tuples are named pair0, pair1, ..."
    )


def _check_options(state: dict[str, Any], config: RefLoRAConfig, strict: bool) -> None:
    for key in _SHAPE_OPTIONS:
        if key == "warmup_steps" and _same_schedule_from(state, config):
            continue  # another warmup, but over: both act at the same steps from here on
        if state[key] != getattr(config, key):
            # space="auto" became the default in place of "gradient": name the fix
            hint = (f" (space={state[key]!r} explicitly; the default space='auto' picks by optimizer, "
                    "see reflora.default_space)" if key == "space" else "")
            if key == "warmup_steps":  # the default became 3 where the gate is on (0.3.0: 0)
                hint = (f" (warmup_steps={state[key]!r} explicitly; the default warmup_steps=None is 3 where "
                        "the resolution gate is on; a checkpoint of another warmup loads only once both "
                        "warmups are over and the phase of interval agrees)")
            raise ValueError(
                f"checkpoint was saved with {key}={state[key]!r} but this handle has "
                f"{key}={getattr(config, key)!r}; attach with the same settings to resume{hint}"
            )
    # (checkpoints written before these options were saved are not checked for them)
    differ = {k: (state[k], getattr(config, k)) for k in MATH_OPTIONS if k in state and state[k] != getattr(config, k)}
    if differ and strict:
        saved, now = (", ".join(f"{k}={v[i]!r}" for k, v in differ.items()) for i in (0, 1))
        raise ValueError(
            f"checkpoint was saved with {saved} but this handle has {now}: attach with {saved} to resume the "
            "run as saved, or call load_state_dict(state, strict=False) to go on with this handle's settings"
        )
    if differ:
        warnings.warn(
            "loading a RefLoRA checkpoint saved with other settings; from here on the run uses this handle's: "
            + ", ".join(f"{k}={now!r} (saved {saved!r})" for k, (saved, now) in differ.items()),
            stacklevel=4,
        )


def load_state(state: dict[str, Any], config: RefLoRAConfig, pairs: tuple[LoRAPair, ...], cache: MetricCache,
               set_step_count: Callable[[int], None], strict: bool = True) -> None:
    """Check ``state`` against a handle's configuration and pairs, then restore its step count
    (through ``set_step_count``) and its cached metrics."""
    if not isinstance(state, dict) or "step_count" not in state:
        raise TypeError("state must be a dict returned by RefLoRAHandle.state_dict()")
    _check_options(state, config, strict)
    # both sides normalised: checkpoints written before names were canonical may still carry
    # wrapper prefixes (`module.`, `_orig_mod.`, ...)
    names = [canonical_name(p.name) for p in pairs]
    saved = [canonical_name(n) for n in state["pair_names"]]
    # before 0.4, a pair owned by the model's root module was named '' (now after its factors, 'U+V')
    legacy = {"": names[i] for i, n in enumerate(saved) if n == "" and i < len(names) and "." not in names[i]}
    saved = [legacy.get(n, n) for n in saved]
    if saved != names:
        raise ValueError(_pair_mismatch(saved, names))
    set_step_count(int(state["step_count"]))  # an int in every checkpoint, old and new
    index = {n: i for i, n in enumerate(names)}
    cache.clear()
    # checkpoints before "cached" existed held computed metrics only
    key = lambda n: legacy.get(canonical_name(n), canonical_name(n))  # noqa: E731
    valid_names = {key(n) for n in state.get("cached", state["cache"])}
    for name, (S, S_inv) in state["cache"].items():
        if key(name) in valid_names:
            cache.put(index[key(name)], S, S_inv, name)
