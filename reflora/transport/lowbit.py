r"""Low-bit optimizer state follows the factors: bitsandbytes' 8-bit and paged optimizers, and
torchao's 8-bit, 4-bit and FP8 AdamW.

These optimizers keep their moments quantized block-wise (a code book of 256 or 16 values, or
FP8, and one float32 scale per block of 128-256 elements), so a parameter-space refactor
cannot multiply them in place the way :mod:`reflora.transport` moves 32-bit state. Their
transports here do the same map in three steps, one parameter at a time:

1. dequantize each moment to float32 (in the parameter's stored shape);
2. move it by its kind, with the very maps of the 32-bit transport
   (:data:`reflora.transport.STATE_KINDS`: ``"first"`` like a gradient, ``P^{-1} m_A``,
   ``m_B P``; ``"second"`` by the ``second_moment`` rule), stacked over a group of pairs;
3. quantize it back into the same storage (same code book and block size, new block scales).

A moment the rule leaves as it is (``second_moment="keep"``) is not re-quantized, so it picks up
no rounding. Each refactor adds one quantizer rounding to the moments it moves: measured against
the 32-bit transport on the same state in ``benchmarks/lowbit_transport.py`` (``docs/qlora.md``).

Both libraries keep small tensors in 32-bit (bitsandbytes below ``min_8bit_size``, 4096
elements by default; torchao below 4096 elements or not a multiple of its block size), so the
factors of one pair may hold one of each; every transport here moves both forms.

The optimizers are recognised by qualified class name on first lookup
(:func:`reflora.transport.register_lazy_state_transport`): importing :mod:`reflora` imports
neither bitsandbytes nor torchao.

Example:
    >>> from reflora.transport import get_state_transport, registered_optimizers
    >>> "bitsandbytes.optim.adamw.AdamW8bit" in registered_optimizers()
    True
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from reflora.functional import Transform
from reflora.pairs import LoRAPair, to_core
from reflora.transport.base import (
    STATE_KINDS,
    StateKind,
    StateTransport,
    TransportContext,
    UnsupportedOptimizerError,
    qualname,
)

__all__ = ["BNB_BLOCKSIZE", "LAZY_TRANSPORTS", "BitsAndBytesTransport", "LowBitTransport", "TorchaoTransport"]

#: The block size of bitsandbytes' block-wise 8-bit optimizer state (fixed in its ``init_state``).
BNB_BLOCKSIZE = 256


class LowBitTransport(StateTransport):
    """A transport for quantized optimizer state: dequantize, move by kind, requantize.

    It moves the pairs one at a time (:meth:`move`), because the quantized storage of one
    parameter spans several state keys (codes, scales) and must be written back in its stored
    layout. Subclasses say how to read and write a moment (:meth:`problem`, :meth:`load`,
    :meth:`store`).

    Attributes:
        display: the optimizer's qualified name (for messages and the registry listing).
        kinds: ``{moment name: "first" | "second"}`` of the dequantized moments;
            ``space="auto"`` gives parameter space when there is a ``"second"`` one
            (:func:`reflora.default_space`).
    """

    quantized = True

    def __init__(self, display: str, kinds: Mapping[str, StateKind]) -> None:
        self.display = display
        self._kinds = dict(kinds)

    @property
    def kinds(self) -> dict[str, StateKind]:
        return self._kinds

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display!r}, kinds={self.kinds})"

    def __call__(self, T: Transform, sA: Any, sB: Any, ctx: TransportContext) -> Any:
        raise TypeError(f"{self!r} moves quantized state through move_state(), not as a stacked-state function")

    def sharded_refusal(self, optimizer: torch.optim.Optimizer) -> str | None:
        return (
            f"space='parameter' on sharded (DTensor / FSDP2) factors moves optimizer state shard by shard; "
            f"{qualname(optimizer)} keeps its state quantized in blocks (reflora.lowbit), and one shard's blocks "
            "cannot be remapped without the other shards' rows. Use space='gradient', or a 32-bit optimizer "
            "(torch.optim.AdamW) for parameter space"
        )

    # --- what a subclass provides
    def problem(self, state: Mapping[str, Any], param: Tensor) -> str | None:
        """Why this parameter's state cannot be moved (``None``: it can)."""
        raise NotImplementedError

    def load(self, state: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
        """The moments of ``kinds`` present in ``state``, dequantized: new float32 tensors (never
        views of the state) in the parameter's stored shape."""
        raise NotImplementedError

    def store(self, state: Mapping[str, Any], name: str, value: Tensor) -> None:
        """Write moment ``name`` (float32, stored shape) back into ``state``, requantized."""
        raise NotImplementedError

    # --- shared
    def check(self, state: Mapping[str, Any], param: Tensor, ctx: TransportContext, where: str) -> None:
        """Raise :class:`reflora.UnsupportedOptimizerError` (naming the optimizer and the way out) if
        this parameter's state cannot be moved; called before anything is modified."""
        reason = self.problem(state, param)
        if reason is not None:
            raise UnsupportedOptimizerError(
                f"{qualname(ctx.optimizer)} holds state for {where} (shape {tuple(param.shape)}) that its "
                f"low-bit transport cannot move: {reason}. Use space='gradient', which needs no transport"
            )

    @torch.no_grad()
    def move(
        self, optimizer: torch.optim.Optimizer, pairs: list[LoRAPair], T: Transform, rule: str,
        gate: Tensor | None = None,
    ) -> None:
        """Move the state of ``pairs`` (one group, all with state) by ``T`` in place.

        Args:
            optimizer: the optimizer whose ``state`` is moved.
            pairs: the pairs, same shapes and layouts (one group of the refactor).
            T: the group's transform, stacked over ``pairs``.
            rule: the ``second_moment`` rule.
            gate: a 0-d bool; where False every moment keeps its value (the compiled path).
        """
        # pair by pair: the float32 copies of one pair's moments are the only scratch, however
        # many same-shape pairs the group stacks (LLaMA-7B: 128 q/k/v/o pairs in one group)
        layA, layB = pairs[0].layout
        experts = pairs[0].experts
        cd = T.left.dtype
        for k, pair in enumerate(pairs):
            Tk = Transform(T.left[k : k + 1], T.right[k : k + 1])
            sA, sB = optimizer.state[pair.A], optimizer.state[pair.B]
            oldA, oldB = self.load(sA, pair.A), self.load(sB, pair.B)
            for name, kind in self.kinds.items():
                if name not in oldA or name not in oldB:
                    continue
                a = to_core(oldA[name], layA, experts)[None].to(cd)
                b = to_core(oldB[name], layB, experts)[None].to(cd)
                new = STATE_KINDS[kind].apply(Tk, a, b, rule)
                if new is None:  # the "keep" rule: not re-quantized, so no rounding added
                    continue
                for state, lay, old, value in ((sA, layA, oldA, new[0][0]), (sB, layB, oldB, new[1][0])):
                    buf = torch.empty_like(old[name])
                    to_core(buf, lay, experts).copy_(value)
                    if gate is not None:
                        buf = torch.where(gate, buf, old[name])
                    self.store(state, name, buf)

    move_state = move  # (its name before the StateTransport interface)


def _distributed(value: Any) -> bool:
    return type(value).__name__ == "DTensor"


_DTENSOR = (
    "the state is a DTensor (FSDP2): the block-wise codes of a shard cannot be remapped without "
    "the other shards' rows"
)


class BitsAndBytesTransport(LowBitTransport):
    """bitsandbytes' ``Optimizer1State`` / ``Optimizer2State`` optimizers.

    ``state1`` (and ``state2``) hold the moments: ``uint8`` codes with ``qmap`` / ``absmax``
    (block-wise, :data:`reflora.transport.lowbit.BNB_BLOCKSIZE` elements a block) for tensors of at least
    ``min_8bit_size`` elements under an 8-bit optimizer, float32 otherwise (paged 32-bit
    optimizers, small tensors). AdEMAMix stacks its fast and slow first moments in ``state1``
    ``(2, *shape)``; they are moved as ``state1.0`` and ``state1.1``.
    """

    KNOWN = frozenset({"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec", "gnorm_vec"})

    def __init__(self, display: str, kinds: Mapping[str, StateKind], *, double_state1: bool = False) -> None:
        if double_state1:
            kinds = {("state1.0" if k == "state1" else k): v for k, v in kinds.items()}
            kinds = {"state1.0": kinds["state1.0"], "state1.1": kinds["state1.0"], **kinds}
        super().__init__(display, kinds)
        self.double_state1 = double_state1

    def _raw(self) -> list[str]:
        return sorted({name.split(".")[0] for name in self.kinds})

    def problem(self, state: Mapping[str, Any], param: Tensor) -> str | None:
        unknown = sorted(set(state) - self.KNOWN)
        if unknown:
            return (f"unknown state keys {unknown} (this transport knows {sorted(self.KNOWN)}; a different "
                    "bitsandbytes version?)")
        n = param.numel()
        lead = (2,) if self.double_state1 else ()
        for raw in self._raw():
            if raw not in state:
                continue
            v, i = state[raw], raw[-1]
            if _distributed(v):
                return _DTENSOR
            shape = (*lead, *param.shape) if raw == "state1" else tuple(param.shape)
            if tuple(v.shape) != shape:
                return f"{raw!r} has shape {tuple(v.shape)}, expected {shape}"
            if v.dtype == torch.uint8:
                absmax, qmap = state.get("absmax" + i), state.get("qmap" + i)
                blocks = -(-n // BNB_BLOCKSIZE)
                want = (*(lead if raw == "state1" else ()), blocks)
                if absmax is None or qmap is None or tuple(absmax.shape) != want:
                    got = None if absmax is None else tuple(absmax.shape)
                    return (f"8-bit {raw!r} needs 'absmax{i}' of shape {want} ({BNB_BLOCKSIZE}-element blocks) "
                            f"and 'qmap{i}'; got absmax{i} {got}")
            elif v.dtype != torch.float32:
                return f"{raw!r} has dtype {v.dtype}; expected uint8 (8-bit) or float32"
        return None

    def _slots(self, state: Mapping[str, Any], name: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        raw, _, idx = name.partition(".")
        v, i = state[raw], raw[-1]
        absmax = state.get("absmax" + i)
        if idx:
            v = v[int(idx)]
            absmax = None if absmax is None else absmax[int(idx)]
        return v, absmax, state.get("qmap" + i)

    def load(self, state: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
        import bitsandbytes.functional as bnbF

        out = {}
        for name in self.kinds:
            if name.split(".")[0] not in state:
                continue
            v, absmax, qmap = self._slots(state, name)
            if v.dtype == torch.uint8:
                out[name] = bnbF.dequantize_blockwise(v, absmax=absmax, code=qmap, blocksize=BNB_BLOCKSIZE).float()
            else:
                out[name] = v.to(torch.float32, copy=True)
        return out

    def store(self, state: Mapping[str, Any], name: str, value: Tensor) -> None:
        import bitsandbytes.functional as bnbF

        v, absmax, qmap = self._slots(state, name)
        if v.dtype != torch.uint8:
            v.copy_(value)
            return
        codes, qstate = bnbF.quantize_blockwise(value.contiguous(), code=qmap, blocksize=BNB_BLOCKSIZE)
        v.copy_(codes.view_as(v))
        absmax.copy_(qstate.absmax.view_as(absmax))  # type: ignore[union-attr]


class TorchaoTransport(LowBitTransport):
    """torchao's ``AdamW8bit`` / ``AdamW4bit`` / ``AdamWFp8`` (and their Adam forms).

    ``exp_avg`` / ``exp_avg_sq`` (/ ``max_exp_avg_sq``) are tensor subclasses shaped like the
    parameter (``OptimState8bit``, ``OptimState4bit``, ``OptimStateFp8``) with ``dequantize()``
    and a quantizing ``copy_``; plain tensors for parameters torchao leaves in 32-bit.
    """

    KNOWN = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})

    def __init__(self, display: str) -> None:
        super().__init__(display, {"exp_avg": "first", "exp_avg_sq": "second", "max_exp_avg_sq": "second"})

    def problem(self, state: Mapping[str, Any], param: Tensor) -> str | None:
        unknown = sorted(set(state) - self.KNOWN)
        if unknown:
            return f"unknown state keys {unknown} (this transport knows {sorted(self.KNOWN)}; a different torchao version?)"
        for name in self.kinds:
            v = state.get(name)
            if v is None:
                continue
            if _distributed(v):
                return _DTENSOR
            if tuple(v.shape) != tuple(param.shape):
                return f"{name!r} has shape {tuple(v.shape)}, expected {tuple(param.shape)}"
            if type(v) is not torch.Tensor and not callable(getattr(v, "dequantize", None)):
                return f"{name!r} is a {type(v).__name__} without dequantize()"
        return None

    def load(self, state: Mapping[str, Any], param: Tensor) -> dict[str, Tensor]:
        out = {}
        for name in self.kinds:
            v = state.get(name)
            if v is None:
                continue
            out[name] = v.to(torch.float32, copy=True) if type(v) is torch.Tensor else v.dequantize(torch.float32)
        return out

    def store(self, state: Mapping[str, Any], name: str, value: Tensor) -> None:
        state[name].copy_(value)  # the subclasses' copy_ quantizes (same code book and block size)


_ADAM2 = {"state1": "first", "state2": "second"}
# Lion keeps one moment, an average of gradients ("first"), and no second moment: space="auto"
# gives it gradient space, as it does SGD. Measured (benchmarks/studies/second_moment.py --optimizer
# lion8bit, 15 seeds, docs/qlora.md): at the learning rates where plain LoRA does best, full
# gradient space wins 15/15 seeds and full parameter space loses 15/15.
_LION = {"state1": "first"}

#: ``(package, class qualname, transport)`` of every low-bit optimizer, registered by name
#: (:func:`reflora.transport.register_lazy_state_transport`) so that neither library is imported.
LAZY_TRANSPORTS: list[tuple[str, str, LowBitTransport]] = []
for _cls in ("Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit"):
    LAZY_TRANSPORTS.append(("bitsandbytes", _cls, BitsAndBytesTransport(f"bitsandbytes.optim.adam.{_cls}", _ADAM2)))
for _cls in ("AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit"):
    LAZY_TRANSPORTS.append(("bitsandbytes", _cls, BitsAndBytesTransport(f"bitsandbytes.optim.adamw.{_cls}", _ADAM2)))
for _cls in ("Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"):
    LAZY_TRANSPORTS.append(("bitsandbytes", _cls, BitsAndBytesTransport(f"bitsandbytes.optim.lion.{_cls}", _LION)))
for _cls in ("AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit", "PagedAdEMAMix32bit"):
    LAZY_TRANSPORTS.append(
        ("bitsandbytes", _cls, BitsAndBytesTransport(f"bitsandbytes.optim.ademamix.{_cls}", _ADAM2, double_state1=True))
    )
for _cls in ("AdamW8bit", "AdamW4bit", "AdamWFp8", "Adam8bit", "Adam4bit", "AdamFp8"):
    LAZY_TRANSPORTS.append(("torchao", _cls, TorchaoTransport(f"torchao.optim.{_cls}")))
