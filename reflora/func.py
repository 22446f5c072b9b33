r"""RefLoRA for ``torch.func`` training: pure optimizers over parameter dicts (arXiv 2505.18877).

``reflora.attach`` hooks a ``torch.optim`` optimizer and writes into parameters, gradients and
optimizer state in place. This module is the same method for code that keeps its parameters in
a dict (``torch.func.functional_call``, ``torch.func.grad``, ``torch.func.stack_module_state``):
an optimizer is a pair of pure functions

.. code-block:: text

    state          = opt.init(params, lr=None)
    params, state  = opt.update(grads, state, params)

over ``{name: Tensor}`` dicts. The base step is AdamW (:func:`adamw`) or SGD with momentum,
dampening, Nesterov and weight decay (:func:`sgd`), written to give ``torch.optim.AdamW`` /
``torch.optim.SGD``'s step (tested equal to them in float64). The pairs are named by discovery
on the module (:func:`pairs_of`); every other parameter (a head, biases) gets the plain base step.
Each step, before the base step, in the four modes of :func:`reflora.attach` (``space="auto"``, the
default, resolves as ``attach`` resolves it for ``torch.optim.AdamW`` / ``torch.optim.SGD``:
``"parameter"`` for :func:`adamw`, ``"gradient"`` for :func:`sgd`; ``opt.space`` holds the result):

.. code-block:: text

    space="gradient":  grad_A <- S^{-1} grad_A,  grad_B <- grad_B S        S = (A A^T)^{-1} # (B^T B)
    space="parameter": A <- P^T A,  B <- B P^{-T},  grads and first moments <- P^{-1} g_A, g_B P,
                       second moments by the rule ("square", "keep", "reset")
    variant="scalar":  S = p^2 I (RefLoRA-S), p = sqrt(||B||_F / ||A||_F)

with ``attach``'s semantics: ``t`` counts completed steps from 0; RefLoRA acts at ``t >=
warmup_steps`` with ``(t - warmup_steps) % interval == 0``; in gradient space ``S`` and ``S^{-1}``
are recomputed there and the cached pair (kept in the state) is applied in between; in parameter
space the factors are refactored there only. Same-shape pairs are stacked and computed by one
batched kernel call (:mod:`reflora.functional`'s core).

Everything is a tensor: the step counter (a 0-d int64), the learning rate (a 0-d float64 in the
state, so a vmapped ensemble can hold one per member and a schedule can replace it without a
recompile), the moments, the cached metrics. There is no ``.item()``, no in-place update of an
input and no Python branch on a tensor value (warmup and interval select results with
``torch.where``), so ``update`` runs under ``torch.func.vmap`` over stacked model states and
under ``torch.compile(fullgraph=True)`` without recompiling from step to step.

Where this deviates from ``attach`` and from ``torch.optim`` (also in docs/func.md):

* **torch.optim's functional kernels are not reused.** On torch 2.14 ``torch.optim.adam.adam``
  takes the step with ``.item()`` (which ``vmap`` refuses) unless ``capturable=True`` (which
  refuses CPU tensors) or ``differentiable=True``, which runs under ``vmap`` but updates with
  in-place ``lerp_`` / ``addcmul_`` / ``addcdiv_`` that have no batching rule (functorch falls
  back to a loop over the members, with a warning per op). ``torch.optim.sgd.sgd`` applies the
  learning rate as ``alpha=-lr`` (``.item()`` on a tensor learning rate) and creates its
  momentum buffer on a Python ``is None`` branch. Both base steps are therefore written here in
  out-of-place tensor ops, following ``_single_tensor_adam`` / ``_single_tensor_sgd`` op for op
  (the bias corrections are computed from the tensor step in float64, where torch computes them
  in Python floats), and tested equal to ``torch.optim.AdamW`` / ``torch.optim.SGD``.
* **Cost of warmup and interval.** Gating with ``torch.where`` means the ``r x r`` kernel runs
  every step, also during warmup and between refreshes, and its result is discarded there (as in
  ``attach``'s compiled steps): ``interval > 1`` changes what is applied, not what is computed.
  With ``warmup_steps=0`` and ``interval=1`` nothing is gated (the default warmup is 3 steps
  where the resolution gate is on, see :func:`reflora.attach`).
* **Kernel.** Always the general kernel; ``attach``'s eager CPU shortcut (two ``eigh`` for
  all-live pairs) needs a host sync to decide. Same answer to round-off.
* **Every parameter has a gradient.** ``grads`` must hold every key of ``params`` (what
  ``torch.func.grad`` returns); a pair whose gradients are zero is still preconditioned /
  refactored, where ``attach`` skips pairs whose ``.grad`` is ``None``. There is no
  ``GradScaler`` skip, one learning rate and one weight decay for all parameters (no param
  groups), and no ``maximize`` / ``foreach`` / ``fused`` / complex / sparse support.
* ``rank_above_size="skip"`` (default, as in ``attach``) leaves pairs with ``r > min(m, n)`` to
  the base step, with one warning from ``init``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.func import functional_call, grad
    >>> import reflora
    >>> class LoRALinear(nn.Module):  # loralib style: found by reflora.adapters.find_pairs
    ...     def __init__(self, m, n, r):
    ...         super().__init__()
    ...         self.lora_A = nn.Parameter(torch.randn(r, m) / m**0.5)
    ...         self.lora_B = nn.Parameter(torch.zeros(n, r))
    ...     def forward(self, x):
    ...         return x @ (self.lora_B @ self.lora_A).T
    >>> model = nn.Sequential(LoRALinear(8, 8, 2), nn.Tanh(), LoRALinear(8, 4, 2))
    >>> opt = reflora.func.adamw(reflora.func.pairs_of(model), lr=1e-2)  # space="auto": "parameter"
    >>> params = {k: v.detach() for k, v in model.named_parameters()}
    >>> state = opt.init(params)
    >>> x, y = torch.randn(16, 8), torch.randn(16, 4)
    >>> loss = lambda p: (functional_call(model, p, (x,)) - y).square().mean()
    >>> for _ in range(3):
    ...     params, state = opt.update(grad(loss)(params), state, params)
    >>> int(state["step"])
    3
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from reflora._linalg import compute_dtype
from reflora.config import RefLoRAConfig, check_int, default_space
from reflora.functional import Transform
from reflora.pairs import LAYOUTS, LoRAPair, from_core, to_core
from reflora.step import kernel_of_stack, transformed
from reflora.transport import state_kinds

__all__ = ["FunctionalOptimizer", "ParamPair", "adamw", "pairs_of", "sgd"]

Params = Mapping[str, Tensor]
State = dict[str, Any]
# the torch.optim optimizer each base step equals: space="auto" and the state kinds follow its
# registration (reflora.default_space, reflora.transport.state_kinds)
_TORCH_OPTIMIZER = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class ParamPair(NamedTuple):
    """A LoRA pair named by its parameters' keys in the params dict.

    Attributes:
        A: key of the down-projection (``lora_A.weight``, ``(r, m)`` in the core's layout).
        B: key of the up-projection (``lora_B.weight``, ``(n, r)``).
        layout: the stored layouts of ``A`` and ``B`` (:data:`reflora.pairs.LAYOUTS`).
        experts: how many MoE expert pairs the two tensors stack (see :class:`reflora.LoRAPair`).
        name: the pair's name (discovery's name; ``None``: the key of ``A``). It keys the
            cached metrics in the state.
    """

    A: str
    B: str
    layout: tuple[str, str] = ("plain", "plain")
    experts: int = 1
    name: str | None = None

    @property
    def key(self) -> str:
        return self.A if self.name is None else self.name


def pairs_of(
    model: nn.Module, *, adapters: Literal["active", "all"] = "active", example_inputs: Any = None,
) -> tuple[ParamPair, ...]:
    """The LoRA pairs of ``model``, named by their keys in ``dict(model.named_parameters())``.

    Discovery is :func:`reflora.adapters.find_pairs` (PEFT, timm, PyG, loralib-style and marked
    pairs; layouts and MoE experts included); a pair's factors are matched to their names by
    identity. The keys are those of ``model.named_parameters()``, which is what
    ``torch.func.functional_call`` and ``torch.func.stack_module_state`` use.

    Args:
        model: the module whose pairs are wanted.
        adapters: ``"active"`` or ``"all"`` adapters of multi-adapter (PEFT) models.
        example_inputs: what ``model`` is called with; when given, pairs no finder recognises
            are found by traced discovery (``find_pairs(model, example_inputs=...)``).

    Raises:
        reflora.adapters.NoPairsFoundError: the model holds no trainable pair.
        ValueError: a pair's factor is not among the model's parameters.
    """
    from reflora.adapters import NoPairsFoundError, find_pairs

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        found = find_pairs(model, adapters=adapters, example_inputs=example_inputs)
    except NoPairsFoundError:
        raise NoPairsFoundError(
            f"no trainable low-rank pair found in {type(model).__name__}: name the pairs yourself, "
            "ParamPair(name_of_A, name_of_B) or (name_of_A, name_of_B) tuples"
            + (", or pass example_inputs= to find them from a forward pass" if example_inputs is None else "")
            + ", or register a finder for your LoRA layer (reflora.adapters.register_finder)"
        ) from None
    out = []
    for pair in found:
        keys = []
        for label, t in (("A", pair.A), ("B", pair.B)):
            key = names.get(id(t))
            if key is None:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not among "
                    f"{type(model).__name__}.named_parameters(); pass the module that owns it"
                )
            keys.append(key)
        out.append(ParamPair(keys[0], keys[1], tuple(pair.layout), pair.experts, pair.name))
    return tuple(out)


# ----------------------------------------------------------------------------- validation


def _check_float(name: str, value: Any, lo: float, hi: float | None = None, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    ok = value >= lo and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        interval = f"[{lo}, {hi})" if hi_open else (f"[{lo}, {hi}]" if hi is not None else f">= {lo}")
        raise ValueError(f"{name} must be {'in ' if hi is not None else ''}{interval}; got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _as_param_pairs(pairs: Any) -> tuple[ParamPair, ...]:
    if pairs is None:
        return ()
    if isinstance(pairs, nn.Module):
        return pairs_of(pairs)
    if isinstance(pairs, (str, bytes, Tensor)) or not isinstance(pairs, Iterable):
        raise TypeError(
            "pairs must be an nn.Module (pairs found by reflora.func.pairs_of), an iterable of "
            f"ParamPair / (name_of_A, name_of_B) tuples, or None (no RefLoRA); got {type(pairs).__name__}"
        )
    out: list[ParamPair] = []
    for i, item in enumerate(pairs):
        if not isinstance(item, ParamPair):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"pairs[{i}] must be a ParamPair or a (name_of_A, name_of_B) tuple; got {item!r}"
                )
            item = ParamPair(item[0], item[1])
        for label, key in (("A", item.A), ("B", item.B)):
            if not isinstance(key, str):
                raise TypeError(f"pairs[{i}]: the name of {label} must be a str (a key of params); got {key!r}")
        if item.name is not None and not isinstance(item.name, str):
            raise TypeError(f"pairs[{i}]: name must be a str or None; got {item.name!r}")
        if not (isinstance(item.layout, tuple) and len(item.layout) == 2 and all(x in LAYOUTS for x in item.layout)):
            raise ValueError(f"pairs[{i}]: layout must be a pair of {LAYOUTS}; got {item.layout!r}")
        check_int(f"pairs[{i}].experts", item.experts, 1)
        if item.A == item.B:
            raise ValueError(f"pairs[{i}]: A and B are the same parameter {item.A!r}")
        out.append(item)
    if not out:
        raise ValueError(
            "no pairs given: RefLoRA would be a silent no-op; pass at least one pair, or pairs=None "
            "for the plain optimizer"
        )
    owner: dict[str, str] = {}
    keys: set[str] = set()
    for p in out:
        if p.key in keys:
            raise ValueError(f"two pairs are named {p.key!r}; pair names must be unique")
        keys.add(p.key)
        for t in (p.A, p.B):
            if t in owner:
                raise ValueError(
                    f"parameter {t!r} belongs to pair {owner[t]!r} and to pair {p.key!r}; each factor may "
                    "belong to one pair only (duplicate pairs?)"
                )
            owner[t] = p.key
    return tuple(out)


def _check_dict(name: str, d: Any) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{name} must be a dict of tensors {{name: Tensor}}; got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}[{k!r}] must be a Tensor; got {type(v).__name__}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{name}[{k!r}] has dtype {v.dtype}; expected a real floating dtype")


_NAME_HINT = "Name the pairs with reflora.func.pairs_of(model) on the module whose named_parameters() built the dict"
_STATE_HINT = "Build the state with this optimizer's init(params)"


def _missing(name: str, keys: Iterable[str], have: Mapping[str, Any], hint: str = _NAME_HINT) -> None:
    missing = [k for k in keys if k not in have]
    if missing:
        sample = ", ".join(repr(k) for k in list(have)[:4]) + (", ..." if len(have) > 4 else "")
        raise ValueError(
            f"{name} has no entry for {missing[:4]}{' and more' if len(missing) > 4 else ''}; it has "
            f"{len(have)} entries ({sample}). {hint}"
        )


def _own(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` as a tensor of ``ref``'s member: under ``vmap(opt.init)`` one real copy per member.

    A state tensor that depends on no input comes out of ``vmap`` as an expanded view (stride 0),
    and the first ``update`` returns it materialised: a compiled ``update`` would see new strides
    at its second call and recompile.
    """
    return x + torch.zeros_like(ref.reshape(-1)[:1], dtype=x.dtype).reshape(())


