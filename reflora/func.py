r"""RefLoRA for ``torch.func`` training: pure optimizers over parameter dicts (arXiv 2505.18877).

``reflora.attach`` hooks a ``torch.optim`` optimizer and writes into parameters, gradients and
optimizer state in place. This module is the same method for code that keeps its parameters in
a dict (``torch.func.functional_call``, ``torch.func.grad``, ``torch.func.stack_module_state``):
an optimizer is a pair of pure functions

.. code-block:: text

    state          = opt.init(params, lr=None)
    params, state  = opt.update(grads, state, params)

over ``{name: Tensor}`` dicts. The base step is AdamW (:func:`adamw`) or SGD with momentum,
dampening, Nesterov and weight decay (:func:`sgd`), equal to ``torch.optim.AdamW`` /
``torch.optim.SGD``'s step. The pairs are named by discovery on the module (:func:`pairs_of`);
every other parameter (a head, biases) gets the plain base step.
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

Everything is a tensor: the step counter (0-d int64), the learning rate (0-d float64 in the
state: a vmapped ensemble holds one per member, a schedule replaces it without a recompile), the
moments, the cached metrics. There is no ``.item()``, no in-place update of an input and no
Python branch on a tensor value (warmup and interval select results with ``torch.where``), so
``update`` runs under ``torch.func.vmap`` and ``torch.compile(fullgraph=True)`` without
recompiling. The base steps are a table of pure functions (:mod:`reflora.base_steps`). Where
this deviates from ``attach`` and ``torch.optim`` (every parameter needs a gradient, the kernel
runs during warmup too, no param groups, ...): docs/func.md.

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

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import Tensor, nn

from reflora._linalg import compute_dtype
from reflora.adapters.names import ParamPair, as_param_pairs, pairs_of
from reflora.base_steps import BASE_STEPS, AdamWHyper, SGDHyper, check_float
from reflora.config import RefLoRAConfig
from reflora.functional import Transform
from reflora.optimizers import default_space
from reflora.pairs import LoRAPair, batch_key, from_core, to_core, validate
from reflora.step import kernel_of_stack, transformed
from reflora.transport import get_state_transport, qualname, state_kinds

__all__ = ["FunctionalOptimizer", "ParamPair", "adamw", "pairs_of", "sgd"]

Params = Mapping[str, Tensor]
State = dict[str, Any]


# ----------------------------------------------------------------------------- input checks


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

    Built by :func:`adamw` or :func:`sgd`; see the module docstring for the semantics.

    Attributes:
        pairs: the managed pairs, named by their keys (:class:`ParamPair`).
        base: the base step, a key of :data:`reflora.base_steps.BASE_STEPS` (``"adamw"``, ``"sgd"``).
        lr: the learning rate ``init`` puts in the state.
        hyper: the base step's other hyperparameters (:class:`reflora.base_steps.AdamWHyper`,
            :class:`reflora.base_steps.SGDHyper`).
        config: the validated RefLoRA options (``space`` resolved).
    """

    pairs: tuple[ParamPair, ...]
    base: str
    lr: float
    hyper: AdamWHyper | SGDHyper
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
    def _moment_kinds(self) -> tuple[tuple[str, str], ...]:
        """The per-parameter state: ``(key, kind)``, the kinds as registered for the torch
        optimizer the base step equals (:func:`reflora.transport.state_kinds`)."""
        base = BASE_STEPS[self.base]
        kinds = state_kinds(base.torch_optimizer) or {}
        return tuple((key, kinds[key]) for key in base.moments(self.hyper))

    def _caches(self) -> bool:
        return bool(self.pairs) and self.config.caches

    # -- planning (static: names and shapes only) -------------------------------------------
    def _check_pairs(self, params: Params) -> list[_Group]:
        """``init``: the pairs' tensors checked once (:func:`reflora.pairs.validate`), then planned."""
        _missing("params", [k for p in self.pairs for k in (p.A, p.B)], params)
        pairs = [LoRAPair(p.key, params[p.A], params[p.B], p.layout, experts=p.experts)  # type: ignore[arg-type]
                 for p in self.pairs]
        for p in pairs:
            if p.A.dtype != p.B.dtype:
                raise TypeError(f"pair {p.name!r}: A has dtype {p.A.dtype} but B has dtype {p.B.dtype}")
        validate(pairs, config=self.config, left_to="the base step")
        return self._plan(params)

    def _plan(self, params: Params) -> list[_Group]:
        """The same-shape groups (:func:`reflora.pairs.batch_key`) of the pairs the configuration
        keeps (``rank_above_size="skip"`` leaves out pairs with ``r > min(m, n)``)."""
        _missing("params", [k for p in self.pairs for k in (p.A, p.B)], params)
        groups: dict[tuple, list[ParamPair]] = {}
        ranks: dict[tuple, int] = {}
        for p in self.pairs:
            A, B = params[p.A], params[p.B]
            a, b = to_core(A, p.layout[0], p.experts), to_core(B, p.layout[1], p.experts)
            r, m, n = a.shape[-2], a.shape[-1], b.shape[-2]
            if self.config.leaves_out(r, m, n):
                continue
            key = batch_key(A.device, A.dtype, p.experts, (r, m, n), p.layout)
            groups.setdefault(key, []).append(p)
            ranks[key] = r
        return [_Group(tuple(ps), ps[0].layout, ps[0].experts, ranks[key]) for key, ps in groups.items()]

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
        groups = self._check_pairs(params) if self.pairs else []
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
            lr_t = _own(torch.tensor(check_float("lr", lr, 0.0), dtype=torch.float64, device=first.device), first)
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
        groups = self._plan(params) if self.pairs else []
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
            base = BASE_STEPS[self.base]
            moments = {key: new_state[key] for key, _ in self._moment_kinds()}
            params, moved = base.step(t, lr, grads, moments, params, self.hyper)
            new_state.update(moved)
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


# ----------------------------------------------------------------------------- constructors


def _make(
    pairs: Any, base: str, lr: float, hyper: AdamWHyper | SGDHyper, *, variant: str, space: str,
    warmup_steps: int | None, interval: int, second_moment: str, frame: str | None, solver: str,
    reflora_eps: float | None, rank_above_size: str, resolved: float | None,
) -> FunctionalOptimizer:
    lr = check_float("lr", lr, 0.0)
    cfg = RefLoRAConfig(
        variant=variant, space=space, warmup_steps=warmup_steps, interval=interval,  # type: ignore[arg-type]
        second_moment=second_moment, frame=frame, solver=solver, eps=reflora_eps,  # type: ignore[arg-type]
        rank_above_size=rank_above_size, resolved=resolved,  # type: ignore[arg-type]
    )
    torch_optimizer = BASE_STEPS[base].torch_optimizer
    if cfg.space == "auto":  # as attach resolves it for the torch optimizer this base step equals
        cfg = cfg.with_space(default_space(torch_optimizer))
    transport = get_state_transport(torch_optimizer)
    cfg.warn_if_unstable(qualname(torch_optimizer), transport is not None and transport.keeps_second_moments(),
                         stacklevel=4)
    return FunctionalOptimizer(pairs=as_param_pairs(pairs), base=base, lr=lr, hyper=hyper, config=cfg)


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
    hyper = AdamWHyper(betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)  # type: ignore[arg-type]
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
    hyper = SGDHyper(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
    return _make(pairs, "sgd", lr, hyper, variant=variant, space=space, warmup_steps=warmup_steps,
                 interval=interval, second_moment=second_moment, frame=frame, solver=solver,
                 reflora_eps=reflora_eps, rank_above_size=rank_above_size, resolved=resolved)
