"""RefLoRA for ``transformers.Trainer``: a callback, no fork of Trainer.

Usage::

    from reflora.integrations.transformers import RefLoRACallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[RefLoRACallback(variant="full", space="gradient")])
    trainer.train()                                   # or train(resume_from_checkpoint=...)

The callback attaches :func:`reflora.attach` to the optimizer Trainer builds (unwrapping
accelerate's ``AcceleratedOptimizer``) when training begins, writes the handle's state as
``reflora.pt`` into every checkpoint folder Trainer saves, and restores it on resume, so a
resumed run continues RefLoRA's step counter and cached metrics exactly. Trainer's own
gradient accumulation, clipping (``max_grad_norm``, applied to raw gradients before RefLoRA's
preconditioning), LR schedule and mixed precision are untouched.

Under several processes the handle's state (``r x r``, the same on every rank) is written by the
main process only and read by every rank. With FSDP2 (``fsdp_config`` version 2) accelerate shards
``lora_A`` along its rank dimension, which the scalar variant takes as it is; for the full variant
shard the model before building the Trainer (README, "Multi-GPU and multi-node").
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from reflora.attach import RefLoRAHandle, attach
from reflora.distributed import ShardingError

__all__ = ["STATE_FILE", "RefLoRACallback"]

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
            # accelerate calls fully_shard itself, without a shard_placement_fn
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
