r"""Attach RefLoRA to any ``torch.optim`` optimizer through its step hooks.

``attach(optimizer, pairs, ...)`` validates the options (:class:`reflora.config.RefLoRAConfig`),
finds and checks the pairs, resolves the space and returns a :class:`reflora.RefLoRAHandle`
(:mod:`reflora.handle`), whose hooks run the step core (:mod:`reflora.step`); the user keeps their own
optimizer object, so LR schedulers, ``GradScaler``, gradient clipping, param groups and
accelerate keep working. Each optimizer step, in a step *pre*-hook:

* ``space="gradient"`` (the reference code's form): the factor gradients are preconditioned,
  ``grad_A <- S^{-1} grad_A``, ``grad_B <- grad_B S``; parameters and optimizer state are not
  touched, so this works with every optimizer.
* ``space="parameter"``: the factors are replaced by the refactored pair, their gradients are
  mapped into the new coordinates, and the optimizer state is transported (see
  :mod:`reflora.transport`); then the optimizer steps from the refactored pair.
* ``space="auto"`` (default) picks one of the two per optimizer family:
  ``"parameter"`` for Adam-like optimizers (a registered transport with second moments),
  ``"gradient"`` otherwise; see :func:`reflora.default_space`.

Pairs are grouped by ``(device, dtype, experts, r, m, n, layout)`` and each group is computed by
one batched call of the functional core (one batched ``eigh`` per group, not one per layer);
results are written back with ``copy_`` under ``no_grad``. A pair stacking ``E`` MoE experts
(:attr:`reflora.LoRAPair.experts`) is ``E`` independent pairs: a group of them stacks to
``(G, E, r, m)`` and every expert gets its own ``S``.

Distributed training (docs/distributed.md): under DDP the factors are replicated
and nothing changes. FSDP2 factors are ``DTensor`` shards: each rank forms partial Grams (or
squared norms) from its own shard, one all-reduce per same-shape group sums them, and every
transform stays on the rank's shard (:mod:`reflora.distributed`); a factor sharded along its rank
dimension (FSDP2's default ``Shard(0)`` of ``lora_A``) is gathered for the full variant's
step (:mod:`reflora.reshard`). Under DeepSpeed ZeRO-1/2 the
gradient-space modes precondition the gradients before DeepSpeed reduces them
(:mod:`reflora.integrations.deepspeed`, a strategy of the handle).

Semantics (docs/semantics.md has them with the reasons):

* ``warmup_steps`` and ``interval`` count *optimizer steps* (so gradient accumulation does not
  inflate them). A step that ``GradScaler`` skips (inf/NaN gradients) neither acts nor counts:
  for most optimizers the scaler does not call ``optimizer.step()`` at all; optimizers that
  handle AMP scaling themselves (``fused=True`` Adam / AdamW / SGD / Adagrad) are stepped with
  ``optimizer.found_inf`` / ``optimizer.grad_scale`` set, and the pre-hook reads ``found_inf``
  (or a ``found_inf=`` keyword of ``step()``) and leaves the skipped step alone.
* RefLoRA acts at steps ``t >= warmup_steps`` with ``(t - warmup_steps) % interval == 0``
  (``t`` counts completed optimizer steps from 0). In gradient space the preconditioner ``S`` is
  recomputed at those steps and the cached ``S`` (O(r^2) per pair) is applied in between; in
  parameter space the factors are refactored at those steps only.
* Gradient clipping called before ``optimizer.step()`` clips the raw gradients; the
  preconditioned ones are not clipped again.
* Pairs whose ``A.grad`` or ``B.grad`` is ``None`` this step (frozen, unused) are skipped.
* With ``warmup_steps`` longer than the run, nothing is touched: the run is bit-identical to
  the bare optimizer.
* Inside ``torch.compile`` (a compiled ``opt.step()`` or train step) the hooks do not branch in
  Python on the step: the counter is a 0-d tensor advanced in place, warmup / interval / a
  scaler's skip are a 0-d bool tensor and every update is selected with ``torch.where``, so one
  graph serves every step (the r x r kernel then runs every step; eager steps skip it).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn

from reflora.adapters import as_pairs
from reflora.config import RefLoRAConfig, Space, resolve_space, skip_rank_above_size, unwrap_optimizer
from reflora.distributed import any_sharded, localize
from reflora.handle import ATTACHED, RefLoRAHandle
from reflora.integrations.deepspeed import (
    ZeroGradientHandle,
    ZeroGradientStrategy,
    check_zero,
    check_zero_stage,
    zero_optimizer,
)
from reflora.pairs import LoRAPair
from reflora.transport import UnsupportedOptimizerError, get_state_transport, qualname

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
    frame: Literal["paper", "symmetric"] | None = None,
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
        variant: ``"full"`` (RefLoRA, default) or ``"scalar"`` (RefLoRA-S: one scalar per pair,
            cheaper). How the two compare, measured: docs/options.md, "Defaults (measured)".
        space: ``"auto"`` (default: :func:`default_space`, i.e. ``"parameter"`` for Adam-like
            optimizers, whose element-wise second moments undo most of a gradient-space
            preconditioner, and ``"gradient"`` for SGD-like and unregistered optimizers, under
            DeepSpeed ZeRO and where the pairs rule parameter space out; ``handle.space`` reports
            the choice), ``"gradient"`` (precondition gradients; any optimizer) or ``"parameter"``
            (refactor the factors and transport the optimizer state; needs a registered
            transport, see :func:`reflora.transport.register_state_transport`).
        warmup_steps: optimizer steps before RefLoRA starts. ``None`` (default): 3 where the
            resolution gate is on (``resolved > 0``: the full variant with ``solver="eigh"``),
            else 0. After Adam's first step from ``B = 0`` the product's spectrum is flat for a
            step or two, passes the gate, and acting on it costs late progress where the task
            needs fewer directions than the rank (docs/rank-deficient.md, "The warmup").
        interval: act every ``interval`` optimizer steps.
        eps: dead-direction threshold of the core (``None``: 1.4e-14, see
            :func:`reflora.functional.refactor_transform`).
        second_moment: rule for element-wise second moments in parameter space
            (``"square"``: exact for the scalar variant; ``"keep"``; ``"reset"``).
        compile: in eager steps, run the per-group r x r kernel through
            ``torch.compile(fullgraph=True)``: one compiled kernel per shape key, group sizes
            padded to powers of two (any number of distinct ranks, member sets that vary from
            step to step); a key needing more than 6 graphs runs eagerly, with one warning.
            Independent of this flag, the hooks work inside a compiled ``opt.step()`` or train
            step: no recompile after warm-up, no graph break in reflora (see docs/semantics.md,
            "Compiled steps"); there the kernel runs every step, warmup included.
        frame: parameter space only: which refactor ``P`` with ``P P^T = S`` is applied:
            ``"paper"`` (the paper's closed form, balanced Grams ``diag(sigma)``, with a
            canonical sign and tie rule so that factors are reproducible across devices,
            compilation and ranks) or ``"symmetric"`` (``S^{1/2}``, closest to the identity;
            see docs/options.md for how the two compare). ``None`` (default): ``"paper"`` with
            ``solver="eigh"``, ``"symmetric"`` with ``solver="newton_schulz"`` (``"paper"`` with
            it raises). Gradient space depends on ``S`` only.
        rank_above_size: pairs whose rank exceeds the layer's size (``r > min(m, n)``: a 3-label
            head, an MoE router) have at least ``r - min(m, n)`` directions that ``B A`` can never
            use. ``"skip"`` (default) leaves them to the bare optimizer, with one warning naming
            them; ``"act"`` applies RefLoRA to their live directions (see docs/options.md for how
            that trains).
        solver: full variant: how the ``r x r`` kernel is computed. ``"eigh"`` (default:
            eigendecompositions, exact dead directions) or ``"newton_schulz"`` (matrix products
            only, a fixed step count: no eigensolver, which is slow for small batched matrices
            on GPUs; symmetric frame only; dead directions regularised, see
            :func:`reflora.functional.refactor_transform`). Ignored by ``variant="scalar"``.
        diagnostics_interval: every this many optimizer steps (``0``: never), record each pair's
            imbalance, Gram condition numbers, distance of ``S`` from the identity and extreme
            singular values of ``B A``, from the Grams the step computes anyway; read them with
            :meth:`RefLoRAHandle.diagnostics` (see :mod:`reflora.diagnostics`). Eager steps
            only (compiled steps record none); under DeepSpeed ZeRO it raises (use
            :func:`reflora.diagnostics.diagnose`).
        resolved: full variant: act on a pair only at steps where its product's singular values
            are resolved, ``sigma_min(B A) >= resolved * sigma_max(B A)``; a pair that fails is
            left to the bare optimizer for that step (``S = I``). ``None`` (default): ``0.1``
            with ``solver="eigh"``, ``0.0`` with ``"newton_schulz"`` (which computes no singular
            values; ``> 0`` with it raises). ``0.0`` acts on every pair at every step, as the
            paper does. Why the gate exists: an adapter whose rank exceeds the rank its task
            needs has directions far below the largest, and balancing those makes RefLoRA train
            slower than plain LoRA (``docs/rank-deficient.md``). Must be ``None`` or ``0`` for
            ``variant="scalar"``, which has no spectrum.
        example_inputs: with ``pairs`` an ``nn.Module``: what the model is called with (a
            tensor, a tuple of positional arguments or a dict of keyword arguments). Pairs no
            finder recognises are then found from one forward pass and verified
            (``find_pairs(model, example_inputs=...)``, see ``docs/finding-pairs.md``); once,
            here, nothing per step.

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
    pair_list = skip_rank_above_size(as_pairs(pairs, example_inputs), cfg.rank_above_size)
    # distributed hook: DTensor (FSDP2) factors get local views and known reductions; placements
    # this variant cannot use raise here (reflora.distributed)
    pair_list = localize(pair_list, cfg.variant)
    cfg = cfg.with_space(resolve_space(opt, zero, pair_list, cfg) if cfg.space == "auto" else cfg.space)
    cfg.check_pairs(pair_list)
    if zero is not None:
        return _attach_zero(zero, pair_list, cfg)
    _check_pairs_in(opt, pair_list)
    _check_not_attached(opt, pair_list)
    if cfg.space == "parameter":
        _check_transport(opt, pair_list)
    handle = RefLoRAHandle(opt, pair_list, cfg)
    if cfg.space == "parameter":
        try:  # state the transport cannot move is an error now, not at some later step
            handle.check_state(pair_list)
        except Exception:
            handle.remove()
            raise
        cfg.warn_if_unstable(opt)
    _register(opt, pair_list, handle)
    return handle


def _check_pairs_in(opt: torch.optim.Optimizer, pair_list: list[LoRAPair]) -> None:
    """Raise unless every factor is a trainable floating parameter of ``opt``, of one pair only,
    and each pair's factors share a device."""
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    seen: dict[int, str] = {}
    for pair in pair_list:
        for label, t in (("A", pair.A), ("B", pair.B)):
            if not t.dtype.is_floating_point:
                raise TypeError(f"pair {pair.name!r}: {label} has dtype {t.dtype}; expected a floating dtype")
            if not t.requires_grad:
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is frozen "
                    "(requires_grad=False): train both factors, or leave this pair out of attach. RefLoRA "
                    "re-balances two trained factors; with one frozen (LoRA-FA) there is nothing to re-balance"
                )
            if id(t) not in in_opt:
                hint = (
                    " (under DeepSpeed, pass engine.optimizer, DeepSpeed's wrapper: the torch optimizer "
                    "inside steps on flat partitions)" if "deepspeed" in sys.modules else ""
                )
                raise ValueError(
                    f"pair {pair.name!r}: its {label} factor (shape {tuple(t.shape)}) is not a parameter "
                    f"of this {qualname(opt)}; build the optimizer over the LoRA parameters first{hint}"
                )
            if id(t) in seen:
                raise ValueError(
                    f"pair {pair.name!r} shares its {label} factor with pair {seen[id(t)]!r}; "
                    "each factor may belong to one pair only (duplicate pairs?)"
                )
            seen[id(t)] = pair.name
        if pair.A.device != pair.B.device:
            raise ValueError(f"pair {pair.name!r}: A is on {pair.A.device} but B is on {pair.B.device}")


