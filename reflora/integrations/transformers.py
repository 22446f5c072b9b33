"""RefLoRA for ``transformers.Trainer``: a callback, no fork of Trainer.

Usage::

    from reflora.integrations.transformers import RefLoRACallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[RefLoRACallback(variant="full")])  # space="auto" (attach's default)
    trainer.train()                                   # or train(resume_from_checkpoint=...)

The callback attaches :func:`reflora.attach` (with its defaults for what is not passed, so
``space="auto"``: parameter space for Trainer's default AdamW, see :func:`reflora.default_space`)
to the optimizer Trainer builds (unwrapping
accelerate's ``AcceleratedOptimizer``) when training begins, writes the handle's state as
``reflora.pt`` into every checkpoint folder Trainer saves, and restores it on resume, so a
resumed run continues RefLoRA's step counter and cached metrics exactly. Trainer's own
gradient accumulation, clipping (``max_grad_norm``, applied to raw gradients before RefLoRA's
preconditioning), LR schedule and mixed precision are untouched.

Diagnostics: with ``diagnostics_interval=k`` (an :func:`reflora.attach` argument) the callback
adds :func:`reflora.diagnostics.summarize` of the latest diagnostics (``reflora/imbalance_abs_mean``,
``reflora/S_deviation_max``, ...) to every log Trainer writes. Trainer runs its reporting
integrations (TensorBoard, W&B, ...) before the callbacks passed to it, so to have them record
those values, add the callback with :func:`add_callback`, which puts it ahead of them::

    from reflora.integrations.transformers import add_callback

    add_callback(trainer, variant="full", diagnostics_interval=10)

Under several processes the handle's state (``r x r``, the same on every rank) is written by the
main process only and read by every rank. With FSDP2 (``fsdp_config`` version 2) accelerate shards
``lora_A`` along its rank dimension (FSDP2's default ``Shard(0)``): every mode works there, the
scalar variant on the shards as they are, the full variant on copies gathered for each step
(:mod:`reflora.reshard`; ``docs/fsdp2.md`` has the cost). Sharding the model before building the
Trainer with :func:`reflora.distributed.lora_shard_placement` saves that traffic.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from reflora.handle import RefLoRAHandle
from reflora.attaching import attach
from reflora.diagnostics import summarize
from reflora.distributed import ShardingError

__all__ = ["STATE_FILE", "RefLoRACallback", "add_callback"]

STATE_FILE = "reflora.pt"


class RefLoRACallback(TrainerCallback):
    """Attach RefLoRA to ``Trainer``'s optimizer. Keyword arguments go to :func:`reflora.attach`.

    Args:
        pairs: what to refactor; ``None`` (default) finds the pairs in Trainer's model with
            :func:`reflora.adapters.find_pairs`.
        **attach_kwargs: ``variant``, ``space``, ``warmup_steps``, ``interval``, ...
    """

    def __init__(self, pairs: Any = None, **attach_kwargs: Any) -> None:
        self.pairs = pairs
        self.attach_kwargs = attach_kwargs
        self.handle: RefLoRAHandle | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None or model is None:
            raise RuntimeError("RefLoRACallback needs Trainer to pass model and optimizer to callbacks")
        if self.handle is not None:
            self.handle.remove()
        try:
            self.handle = attach(optimizer, model if self.pairs is None else self.pairs, **self.attach_kwargs)
        except ShardingError as e:
            # accelerate calls fully_shard itself, without a shard_placement_fn: what still raises
            # (an expert stack sharded across its experts' slices) needs the model sharded beforehand
            raise ShardingError(
                f"{e}. Under Trainer / accelerate (FSDP2), which shards the model itself: shard it before building "
                "the Trainer (place = reflora.distributed.lora_shard_placement(model); fully_shard(layer, "
                "shard_placement_fn=place) for each decoder layer, then fully_shard(model, shard_placement_fn=place)) "
                "and set fsdp_config['auto_wrap_policy'] = 'NO_WRAP'; accelerate keeps an already sharded model"
            ) from e
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.exists(path):
                self.handle.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
            else:
                warnings.warn(
                    f"resuming at step {state.global_step} without {path}; RefLoRA's step counter is "
                    "set to Trainer's global step and cached metrics are recomputed",
                    stacklevel=2,
                )
                self.handle.step_count = state.global_step
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.handle is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.handle.state_dict(), os.path.join(folder, STATE_FILE))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        diag = None if self.handle is None else self.handle.diagnostics()
        if diag is not None and logs is not None:
            summary = summarize(diag["pairs"])
            logs.update(summary)
            if state.log_history:  # Trainer stored its copy of this log before the callbacks ran
                state.log_history[-1].update(summary)
        return control


def add_callback(trainer: Any, **attach_kwargs: Any) -> RefLoRACallback:
    """Add a :class:`RefLoRACallback` to ``trainer`` ahead of its reporting integrations.

    ``trainer.add_callback`` appends, and Trainer calls its callbacks in order, so a callback
    added that way (or passed as ``Trainer(callbacks=...)``) writes its diagnostics into each log
    after TensorBoard / W&B have already sent it. This inserts the callback right after
    Trainer's ``DefaultFlowCallback``. Returns the callback (its ``handle`` exists once training
    begins).
    """
    from transformers.trainer_callback import DefaultFlowCallback

    cb = RefLoRACallback(**attach_kwargs)
    callbacks = trainer.callback_handler.callbacks
    first = next((i + 1 for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)), 0)
    callbacks.insert(first, cb)
    return cb
