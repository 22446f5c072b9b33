"""Propose factor pairs from one eager forward pass (the first half of traced discovery).

A :class:`torch.utils._python_dispatch.TorchDispatchMode` watches the ATen ops of one real
forward pass and tags tensors with where they came from:

* ``param(i)``: a view, copy, dtype cast or scaling of model parameter ``i`` (``A.T``,
  ``A.reshape(E, r, m)[e]``, ``A.to(bf16)``, ``0.5 * A``);
* ``out(i)``: the output of a matmul-like op (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``,
  ``convolution``, ``embedding``) that took ``param(i)`` as its weight, and views or scalings of it.

A *sighting* is recorded when a matmul-like op joins two of them: ``out(i)`` meeting ``param(j)``
(the chain ``x -> A -> B``: ``lora_b(lora_a(x))``, ``x @ A.T @ B.T``, a ``k x k`` conv followed by
a ``1 x 1`` conv, an embedding lookup followed by a matmul) or ``param(i)`` meeting ``param(j)``
(the product ``B @ A`` formed explicitly: minLoRA's parametrizations, PEFT's stacked experts,
DoRA's weight norm). The contraction size of that op is the rank ``r``, and a batched op over
stored (not broadcast) factors gives the number of experts.

Tags also pass through a few ops that are *not* linear in the right way (elementwise ops, norms,
masks), recording their names: a ReLU or a norm between two factors is proposed too and then
rejected by verification, so the report can say why. Tags stop at any op that mixes a tagged
tensor with another activation (a residual add, attention), so proposals stay local.

Nothing here decides anything: every sighting is verified numerically afterwards
(:mod:`reflora.adapters.traced`). Python control flow, MoE routing and scatter-based message
passing need no support, since the pass is eager: whatever ops run are the ops seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

# ops through which a tag passes unchanged in meaning: aliasing views are found by schema
# (``OpOverload.is_view``); these copy or re-type without mixing elements
_COPIES = frozenset({
    "clone", "_to_copy", "contiguous", "_unsafe_view", "lift_fresh", "lift_fresh_copy", "detach",
    "alias", "view_copy", "permute_copy", "t_copy", "transpose_copy", "expand_copy", "reshape",
    "_reshape_alias", "unsqueeze_copy", "squeeze_copy", "select_copy", "slice_copy", "unbind",
    "split", "split_with_sizes", "chunk",
})
_SCALINGS = frozenset({"mul", "mul_", "div", "div_", "neg", "neg_"})
# at most this many non-linear steps between the two factors of a proposal
_MAX_STEPS = 8


@dataclass(frozen=True)
class Tag:
    kind: str  # "param" | "out"
    index: int  # the parameter
    steps: tuple[str, ...] = ()  # ops passed through that may break the product
    via: tuple[str, ...] = ()  # trainable tensors mixed in on the way (a gate, a fused bias)


@dataclass(frozen=True)
class Sighting:
    """Parameter ``a`` and parameter ``b`` met in op ``op`` as the two factors of a product.

    ``a`` is the factor applied first (chain) or the right operand (product); ``r`` the
    contraction size; ``experts`` the batch size of a batched op over stored factors (else None).
    """

    a: int
    b: int
    r: int
    experts: int | None
    form: str  # "chain" | "product"
    op: str
    steps: tuple[str, ...]
    via: tuple[str, ...] = ()  # trainable tensors between the factors (names)


# (index of the left / input operand, index of the right / weight operand)
_MATMULS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "mv": (0, 1), "addmv": (1, 2)}


class ProposalMode(TorchDispatchMode):
    """Tags tensors during one forward pass and records :class:`Sighting` s.

    Args:
        params: the parameters to track (their position in this list is their index).
        known: ids of the model's other parameters and buffers (norm weights, biases): a tag
            passes an op whose other inputs are only these, scalars or one-element tensors.
        trainable: ``{id: name}`` of the model's trainable parameters. One of them mixed into a
            tagged tensor (a per-rank gate, a bias fused into ``addmm`` or a convolution) is
            recorded in the tag's ``via``: a refactor is exact only while it stays neutral.
        watch: ids of tensors whose use is recorded in :attr:`reached` (the factors of pairs
            the structural finders found, to tell which ones the forward pass reaches).
    """

    def __init__(
        self, params: list[Tensor], known: set[int], trainable: dict[int, str] | None = None,
        watch: set[int] | None = None,
    ) -> None:
        super().__init__()
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for i, p in enumerate(params):
            self.tags[p] = Tag("param", i)
        self.known = known
        self.trainable = trainable or {}
        self.watch = watch or set()
        self.sightings: list[Sighting] = []
        self.used: set[int] = set()  # parameters that reached a matmul-like op
        self.seen: set[int] = set()  # parameters read by any op
        self.reached: set[int] = set()  # ids in ``watch`` read by any op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.watch:
            self.reached.update(id(t) for t in tree_leaves((args, kwargs)) if id(t) in self.watch)
        self._record(func, args, kwargs, out)
        return out

    # --------------------------------------------------------------------------------- tagging

    def _tag(self, t: Any) -> Tag | None:
        tag = self.tags.get(t) if isinstance(t, Tensor) else None
        if tag is not None and tag.kind == "param":
            self.seen.add(tag.index)
        return tag

    def _set(self, out: Any, tag: Tag | None) -> None:
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                if tag is None:
                    self.tags.pop(t, None)
                else:
                    self.tags[t] = tag

    def _record(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if name in _MATMULS:
            self._set(out, self._matmul(name, args, *_MATMULS[name]))
        elif name == "convolution":
            self._set(out, self._convolution(args))
        elif name == "embedding":
            tag = self._tag(args[0])
            if tag is not None and tag.kind == "param":
                self.used.add(tag.index)
            self._set(out, Tag("out", tag.index) if tag is not None and tag.kind == "param" else None)
        elif func.is_view or name in _COPIES:
            self._set(out, self._tag(args[0]) if args else None)
        else:
            self._set(out, self._elementwise(name, args, kwargs))

    def _elementwise(self, name: str, args, kwargs) -> Tag | None:
        tags, others = [], []
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor):
                tag = self._tag(t)
                (tags if tag is not None else others).append((t, tag))
        if not tags:
            return None
        first = tags[0][1]
        if any((tag.kind, tag.index) != (first.kind, first.index) for _, tag in tags):
            return None  # two different sources meet: not a factor any more
        scalar = all(t.numel() <= 1 for t, _ in others)
        if name in _SCALINGS and scalar and len(tags) == 1:
            return first  # s * x commutes with any refactor (x * f(x), an RMS norm, does not)
        if not (scalar or name in _SCALINGS or all(id(t) in self.known for t, _ in others)):
            return None  # mixed with another activation (residual add, attention): stop here
        steps = max((tag.steps for _, tag in tags), key=len) + (name,)
        via = self._via([tag for _, tag in tags], [t for t, _ in others])
        return Tag(first.kind, first.index, steps, via) if len(steps) <= _MAX_STEPS else None

    def _via(self, tags, mixed: list[Any]) -> tuple[str, ...]:
        """The tags' ``via`` and the trainable parameters in ``mixed``, in order, once each."""
        names = [n for tag in tags if tag is not None for n in tag.via]
        names += [self.trainable[id(t)] for t in mixed if isinstance(t, Tensor) and id(t) in self.trainable]
        return tuple(dict.fromkeys(names))

    # ---------------------------------------------------------------------------- matmul-likes

    def _matmul(self, name: str, args, li: int, ri: int) -> Tag | None:
        L, R = args[li], args[ri]
        tl, tr = self._tag(L), self._tag(R)
        r = L.shape[-1]
        params = [(t, x) for t, x in ((tl, L), (tr, R)) if t is not None and t.kind == "param"]
        for t, _ in params:
            self.used.add(t.index)
        experts = None
        if name in ("bmm", "baddbmm") and L.shape[0] > 1 and all(x.stride(0) != 0 for _, x in params):
            experts = L.shape[0]
        if len(params) == 2:
            self._sight(tr.index, tl.index, r, experts, "product", name, tl.steps + tr.steps, self._via([tl, tr], []))
            return None
        if len(params) == 1:
            weight = params[0][0]
            act = tr if weight is tl else tl
            if act is not None and act.kind == "out":
                self._sight(act.index, weight.index, r, experts, "chain", name, act.steps + weight.steps,
                            self._via([act, weight], []))
            # a bias fused into the op (addmm's input) sits between this factor and the next
            bias = [args[0]] if name.startswith("add") else []
            return Tag("out", weight.index, (), self._via([weight], bias))
        return None

    def _convolution(self, args) -> Tag | None:
        x, w = args[0], args[1]
        transposed, groups = args[6], args[8]
        tx, tw = self._tag(x), self._tag(w)
        if tw is None or tw.kind != "param":
            return None
        self.used.add(tw.index)
        if transposed or groups != 1:
            return None  # not a plain channel contraction: no pair through it
        if tx is not None and tx.kind == "out":
            self._sight(tx.index, tw.index, w.shape[1], None, "chain", "convolution", tx.steps + tw.steps,
                        self._via([tx, tw], []))
        return Tag("out", tw.index, (), self._via([tw], [args[2]]))  # args[2]: the fused bias

    def _sight(self, a: int, b: int, r: int, experts, form: str, op: str, steps, via=()) -> None:
        if a != b:
            self.sightings.append(Sighting(a, b, int(r), experts, form, op, tuple(steps), tuple(via)))