# ----------------------------------------------------------------------------- the optimizer


@dataclass(frozen=True)
class _Group:
    """Same-shape pairs, computed by one batched kernel call."""

    pairs: tuple[ParamPair, ...]
    layout: tuple[str, str]
    experts: int
    rank: int


@dataclass(frozen=True)
class FunctionalOptimizer:
    """A pure RefLoRA optimizer: :meth:`init` and :meth:`update` over parameter dicts.

    Built by :func:`adamw` or :func:`sgd`; see the module docstring for the semantics. The
    attributes are the validated configuration.
    """

    pairs: tuple[ParamPair, ...]
    base: str
    lr: float
    hyper: tuple[tuple[str, Any], ...]
    config: RefLoRAConfig

    # the RefLoRA options, read from the configuration (space resolved)
    variant = property(lambda self: self.config.variant)
    space = property(lambda self: self.config.space)
    warmup_steps = property(lambda self: self.config.warmup_steps)
    interval = property(lambda self: self.config.interval)
    second_moment = property(lambda self: self.config.second_moment)
    frame = property(lambda self: self.config.frame)
    solver = property(lambda self: self.config.solver)
    rank_above_size = property(lambda self: self.config.rank_above_size)
    resolved = property(lambda self: self.config.resolved)

    @property
    def reflora_eps(self) -> float:
        """The dead-direction threshold (``None`` given: the float64 default)."""
        return self.config.eps_for(torch.float64)

    # -- state layout ----------------------------------------------------------------------
    def _hp(self, key: str) -> Any:
        return dict(self.hyper)[key]

    def _moment_kinds(self) -> tuple[tuple[str, str], ...]:
        """The per-parameter state: ``(key, kind)``, the kinds as registered for the torch
        optimizer the base step equals (:func:`reflora.transport.state_kinds`)."""
        if self.base == "adamw":
            keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self._hp("amsgrad") else ())
        else:
            keys = ("momentum_buffer",) if self._hp("momentum") != 0 else ()
        kinds = state_kinds(_TORCH_OPTIMIZER[self.base]) or {}
        return tuple((key, kinds[key]) for key in keys)

    def _caches(self) -> bool:
        return bool(self.pairs) and self.config.caches

    # -- planning (static: names and shapes only) -------------------------------------------
    def _groups(self, params: Params, warn: bool = False) -> list[_Group]:
        _missing("params", [k for p in self.pairs for k in (p.A, p.B)], params)
        groups: dict[tuple, list[ParamPair]] = {}
        above = []
        for p in self.pairs:
            A, B = params[p.A], params[p.B]
            if warn:  # full validation once, in init: layouts, expert splits, ranks
                LoRAPair(p.key, A, B, p.layout, experts=p.experts)  # type: ignore[arg-type]
                if A.dtype != B.dtype:
                    raise TypeError(f"pair {p.key!r}: A has dtype {A.dtype} but B has dtype {B.dtype}")
                if A.device != B.device:
                    raise ValueError(f"pair {p.key!r}: A is on {A.device} but B is on {B.device}")
            a, b = to_core(A, p.layout[0], p.experts), to_core(B, p.layout[1], p.experts)
            r, m, n = a.shape[-2], a.shape[-1], b.shape[-2]
            if b.shape[-1] != r:
                raise ValueError(
                    f"pair {p.key!r}: A has rank {r} (shape {tuple(a.shape)}) but B has rank {b.shape[-1]} "
                    f"(shape {tuple(b.shape)})"
                )
            if r > min(m, n) and self.rank_above_size == "skip":
                above.append((p, r, m, n))
                continue
            if r > min(m, n) and self.variant == "full" and self.space == "parameter" and self.solver == "newton_schulz":
                raise ValueError(
                    f"solver='newton_schulz' with space='parameter' cannot refactor pair {p.key!r} whose rank "
                    f"exceeds the layer's size (r={r}, m={m}, n={n}): it has no dead-direction handling "
                    "(measured: NaN). Use solver='eigh', space='gradient' or rank_above_size='skip'"
                )
            key = (A.dtype, A.device, p.experts, r, m, n, p.layout)
            groups.setdefault(key, []).append(p)
        if above:
            names = ", ".join(f"{p.key!r} (r={r}, m={m}, n={n})" for p, r, m, n in above[:4])
            if not groups:
                raise ValueError(
                    f"every pair has a rank above its layer's size (r > min(m, n)): {names}. Such pairs are "
                    "skipped by default (rank_above_size='skip'), which would leave nothing to do. Pass "
                    "rank_above_size='act', or check that A is (r, m) = lora_A.weight and B is (n, r)"
                )
            if warn:
                warnings.warn(
                    f"leaving {len(above)} pair(s) whose rank exceeds the layer's size (r > min(m, n)) to the "
                    f"base step: {names}; pass rank_above_size='act' to apply RefLoRA to them anyway",
                    stacklevel=3,
                )
        return [
            _Group(tuple(ps), key[6], key[2], key[3]) for key, ps in groups.items()
        ]

    # -- init ------------------------------------------------------------------------------
    def init(self, params: Params, lr: float | Tensor | None = None) -> State:
        """The initial state for ``params`` (zero moments, step 0, identity metrics).

        Args:
            params: ``{name: Tensor}``, the parameters this optimizer trains.
            lr: the learning rate, a float or a 0-d tensor (``None``: the constructor's). Under
                ``vmap(opt.init)(params, lrs)`` each member gets its own. It is kept in the
                state as ``state["lr"]`` (0-d float64): replace it between steps for a schedule.

        Returns:
            ``{"step": 0-d int64, "lr": 0-d float64, <moment>: {name: Tensor}, ...}``; gradient
            space with ``interval > 1`` adds ``"metric"`` / ``"metric_inv"``: ``{pair: S}``.
        """
        _check_dict("params", params)
        if not params:
            raise ValueError("params is empty: nothing to optimize")
        groups = self._groups(params, warn=True) if self.pairs else []
        first = next(iter(params.values()))
        if lr is None:
            lr = self.lr
        if isinstance(lr, Tensor):
            if lr.dim() != 0 or not lr.dtype.is_floating_point:
                raise ValueError(
                    f"lr must be a float or a 0-d floating tensor (one per member under vmap); got a "
                    f"{lr.dtype} tensor of shape {tuple(lr.shape)}"
                )
            lr_t = _own(lr.to(device=first.device, dtype=torch.float64), first)
        else:
            lr_t = _own(torch.tensor(_check_float("lr", lr, 0.0), dtype=torch.float64, device=first.device), first)
        state: State = {"step": _own(torch.zeros((), dtype=torch.int64, device=first.device), first), "lr": lr_t}
        for key, _ in self._moment_kinds():
            state[key] = {k: torch.zeros_like(v) for k, v in params.items()}
        if self._caches():
            state["metric"], state["metric_inv"] = {}, {}
            for g in groups:
                r = 1 if self.variant == "scalar" else g.rank
                for p in g.pairs:
                    A = params[p.A]
                    eye = _own(torch.eye(r, dtype=compute_dtype(A.dtype), device=A.device), A)
                    if g.experts > 1:
                        eye = eye.expand(g.experts, r, r).clone()
                    state["metric"][p.key], state["metric_inv"][p.key] = eye, eye.clone()
        return state

    # -- update ----------------------------------------------------------------------------
    def update(self, grads: Params, state: State, params: Params) -> tuple[dict[str, Tensor], State]:
        """One step: RefLoRA (per the schedule) and the base step. Pure: inputs are not modified.

        Args:
            grads: ``{name: Tensor}`` with the keys and shapes of ``params``.
            state: what :meth:`init` (or the previous ``update``) returned.
            params: the current parameters.

        Returns:
            ``(new_params, new_state)``.
        """
        _check_dict("params", params)
        _check_dict("grads", grads)
        if set(grads) != set(params):
            extra, missing = sorted(set(grads) - set(params)), sorted(set(params) - set(grads))
            raise ValueError(
                f"grads and params must have the same keys; grads lacks {missing[:4]} and has extra "
                f"{extra[:4]} (every trained parameter needs a gradient, as torch.func.grad returns)"
            )
        for k, g in grads.items():
            if g.shape != params[k].shape:
                raise ValueError(f"grads[{k!r}] has shape {tuple(g.shape)} but params[{k!r}] has {tuple(params[k].shape)}")
        if not isinstance(state, Mapping) or "step" not in state or "lr" not in state:
            raise TypeError("state must be the dict returned by init(params) (with 'step' and 'lr')")
        groups = self._groups(params) if self.pairs else []
        for key, _ in self._moment_kinds():
            if key not in state:
                raise ValueError(f"state has no {key!r}: build it with this optimizer's init(params)")
            _missing(f"state[{key!r}]", params, state[key], _STATE_HINT)
        if self._caches():
            for key in ("metric", "metric_inv"):
                if key not in state:
                    raise ValueError(f"state has no {key!r}: build it with this optimizer's init(params)")
                _missing(f"state[{key!r}]", [p.key for g in groups for p in g.pairs], state[key], _STATE_HINT)
        t, lr = state["step"], state["lr"]
        params, grads = dict(params), dict(grads)
        new_state: State = dict(state)
        for key, _ in self._moment_kinds():
            new_state[key] = dict(state[key])
        # like torch.optim's step: not differentiable, and no autograd graph chained across
        # steps when the inputs require grad (torch.func.stack_module_state's do)
        with torch.no_grad():
            if groups:
                self._reflora(groups, t, grads, new_state, params)
            self._base_step(t, lr, grads, new_state, params)
            new_state["step"] = t + 1
        return params, new_state

    # -- RefLoRA ---------------------------------------------------------------------------
    def _gates(self, t: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(started, active)`` as 0-d bool tensors, or ``None`` where always true."""
        if self.warmup_steps == 0 and self.interval == 1:
            return None, None
        started = t >= self.warmup_steps
        if self.interval == 1:
            return started, started
        return started, started & ((t - self.warmup_steps) % self.interval == 0)

    def _core(self, d: Mapping[str, Tensor], p: ParamPair, side: int) -> Tensor:
        return to_core(d[p.B if side else p.A], p.layout[side], p.experts)

    def _put(self, out: dict[str, Tensor], p: ParamPair, side: int, x: Tensor) -> None:
        """Write a core-layout result back in the stored layout, as contiguous as the input was:
        a compiled ``update`` guards on strides, and a transposed result must not change them."""
        key = p.B if side else p.A
        like = out[key]
        x = from_core(x, p.layout[side], like.shape, p.experts)
        out[key] = x.contiguous() if like.is_contiguous() else x

    def _kernel(self, g: _Group, params: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One batched call for the group: ``(S, S^{-1})`` in gradient space, ``(left, right)`` =
        ``(P^T, P^{-T})`` in parameter space; ``(G, [E,] r, r)`` or ``(G, [E,] 1, 1)``, float64."""
        A = torch.stack([self._core(params, p, 0) for p in g.pairs])
        B = torch.stack([self._core(params, p, 1) for p in g.pairs])
        return kernel_of_stack(A, B, self.config, self.reflora_eps)

    def _reflora(
        self, groups: list[_Group], t: Tensor, grads: dict[str, Tensor], state: State, params: dict[str, Tensor]
    ) -> None:
        """Precondition ``grads``, or refactor ``params``, ``grads`` and the moments, in place in
        these (fresh) dicts. Only the Grams and the r x r kernel are stacked per group; the
        transforms are applied pair by pair, so that every result is a tensor of its own (a slice
        of a stacked result would carry the stack's strides into the state)."""
        started, active = self._gates(t)
        if self._caches():
            state["metric"], state["metric_inv"] = dict(state["metric"]), dict(state["metric_inv"])
        for g in groups:
            left, right = self._kernel(g, params)
            if self._caches():
                assert active is not None
                old = torch.stack([state["metric"][p.key] for p in g.pairs])
                old_inv = torch.stack([state["metric_inv"][p.key] for p in g.pairs])
                left, right = torch.where(active, left, old), torch.where(active, right, old_inv)
                for j, p in enumerate(g.pairs):  # r x r: the clones are free
                    state["metric"][p.key], state["metric_inv"][p.key] = left[j].clone(), right[j].clone()
            # the r x r results are applied in float32 or wider, as attach does
            dt = torch.promote_types(params[g.pairs[0].A].dtype, torch.float32)
            left, right = left.to(dt), right.to(dt)
            gate = started if self.space == "gradient" else active
            for j, p in enumerate(g.pairs):
                core = lambda d: (self._core(d, p, 0), self._core(d, p, 1))  # noqa: E731
                parameter = self.space == "parameter"
                kinds = self._moment_kinds() if parameter else ()
                news = transformed(
                    Transform(left[j], right[j]), core(grads), core(params) if parameter else None,
                    [(kind, core(state[key])) for key, kind in kinds], self.second_moment, gate,
                )
                outs = [grads] + ([params] + [state[key] for key, _ in kinds] if parameter else [])
                for out, new in zip(outs, news):
                    if new is not None:  # (a state its kind leaves alone is not written)
                        self._put(out, p, 0, new[0])
                        self._put(out, p, 1, new[1])

    # -- base steps ------------------------------------------------------------------------
    def _base_step(self, t: Tensor, lr: Tensor, grads: dict[str, Tensor], state: State, params: dict[str, Tensor]) -> None:
        if self.base == "adamw":
            self._adamw(t, lr, grads, state, params)
        else:
            self._sgd(t, lr, grads, state, params)

    def _adamw(self, t: Tensor, lr: Tensor, grads: dict[str, Tensor], state: State, params: dict[str, Tensor]) -> None:
        # torch.optim.adam._single_tensor_adam (capturable=False, decoupled_weight_decay=True),
        # out of place; the step-dependent scalars are 0-d float64 tensors instead of Python floats
        beta1, beta2 = self._hp("betas")
        eps, wd, amsgrad = self._hp("eps"), self._hp("weight_decay"), self._hp("amsgrad")
        step = (t + 1).to(torch.float64)
        decay = 1 - lr * wd
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step).sqrt()
        for k, p in params.items():
            g, dtype = grads[k], p.dtype
            if wd != 0:
                p = p * decay.to(dtype)
            m = state["exp_avg"][k].lerp(g, 1 - beta1)
            v = state["exp_avg_sq"][k].mul(beta2).addcmul(g, g, value=1 - beta2)
            if amsgrad:
                vmax = torch.maximum(state["max_exp_avg_sq"][k], v)
                state["max_exp_avg_sq"][k] = vmax
                denom = (vmax.sqrt() / bias_correction2_sqrt.to(dtype)).add(eps)
            else:
                denom = (v.sqrt() / bias_correction2_sqrt.to(dtype)).add(eps)
            params[k] = p - step_size.to(dtype) * m / denom
            state["exp_avg"][k], state["exp_avg_sq"][k] = m, v

    def _sgd(self, t: Tensor, lr: Tensor, grads: dict[str, Tensor], state: State, params: dict[str, Tensor]) -> None:
        # torch.optim.sgd._single_tensor_sgd, out of place; its `buf is None` branch (the first
        # step takes the gradient itself, without dampening) is a selection on t == 0
        momentum, dampening = self._hp("momentum"), self._hp("dampening")
        wd, nesterov = self._hp("weight_decay"), self._hp("nesterov")
        first = t == 0
        for k, p in params.items():
            g = grads[k]
            if wd != 0:
                g = g.add(p, alpha=wd)
            if momentum != 0:
                buf = state["momentum_buffer"][k].mul(momentum).add(g, alpha=1 - dampening)
                buf = torch.where(first, g, buf)
                state["momentum_buffer"][k] = buf
                g = g.add(buf, alpha=momentum) if nesterov else buf
            params[k] = p - lr.to(p.dtype) * g


