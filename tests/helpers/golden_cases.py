"""Golden trajectories of the optimizer layer: the cases, and how one case is run and recorded.

Recorded from the code at main 84c1d1d (issue 18, item 1) before the optimizer layer was
restructured; ``tests/core/test_golden.py`` replays them. Re-record (only when behaviour is *meant*
to change, and say so in the commit) with::

    python tests/helpers/golden_cases.py --record

Every case trains a tiny PEFT model (built from a config, nothing downloaded) in float64 for a
few steps: ``reflora.attach`` on ``torch.optim.AdamW`` / ``torch.optim.SGD`` (momentum 0.9) and
``reflora.func.adamw`` / ``reflora.func.sgd``, every mode (full / scalar x gradient /
parameter), with and without warmup / interval, and it records the factors, ``B @ A``, the
optimizer state and the handle's ``state_dict``. The checkpoint cases also store a checkpoint
written after a few steps, so that loading a checkpoint of the recorded code stays tested.
"""

from __future__ import annotations

import itertools
import pathlib
import sys
from typing import Any

import torch
from torch import nn

GOLDEN = pathlib.Path(__file__).parent / "golden" / "trajectories.pt"
STEPS = 8
CHECKPOINT_AT = 4

MODES = [("full", "gradient"), ("full", "parameter"), ("scalar", "gradient"), ("scalar", "parameter")]
SCHEDULES = {"plain": {"warmup_steps": 0}, "warmup2-interval3": {"warmup_steps": 2, "interval": 3}}
BASES = ("adamw", "sgd")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l0 = nn.Linear(6, 8)
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)
        self.l3 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.l0(x))
        x = torch.tanh(self.l1(x))
        x = torch.tanh(self.l2(x))
        return self.l3(x)