def _check_not_attached(opt: torch.optim.Optimizer, pair_list: list[LoRAPair], hint: str = " on this optimizer") -> None:
    registered = ATTACHED.get(opt, {})
    for pair in pair_list:
        for t in (pair.A, pair.B):
            other = registered.get(id(t))
            if other is not None and not other.removed:
                raise ValueError(
                    f"pair {pair.name!r} is already managed by {other!r}{hint}; call handle.remove() first"
                )


def _check_transport(opt: torch.optim.Optimizer, pair_list: list[LoRAPair]) -> None:
    """Parameter space: raise unless ``opt`` has a transport that can move these pairs' state."""
    transport = get_state_transport(opt)
    if transport is not None and hasattr(transport, "move_state") and any_sharded(pair_list):
        raise UnsupportedOptimizerError(
            f"space='parameter' on sharded (DTensor / FSDP2) factors moves optimizer state shard by shard; "
            f"{qualname(opt)} keeps its state quantized in blocks (reflora.lowbit), and one shard's blocks "
            "cannot be remapped without the other shards' rows. Use space='gradient', or a 32-bit optimizer "
            "(torch.optim.AdamW) for parameter space"
        )
    if transport is not None and getattr(transport, "spec", None) is None and any_sharded(pair_list):
        raise UnsupportedOptimizerError(
            f"space='parameter' on sharded (DTensor / FSDP2) factors moves optimizer state shard by shard, "
            f"which needs state shaped like its parameter; {qualname(opt)}'s transport is a function "
            "(factored state, e.g. Adafactor). Use space='gradient', or an optimizer with parameter-shaped "
            "state (SGD, Adam, AdamW, ...)"
        )
    if transport is None:
        raise UnsupportedOptimizerError(
            f"space='parameter' needs a state transport for {type(opt).__name__}, and none is registered: declare "
            f"its state with reflora.register_state_transport({type(opt).__name__}, {{'exp_avg': 'first', "
            "'exp_avg_sq': 'second', ...}), or use space='gradient' (any optimizer; the registered ones: "
            "reflora.transport.registered_optimizers())"
        )