# ----------------------------------------------------------------------------- constructors


def _make(
    pairs: Any, base: str, lr: float, hyper: dict[str, Any], *, variant: str, space: str, warmup_steps: int | None,
    interval: int, second_moment: str, frame: str | None, solver: str, reflora_eps: float | None,
    rank_above_size: str, resolved: float | None,
) -> FunctionalOptimizer:
    lr = _check_float("lr", lr, 0.0)
    cfg = RefLoRAConfig(
        variant=variant, space=space, warmup_steps=warmup_steps, interval=interval,  # type: ignore[arg-type]
        second_moment=second_moment, frame=frame, solver=solver, eps=reflora_eps,  # type: ignore[arg-type]
        rank_above_size=rank_above_size, resolved=resolved,  # type: ignore[arg-type]
    )
    if cfg.space == "auto":  # as attach resolves it for the torch optimizer this base step equals
        cfg = cfg.with_space(default_space(_TORCH_OPTIMIZER[base]))
    cfg.warn_if_unstable(_TORCH_OPTIMIZER[base], stacklevel=4)
    return FunctionalOptimizer(pairs=_as_param_pairs(pairs), base=base, lr=lr, hyper=tuple(hyper.items()), config=cfg)


def adamw(
    pairs: nn.Module | Iterable[ParamPair | tuple[str, str]] | None,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    variant: Literal["full", "scalar"] = "full",
    space: Literal["auto", "gradient", "parameter"] = "auto",
    warmup_steps: int | None = None,
    interval: int = 1,
    second_moment: Literal["square", "keep", "reset"] = "square",
    frame: Literal["paper", "symmetric"] | None = None,
    solver: Literal["eigh", "newton_schulz"] = "eigh",
    reflora_eps: float | None = None,
    rank_above_size: Literal["skip", "act"] = "skip",
    resolved: float | None = None,
) -> FunctionalOptimizer:
    r"""RefLoRA on AdamW, as pure functions over parameter dicts (arXiv 2505.18877).

    .. code-block:: text

        (RefLoRA: precondition the pairs' grads, or refactor pairs, grads and moments)
        p <- p (1 - lr wd);  m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)     (v: max so far with amsgrad)

    Args:
        pairs: the pairs: an ``nn.Module`` (:func:`pairs_of`), an iterable of
            :class:`ParamPair` or ``(name_of_A, name_of_B)`` tuples, or ``None`` for plain
            AdamW (a baseline: the RefLoRA options are then unused).
        lr, betas, eps, weight_decay, amsgrad: as ``torch.optim.AdamW`` (same defaults). ``eps``
            is Adam's; RefLoRA's dead-direction threshold is ``reflora_eps``.
        variant, space, warmup_steps, interval, second_moment, frame, solver, rank_above_size, resolved: as
            :func:`reflora.attach` (same defaults; ``space="auto"`` is ``"parameter"`` here,
            what ``attach`` picks for ``torch.optim.AdamW``). ``second_moment`` rules
            ``exp_avg_sq`` (and ``max_exp_avg_sq``) in parameter space.
        reflora_eps: ``attach``'s ``eps`` (``None``: 1.4e-14).

    Returns:
        A :class:`FunctionalOptimizer`.
    """
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a (beta1, beta2) tuple; got {betas!r}")
    hyper = {
        "betas": (_check_float("betas[0]", betas[0], 0.0, 1.0, True), _check_float("betas[1]", betas[1], 0.0, 1.0, True)),
        "eps": _check_float("eps", eps, 0.0),
        "weight_decay": _check_float("weight_decay", weight_decay, 0.0),
        "amsgrad": _check_bool("amsgrad", amsgrad),
    }
    return _make(pairs, "adamw", lr, hyper, variant=variant, space=space, warmup_steps=warmup_steps,
                 interval=interval, second_moment=second_moment, frame=frame, solver=solver,
                 reflora_eps=reflora_eps, rank_above_size=rank_above_size, resolved=resolved)


