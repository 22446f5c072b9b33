"""RefLoRA for PyTorch Lightning: a callback, no change to the ``LightningModule``.

Usage::

    from reflora.integrations.lightning import RefLoRACallback

    trainer = pl.Trainer(callbacks=[RefLoRACallback()])      # attach's defaults: space="auto", ...
    trainer.fit(module)                                       # or fit(module, ckpt_path=...)

The callback attaches :func:`reflora.attach` to the optimizer(s) that ``configure_optimizers``
returns (one optimizer or several, with or without scheduler configs) when fitting starts, stores
the handles' state in Lightning's checkpoint (``checkpoint["callbacks"]``, like every stateful
callback) and restores it on resume, so ``fit(..., ckpt_path=...)`` continues RefLoRA's step
counter and cached metrics exactly. Lightning steps the optimizer with a closure (automatic
optimisation); the handle acts on the closure's gradients (see ``docs/semantics.md``). Gradient
accumulation, gradient clipping, precision plugins and schedulers are Lightning's and untouched.

Pairs are found in the ``LightningModule`` (:func:`reflora.adapters.find_pairs`; PEFT, timm,
torch-geometric and loralib-style LoRAs), or given as ``pairs=`` (a callable taking the module,
or a fixed list). With several optimizers each pair goes to the optimizer that holds its
factors; a pair whose factors sit in two optimizers, or in none, is an error.

Logging (``log_diagnostics=True``): :func:`reflora.diagnostics.summarize` of the latest
diagnostics (``reflora/imbalance_abs_mean``, ``reflora/S_deviation_max``, ...) and the counters
``reflora/step_count`` and ``reflora/refactor_count`` (optimizer steps at which RefLoRA acted)
go to the module's logger through ``LightningModule.log_dict``, at Lightning's
``log_every_n_steps``; ``diagnostics_interval`` defaults to that interval.

Strategies (``docs/lightning.md``): single device, DDP (and ``ddp_spawn``) and FSDP2 through
``ModelParallelStrategy`` (the module's ``configure_model`` calls ``fully_shard``); Lightning's
FSDP1 strategy (``FSDPStrategy``) and DeepSpeed strategy are refused with an error naming the
alternative. ``automatic_optimization=False`` works: ``self.optimizers().step()`` steps the same
hooked optimizer.

Weight averaging: with Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` or
``StochasticWeightAveraging`` among the callbacks, their averaged copy of the module follows
every parameter-space refactor (:meth:`reflora.RefLoRAHandle.follow`), so the average keeps its
own ``B A`` instead of mixing two factorizations.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import torch

from reflora.adapters import as_pairs, find_pairs
from reflora.diagnostics import summarize
from reflora.handle import RefLoRAHandle
from reflora.attaching import attach
from reflora.pairs import LoRAPair

try:  # the standalone package first (the `lightning` extra installs it), then the unified one
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - depends on what is installed
    import lightning.pytorch as pl  # type: ignore[no-redef]

__all__ = ["RefLoRACallback"]

# Lightning strategies whose optimizer is not a torch optimizer stepping on the module's own factors
_REFUSED = {
    "FSDPStrategy": "Lightning's FSDPStrategy is FSDP1 (flat parameters: the factors are slices of one flat "
                    "tensor). Use ModelParallelStrategy with fully_shard in configure_model (FSDP2), or DDP",
    "DeepSpeedStrategy": "under Lightning's DeepSpeedStrategy the optimizer steps on DeepSpeed's flat "
                         "partitions. Use DDP or ModelParallelStrategy (FSDP2); reflora.attach supports ZeRO-1/2 in "
                         "gradient space outside Lightning (docs/distributed.md)",
}


class RefLoRACallback(pl.Callback):
    """Attach RefLoRA to the optimizers of a Lightning ``Trainer``; keyword arguments go to
    :func:`reflora.attach`.

    Args:
        pairs: ``None`` (default): the pairs :func:`reflora.adapters.find_pairs` finds in the
            ``LightningModule``; a callable ``pairs(module)`` returning pairs; or pairs as
            :func:`reflora.attach` takes them.
        log_diagnostics: log the diagnostics summary and the step / refactor counters through
            ``LightningModule.log_dict`` (``diagnostics_interval`` defaults to the Trainer's
            ``log_every_n_steps``).
        **attach_kwargs: ``variant``, ``space``, ``warmup_steps``, ``interval``, ``resolved``, ...

    Attributes:
        handles: one :class:`reflora.RefLoRAHandle` per optimizer that holds pairs, in the order
            of ``trainer.optimizers`` (empty before fitting starts; kept after it ends, for their
            counters and diagnostics, until the next ``fit`` replaces them).

    Example:
        >>> from reflora.integrations.lightning import RefLoRACallback
        >>> callback = RefLoRACallback(variant="full", log_diagnostics=True)
        >>> callback.handles
        []
    """

    def __init__(self, pairs: Any = None, *, log_diagnostics: bool = False, **attach_kwargs: Any) -> None:
        if not isinstance(log_diagnostics, bool):
            raise TypeError(f"log_diagnostics must be a bool; got {type(log_diagnostics).__name__}")
        if "example_inputs" in attach_kwargs and pairs is not None:
            raise TypeError("example_inputs= finds pairs in the module; leave pairs=None to use it")
        self.pairs = pairs
        self.log_diagnostics = log_diagnostics
        self.attach_kwargs = attach_kwargs
        self.handles: list[RefLoRAHandle] = []
        self._optimizer_index: list[int] = []  # position in trainer.optimizers of each handle
        self._pending: dict[str, Any] | None = None  # state restored before the handles existed
        self._restored = False
        self._logged_step = -1

    @property
    def state_key(self) -> str:
        return "RefLoRACallback"

    @property
    def handle(self) -> RefLoRAHandle:
        """The handle, when one optimizer holds every pair (see ``handles`` otherwise)."""
        if len(self.handles) != 1:
            raise AttributeError(
                f"RefLoRACallback has {len(self.handles)} handles (one per optimizer holding pairs, and none before "
                "fitting starts): use callback.handles"
            )
        return self.handles[0]

    # -- attaching ----------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        refused = next((why for name, why in _REFUSED.items()
                        if any(c.__name__ == name for c in type(trainer.strategy).__mro__)), None)
        if refused is not None:
            raise TypeError(f"RefLoRACallback cannot run under {type(trainer.strategy).__name__}: {refused}")
        self._detach()
        kwargs = dict(self.attach_kwargs)
        if self.log_diagnostics:
            kwargs.setdefault("diagnostics_interval", max(1, int(trainer.log_every_n_steps)))
        pairs = self._pairs(pl_module, kwargs.pop("example_inputs", None))
        for i, opt, members in self._split(trainer.optimizers, pairs):
            self.handles.append(attach(opt, members, **kwargs))
            self._optimizer_index.append(i)
        # an averaged copy (EMA / SWA callbacks, built in their setup) follows every refactor
        for average in _averaged_models(trainer):
            for handle in self.handles:
                if handle.space == "parameter":
                    handle.follow(average)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def _pairs(self, pl_module: Any, example_inputs: Any) -> list[LoRAPair]:
        if self.pairs is None:
            return find_pairs(pl_module, example_inputs=example_inputs)
        pairs = self.pairs(pl_module) if callable(self.pairs) else self.pairs
        return as_pairs(pairs)

    @staticmethod
    def _split(optimizers: Iterable[torch.optim.Optimizer], pairs: list[LoRAPair]):
        """``(index, optimizer, its pairs)`` for each optimizer holding pairs; every pair in one."""
        optimizers = list(optimizers)
        if not optimizers:
            raise RuntimeError(
                "RefLoRACallback found no optimizer: return one from configure_optimizers (the callback "
                "attaches when fitting starts)"
            )
        owner = {id(p): i for i, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]}
        by_opt: dict[int, list[LoRAPair]] = {}
        for pair in pairs:
            where = {owner.get(id(pair.A)), owner.get(id(pair.B))}
            if None in where:
                raise ValueError(
                    f"pair {pair.name!r}: a factor is in none of the {len(optimizers)} optimizer(s) configure_optimizers "
                    "returned; give the optimizer the LoRA parameters, or leave the pair out with pairs="
                )
            if len(where) > 1:
                raise ValueError(
                    f"pair {pair.name!r}: A and B are in different optimizers ({sorted(where)}); put both factors "
                    "of a pair in one optimizer (RefLoRA rebalances them together)"
                )
            by_opt.setdefault(where.pop(), []).append(pair)
        return [(i, optimizers[i], by_opt[i]) for i in sorted(by_opt)]

    def _detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self._optimizer_index = [], []

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"handles": [h.state_dict() for h in self.handles], "optimizers": list(self._optimizer_index)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.handles:  # strategies that restore after setup (ModelParallelStrategy)
            self._load(state_dict)
        else:  # the usual order: callbacks are restored before configure_optimizers runs
            self._pending = state_dict

    def _load(self, state: dict[str, Any]) -> None:
        saved = state.get("optimizers", [])
        if saved != self._optimizer_index:
            raise ValueError(
                f"checkpoint holds RefLoRA state for optimizers {saved} but configure_optimizers now gives pairs to "
                f"optimizers {self._optimizer_index}: resume with the same optimizers and pairs"
            )
        for handle, handle_state in zip(self.handles, state["handles"]):
            handle.load_state_dict(handle_state)
        self._restored = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step > 0 and not self._restored and self.handles:
            warnings.warn(
                f"resuming at global step {trainer.global_step} without RefLoRA's state in the checkpoint; the "
                "handles' step counters are set to the optimizers' step counts and cached metrics are recomputed",
                stacklevel=2,
            )
            for handle in self.handles:
                handle.step_count = _optimizer_steps(trainer, handle)

    # -- logging ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log_diagnostics or not self.handles:
            return
        step = trainer.global_step
        if step == self._logged_step:
            return  # an accumulation step: no optimizer step since the last log
        self._logged_step = step
        values: dict[str, float] = {}
        several = len(self.handles) > 1
        for handle, i in zip(self.handles, self._optimizer_index):
            prefix = f"reflora/opt{i}/" if several else "reflora/"
            cfg, t = handle.config, handle.step_count
            values[f"{prefix}step_count"] = float(t)
            values[f"{prefix}refactor_count"] = float(_acted(t, cfg.warmup_steps, cfg.interval))
            diag = handle.diagnostics()
            if diag is not None:
                values.update(summarize(diag["pairs"], prefix=prefix))
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True, prog_bar=False)


def _averaged_models(trainer: Any) -> list[torch.nn.Module]:
    """The averaged copies kept by the Trainer's weight-averaging callbacks (``WeightAveraging``
    and its ``EMAWeightAveraging``, ``StochasticWeightAveraging``), once their ``setup`` built them."""
    kinds = tuple(getattr(pl.callbacks, name) for name in ("WeightAveraging", "StochasticWeightAveraging")
                  if hasattr(pl.callbacks, name))
    return [c._average_model for c in trainer.callbacks
            if isinstance(c, kinds) and getattr(c, "_average_model", None) is not None]


def _acted(t: int, warmup: int, interval: int) -> int:
    """Optimizer steps among the first ``t`` at which RefLoRA acted (refreshed ``S`` or refactored)."""
    return 0 if t <= warmup else math.ceil((t - warmup) / interval)


def _optimizer_steps(trainer: Any, handle: RefLoRAHandle) -> int:
    """Steps the handle's optimizer has taken: its own ``step`` state where it keeps one (Adam's),
    else Lightning's global step shared among the optimizers."""
    for pair in handle.pairs:
        step = handle.optimizer.state.get(pair.A, {}).get("step")
        if step is not None:
            return int(step)
    return int(trainer.global_step) // max(1, len(trainer.optimizers))