def peft_model(init: str) -> nn.Module:
    """Four LoRA'd linears: three shapes, ranks 3 and 2 (``rank_pattern``), so that the pairs fall
    in three same-shape groups, two of which share the Gram shape. ``init="zeros"``: PEFT's
    default ``B = 0``; ``"random"``: both factors random (well-conditioned from the start)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = MLP().double()
    cfg = LoraConfig(
        r=3, lora_alpha=3, target_modules=["l0", "l1", "l2", "l3"], rank_pattern={"l3": 2},
        init_lora_weights=init != "random",
    )
    model = get_peft_model(base, cfg)
    return model.double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g, dtype=torch.float64)


def cases() -> list[dict[str, Any]]:
    out = []
    for api, base, (variant, space), sched, init in itertools.product(
        ("attach", "func"), BASES, MODES, SCHEDULES, ("random", "zeros")
    ):
        if init == "zeros" and sched != "plain":
            continue  # B = 0: the schedules are covered by the random init
        out.append(dict(api=api, base=base, variant=variant, space=space, sched=sched, init=init, kw={}))
    # the defaults (space="auto", resolved=None) and the gate switched off
    for api, base in itertools.product(("attach", "func"), BASES):
        out.append(dict(api=api, base=base, variant="full", space="auto", sched="plain", init="random", kw={}))
        out.append(dict(api=api, base=base, variant="full", space="parameter", sched="plain", init="random",
                        kw={"resolved": 0.0}))
        out.append(dict(api=api, base=base, variant="full", space="gradient", sched="warmup2-interval3",
                        init="random", kw={"resolved": 0.0}))
    out.append(dict(api="attach", base="adamw", variant="full", space="parameter", sched="plain", init="random",
                    kw={"frame": "symmetric", "second_moment": "keep"}))
    out.append(dict(api="attach", base="adamw", variant="full", space="parameter", sched="plain", init="random",
                    kw={"second_moment": "reset"}))
    return out


def case_id(c: dict[str, Any]) -> str:
    extra = "".join(f"-{k}={v}" for k, v in sorted(c["kw"].items()))
    return f"{c['api']}-{c['base']}-{c['variant']}-{c['space']}-{c['sched']}-{c['init']}{extra}"


def _torch_opt(base: str, params):
    if base == "adamw":
        return torch.optim.AdamW(params, lr=2e-2, weight_decay=1e-2)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


def _pairs(model: nn.Module):
    from reflora.adapters import find_pairs

    return find_pairs(model)


def run_attach(c: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``STEPS`` steps (or, from ``checkpoint``, the steps after ``CHECKPOINT_AT``)."""
    import reflora

    model = peft_model(c["init"])
    x, y = data()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _torch_opt(c["base"], params)
    kw = dict(SCHEDULES[c["sched"]], **c["kw"])
    handle = reflora.attach(opt, model, variant=c["variant"], space=c["space"], **kw)
    start = 0
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        assert not unexpected and not any("lora_" in k for k in missing)
        opt.load_state_dict(checkpoint["optimizer"])
        handle.load_state_dict(checkpoint["reflora"])
        start = CHECKPOINT_AT
    saved = None
    for t in range(start, STEPS):
        if t == CHECKPOINT_AT and checkpoint is None:
            saved = {
                "model": {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k},
                "optimizer": _clone(opt.state_dict()),
                "reflora": _clone(handle.state_dict()),
            }
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
    out: dict[str, Any] = {"space": handle.space, "pairs": {}, "handle": _clone(handle.state_dict())}
    for p in handle.pairs:
        rec = _factors(c, p.A.detach(), p.B.detach())
        for label, t in (("A", p.A), ("B", p.B)):
            for key, v in opt.state.get(t, {}).items():
                rec[f"state.{label}.{key}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
        out["pairs"][p.name] = rec
    if saved is not None and c["init"] == "random" and not c["kw"]:  # the checkpoint cases
        out["checkpoint"] = saved
    return out


def run_func(c: dict[str, Any]) -> dict[str, Any]:
    import reflora
    from torch.func import functional_call, grad

    model = peft_model(c["init"])
    x, y = data()
    pairs = reflora.func.pairs_of(model)
    hyper = {"lr": 2e-2, "weight_decay": 1e-2} if c["base"] == "adamw" else {"lr": 5e-2, "momentum": 0.9}
    make = reflora.func.adamw if c["base"] == "adamw" else reflora.func.sgd
    opt = make(pairs, variant=c["variant"], space=c["space"], **hyper, **SCHEDULES[c["sched"]], **c["kw"])
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    state = opt.init(params)

    def loss(p):
        return (functional_call(model, p, (x,)) - y).square().mean()

    for _ in range(STEPS):
        params, state = opt.update(grad(loss)(params), state, params)
    out: dict[str, Any] = {"space": opt.space, "pairs": {}, "step": state["step"].clone()}
    for p in pairs:
        A, B = params[p.A], params[p.B]
        rec = _factors(c, A, B)
        for key, v in state.items():
            if isinstance(v, dict) and key != "lr":
                for k, label in ((p.A, "A"), (p.B, "B")):
                    if k in v:
                        rec[f"state.{label}.{key}"] = v[k].clone()
                if p.key in v:
                    rec[f"state.{key}"] = v[p.key].clone()
        out["pairs"][p.key] = rec
    return out


def _factors(c: dict[str, Any], A: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Well-conditioned pairs: the factors (``B @ A`` follows from them); from ``B = 0``: ``B @ A``
    only, since there the refactor's frame is decided on nearly degenerate spectra."""
    if c["init"] == "random":
        return {"A": A.clone(), "B": B.clone()}
    return {"BA": B @ A}


def run(c: dict[str, Any]) -> dict[str, Any]:
    return run_attach(c) if c["api"] == "attach" else run_func(c)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def pack(obj: Any) -> dict[str, Any]:
    """``obj`` with every tensor replaced by a slot in one flat float64 buffer (one storage record
    instead of thousands keeps the file small)."""
    flat: list[torch.Tensor] = []

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            flat.append(o.detach().reshape(-1).to(torch.float64))
            return ("__tensor__", len(flat) - 1, tuple(o.shape), str(o.dtype).removeprefix("torch."))
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    tree = walk(obj)
    sizes = [t.numel() for t in flat]
    return {"tree": tree, "sizes": sizes, "data": torch.cat(flat) if flat else torch.zeros(0)}


def unpack(packed: dict[str, Any]) -> Any:
    parts = packed["data"].split(packed["sizes"])

    def walk(o: Any) -> Any:
        if isinstance(o, tuple) and len(o) == 4 and o[0] == "__tensor__":
            _, i, shape, dtype = o
            return parts[i].to(getattr(torch, dtype)).reshape(shape).clone()
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    return walk(packed["tree"])


def load() -> dict[str, Any]:
    return unpack(torch.load(GOLDEN, weights_only=False))


def record() -> None:
    import warnings

    torch.set_num_threads(1)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cases():
            results[case_id(c)] = run(c)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(pack({"steps": STEPS, "checkpoint_at": CHECKPOINT_AT, "results": results}), GOLDEN)
    print(f"recorded {len(results)} cases to {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    if "--record" in sys.argv[1:]:
        record()
    else:
        print(__doc__)