def sgd(
    pairs: nn.Module | Iterable[ParamPair | tuple[str, str]] | None,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    variant: Literal["full", "scalar"] = "full",
    space: Literal["auto", "gradient", "parameter"] = "auto",
    warmup_steps: int | None = None,
    interval: int = 1,
    second_moment: Literal["square", "keep", "reset"] = "square",
    frame: Literal["paper", "symmetric"] | None = None,
    solver: Literal["eigh", "newton_schulz"] = "eigh",
    reflora_eps: float | None = None,
    rank_above_size: Literal["skip", "act"] = "skip",
    resolved: float | None = None,
) -> FunctionalOptimizer:
    r"""RefLoRA on SGD (momentum, dampening, Nesterov, weight decay), as pure functions.

    .. code-block:: text

        (RefLoRA: precondition the pairs' grads, or refactor pairs, grads and momentum)
        g <- g + wd p;  b <- g at the first step, else momentum b + (1 - dampening) g
        g <- g + momentum b (nesterov) or b;  p <- p - lr g

    Args:
        pairs: as :func:`adamw` (``None``: plain SGD).
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD`` (same defaults,
            same checks: Nesterov needs ``momentum > 0`` and ``dampening == 0``).
        variant, space, warmup_steps, interval, second_moment, frame, solver, reflora_eps, rank_above_size, resolved:
            as :func:`adamw` (SGD has no second moment; ``space="auto"`` is ``"gradient"`` here,
            what ``attach`` picks for ``torch.optim.SGD``).

    Returns:
        A :class:`FunctionalOptimizer`.
    """
    hyper = {
        "momentum": _check_float("momentum", momentum, 0.0),
        "dampening": _check_float("dampening", dampening, float("-inf")),
        "weight_decay": _check_float("weight_decay", weight_decay, 0.0),
        "nesterov": _check_bool("nesterov", nesterov),
    }
    if nesterov and (hyper["momentum"] <= 0 or hyper["dampening"] != 0):
        raise ValueError(
            f"nesterov=True needs momentum > 0 and dampening == 0; got momentum={momentum!r}, dampening={dampening!r}"
        )
    return _make(pairs, "sgd", lr, hyper, variant=variant, space=space, warmup_steps=warmup_steps,
                 interval=interval, second_moment=second_moment, frame=frame, solver=solver,
                 reflora_eps=reflora_eps, rank_above_size=rank_above_size, resolved=resolved)
