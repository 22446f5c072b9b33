r"""``attach``: RefLoRA on any ``torch.optim`` optimizer, through its step hooks (arXiv 2505.18877).

``attach(optimizer, pairs, ...)`` builds the options (:class:`reflora.config.RefLoRAConfig`),
finds the pairs and checks them (:func:`reflora.pairs.validate`), resolves the space
(:mod:`reflora.optimizers`) and returns a :class:`reflora.RefLoRAHandle`, whose step hooks run
the step core (:mod:`reflora.step`) on the user's own optimizer object: LR schedulers,
``GradScaler``, gradient clipping, param groups and accelerate keep working. Under DeepSpeed
ZeRO-1/2 the handle's strategy acts in gradient hooks instead (:mod:`reflora.strategies`).
When RefLoRA acts and what it touches (warmup, interval, ``GradScaler``, ``step(closure)``,
clipping, compiled steps): docs/semantics.md.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn

from reflora.adapters import as_pairs
from reflora.config import RefLoRAConfig, Space
from reflora.distributed import localize
from reflora.handle import RefLoRAHandle, check_not_attached
from reflora.optimizers import (
    check_zero_factors,
    check_zero_stage,
    resolve_space,
    transport_for,
    unwrap_optimizer,
    zero_optimizer,
)
from reflora.pairs import LoRAPair, validate
from reflora.strategies import ZeroGradientStrategy
from reflora.transport import qualname

__all__ = ["attach"]


def attach(
    optimizer: torch.optim.Optimizer,
    pairs: nn.Module | Iterable[tuple[Tensor, Tensor] | LoRAPair],
    *,
    variant: Literal["full", "scalar"] = "full",
    space: Space = "auto",
    warmup_steps: int | None = None,
    interval: int = 1,
    eps: float | None = None,
    second_moment: Literal["square", "keep", "reset"] = "square",
    compile: bool = False,
    frame: Literal["paper", "symmetric", "block"] | None = None,
    rank_above_size: Literal["skip", "act"] = "skip",
    solver: Literal["eigh", "newton_schulz"] = "eigh",
    diagnostics_interval: int = 0,
    resolved: float | None = None,
    example_inputs: Any = None,
) -> RefLoRAHandle:
    r"""Make ``optimizer`` a RefLoRA optimizer for ``pairs`` (arXiv 2505.18877).

    Args:
        optimizer: any first-order ``torch.optim.Optimizer`` (closure-only ones such as LBFGS
            are rejected). An accelerate ``AcceleratedOptimizer`` is unwrapped.
        pairs: an ``nn.Module`` (pairs found by :func:`reflora.adapters.find_pairs`) or an
            iterable of ``(A, B)`` parameter tuples (``A`` ``(r, m)``, ``B`` ``(n, r)``) or
            :class:`~reflora.LoRAPair` objects. Every factor must be in the optimizer.
        variant: ``"full"`` (RefLoRA, default) or ``"scalar"`` (RefLoRA-S: one scalar per pair).
        space: ``"gradient"``: precondition the gradients, ``grad_A <- S^{-1} grad_A``,
            ``grad_B <- grad_B S`` (any optimizer); ``"parameter"``: refactor the factors to
            ``(P^T A, B P^{-T})`` and move the optimizer state with them (needs a registered
            transport, :func:`reflora.transport.register_state_transport`); ``"auto"``
            (default): :func:`reflora.default_space` of the optimizer, falling back to
            ``"gradient"`` where the pairs rule parameter space out (``handle.space`` says which).
        warmup_steps: optimizer steps before RefLoRA starts. ``None`` (default): 3 where the
            resolution gate is on (``resolved > 0``), else 0.
        interval: act every ``interval`` optimizer steps (gradient space applies the cached
            ``S`` in between).
        eps: dead-direction threshold of the core (``None``: 1.4e-14, see
            :func:`reflora.functional.refactor_transform`).
        second_moment: rule for element-wise second moments in parameter space
            (``"square"``: exact for the scalar variant; ``"keep"``; ``"reset"``).
        compile: in eager steps, run the per-group ``r x r`` kernel through
            ``torch.compile(fullgraph=True)`` (one compiled kernel per shape key, group sizes
            padded to powers of two; a key needing more than 6 graphs runs eagerly, with one
            warning). The hooks work inside a compiled ``opt.step()`` or train step either way.
        frame: parameter space: which ``P`` with ``P P^T = S``: ``"paper"`` (the paper's closed
            form, canonical signs and ties) or ``"symmetric"`` (``S^{1/2}``). ``None``
            (default): ``"paper"`` with ``solver="eigh"``, ``"symmetric"`` with
            ``"newton_schulz"`` (``"paper"`` with it raises). ``"block"`` (opt-in, Adam-family
            optimizers, parameter space, no gate): balances the directions of ``B A`` above a
            tenth of its largest singular value, floors the others there, and spreads each over
            its own block of coordinates; a deviation from the paper for adapters whose rank
            exceeds the task's need (docs/rank-deficient.md says where it wins and loses).
        rank_above_size: pairs with ``r > min(m, n)``: ``"skip"`` (default) leaves them to the
            bare optimizer with one warning naming them; ``"act"`` applies RefLoRA to their
            live directions.
        solver: full variant: ``"eigh"`` (default: eigendecompositions, exact dead directions)
            or ``"newton_schulz"`` (matrix products only; symmetric frame; dead directions
            regularised, see :func:`reflora.functional.refactor_transform`).
        diagnostics_interval: every this many optimizer steps (``0``: never), record the stats of
            :mod:`reflora.diagnostics` from the step's own Grams; read them with
            :meth:`RefLoRAHandle.diagnostics`. Eager steps only; under DeepSpeed ZeRO it raises.
        resolved: full variant: act on a pair only at steps where
            ``sigma_min(B A) >= resolved * sigma_max(B A)``, else leave it to the bare optimizer
            (``S = I``). ``None`` (default): ``0.1`` with ``solver="eigh"``, ``0.0`` with
            ``"newton_schulz"`` (``> 0`` raises there and with ``variant="scalar"``). ``0.0``
            acts always, as the paper does. Why: docs/rank-deficient.md.
        example_inputs: with ``pairs`` an ``nn.Module``: what the model is called with (a
            tensor, a tuple or a dict). Pairs no finder recognises are then found from one
            forward pass and verified, once, here (``docs/finding-pairs.md``).

    Returns:
        A :class:`RefLoRAHandle`.

    Example:
        >>> import torch
        >>> import reflora
        >>> A = torch.nn.Parameter(torch.randn(4, 32))
        >>> B = torch.nn.Parameter(torch.zeros(16, 4))
        >>> opt = torch.optim.AdamW([A, B], lr=1e-2)
        >>> handle = reflora.attach(opt, [(A, B)], variant="full", space="gradient")
        >>> loss = (B @ A - torch.ones(16, 32)).square().sum()
        >>> loss.backward(); opt.step()
        >>> handle.step_count
        1
    """
    opt = unwrap_optimizer(optimizer)
    zero = zero_optimizer(optimizer)  # DeepSpeed: see below
    if zero is not None:
        check_zero_stage(zero[0])  # ZeRO-3 first: its factors are empty placeholders
    cfg = RefLoRAConfig(
        variant=variant, space=space, warmup_steps=warmup_steps, interval=interval, eps=eps,
        second_moment=second_moment, frame=frame, solver=solver, rank_above_size=rank_above_size,
        resolved=resolved, compile=compile, diagnostics_interval=diagnostics_interval,
    )
    if zero is not None:
        return _attach_zero(zero, as_pairs(pairs, example_inputs), cfg)
    pair_list = validate(as_pairs(pairs, example_inputs), optimizer=opt, config=cfg, trained=True)
    # distributed hook: DTensor (FSDP2) factors get local views and known reductions; placements
    # this variant cannot use raise here (reflora.distributed)
    pair_list = localize(pair_list, cfg.variant)
    cfg = cfg.with_space(resolve_space(opt, None, pair_list, cfg) if cfg.space == "auto" else cfg.space)
    check_not_attached(opt, pair_list)
    if cfg.space == "parameter":
        transport = transport_for(opt, pair_list)
    handle = RefLoRAHandle(opt, pair_list, cfg)
    if cfg.space == "parameter":
        try:  # state the transport cannot move is an error now, not at some later step
            handle.check_state(pair_list)
        except Exception:
            handle.remove()
            raise
        cfg.warn_if_unstable(qualname(opt), transport.keeps_second_moments(), stacklevel=3)
    return handle


def _attach_zero(zero: tuple[Any, torch.optim.Optimizer], pairs: list[LoRAPair], cfg: RefLoRAConfig) -> RefLoRAHandle:
    """DeepSpeed ZeRO steps on flat partitions: gradient space through tensor hooks on the factors
    (:class:`reflora.strategies.ZeroGradientStrategy`); what it cannot do raises here."""
    wrapper, inner = zero
    pair_list = validate(pairs, config=cfg, trained=True)  # (the factors are not in `inner`)
    pair_list = localize(pair_list, cfg.variant)
    cfg = cfg.with_space(resolve_space(inner, zero, pair_list, cfg) if cfg.space == "auto" else cfg.space)
    cfg.check_zero_diagnostics()
    check_zero_factors(wrapper, pair_list)
    cfg.check_zero_space(qualname(wrapper))
    check_not_attached(inner, pair_list, hint="")
    return RefLoRAHandle(inner, pair_list, cfg, strategy=ZeroGradientStrategy(wrapper))