def _register(opt: torch.optim.Optimizer, pair_list: list[LoRAPair], handle: RefLoRAHandle) -> None:
    registered = ATTACHED.setdefault(opt, {})
    for pair in pair_list:
        registered[id(pair.A)] = handle
        registered[id(pair.B)] = handle


def _attach_zero(zero: tuple[Any, torch.optim.Optimizer], pair_list: list[LoRAPair], cfg: RefLoRAConfig) -> RefLoRAHandle:
    """DeepSpeed ZeRO steps on flat partitions: gradient space through tensor hooks on the factors
    (:mod:`reflora.integrations.deepspeed`); what it cannot do raises here."""
    if cfg.diagnostics_interval:
        raise ValueError(
            "diagnostics_interval under DeepSpeed ZeRO: the handle there preconditions gradients in "
            "DeepSpeed's own hooks and records no diagnostics. Leave diagnostics_interval=0 and call "
            "reflora.diagnostics.diagnose(pairs) (or the model) between steps for the same stats"
        )
    wrapper, inner = zero
    check_zero(wrapper, pair_list, cfg.space)
    _check_not_attached(inner, pair_list, hint="")
    handle = ZeroGradientHandle(wrapper, inner, pair_list, cfg, strategy=ZeroGradientStrategy())
    _register(inner, pair_list, handle)
    return handle
