"""Overhead of RefLoRA's optimizer hook, measured side by side in one process.

(a) The hook alone at LLaMA-7B LoRA shapes (targets q, k, v: 4096 -> 4096; up: 4096 -> 11008;
    down: 11008 -> 4096; N layers), for r = 8/16/32: the AdamW step alone, the grouped RefLoRA
    hook (one batched core call per same-shape group), and a per-layer loop written the way the
    reference code does it (one unbatched core call per pair, one after another).
(b) A full training step (forward + backward + AdamW) of a ~100M-parameter Llama built from a
    config, with LoRA (r = 16) on the same five targets, without RefLoRA and with each mode.
    Modes are interleaved step by step, in a shuffled order each round, so drift hits all alike; besides the end-to-end
    ratio (noisy on a shared CPU) the time spent inside RefLoRA's hook is measured directly. Two
    floor rows, not modes: the float64 Grams alone (:func:`grams_floor`), one in-place pass over
    every tensor a parameter-space step rewrites (:func:`touch_floor`), and both with the default's
    ``r x r`` kernel between them (:func:`default_floor`): the least the default can do.
(c) The hook's fixed cost on a small model: a PEFT MLP (6 LoRA'd Linear(256, 256), r = 4) whose
    whole step takes a few ms, every mode against plain AdamW, interleaved; with the hook's own
    time inside the steps and back to back.
(d) ``reflora bench``'s graph and vision tasks: one training step per method, interleaved.

Run: ``python benchmarks/overhead.py`` (``--help`` for sizes). Prints tables; writes nothing.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
from torch import nn

import reflora
import reflora.adapters

MODES = [("full", "gradient"), ("scalar", "gradient"), ("full", "parameter"), ("scalar", "parameter")]
LLAMA7B = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "up": (4096, 11008), "down": (11008, 4096)}


@torch.no_grad()
def reference_per_layer(pairs) -> None:
    """RefLoRA's gradient form as the reference code structures it: one pair at a time, in the
    parameter dtype, M = B V_A diag(a) formed explicitly, S and S^-1 built per pair, gradients
    replaced per pair."""
    for A, B in pairs:
        eps = torch.finfo(A.dtype).eps
        lam_a, V_a = torch.linalg.eigh(A @ A.T)
        a = lam_a.clamp_min(0).sqrt()
        M = B @ (V_a * a)
        lam_m, V_m = torch.linalg.eigh(M.T @ M)
        sig = lam_m.clamp_min(0).sqrt()
        L = (V_a / (a + eps)) @ V_m
        S = (L * sig) @ L.T
        R = (V_a * a) @ V_m
        S_inv = (R / (sig + eps)) @ R.T
        A.grad = S_inv @ A.grad
        B.grad = B.grad @ S


def minimal_hook(model: nn.Module, opt: torch.optim.Optimizer, space: str):
    """A floor for (c), not an alternative: the least work a full-variant AdamW hook can do on a
    PEFT model whose LoRA'd layers are all square and of one shape, with nothing else. Two
    ``eigh``, the all-live test (it returns untouched otherwise), no finite checks, no dead
    directions, no paper-frame gap test, no grouping, no state checks; every factor, gradient (and
    in parameter space both Adam moments) in one stacked product."""
    As = [p for n, p in model.named_parameters() if "lora_A" in n]
    Bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    G, eps = len(As), 64 * torch.finfo(torch.float64).eps

    def kernel(X, Y, paper):
        lam_a, V_a = torch.linalg.eigh(X)
        lam_a = lam_a.clamp_min(0.0)
        Z0 = V_a * lam_a.sqrt().unsqueeze(-2)
        sig2, V_m = torch.linalg.eigh(torch.bmm(torch.bmm(Z0.mT, Y), Z0))
        sig2 = sig2.clamp_min(0.0)
        Z = torch.bmm(Z0, V_m)
        if not bool((sig2[:, 0] > eps * lam_a[:, -1] * Y.diagonal(dim1=-2, dim2=-1).sum(-1)).all()):
            return None
        w = sig2.pow(-0.25).unsqueeze(-2)
        R, Lt = Z * w, torch.bmm(Y, Z) * w.pow(3)
        if not paper:
            return torch.bmm(Lt, Lt.mT), torch.bmm(R, R.mT)  # S, S^-1
        left, right = Lt.mT.flip(-2), R.flip(-1)
        sign = right.gather(-2, right.abs().argmax(-2, keepdim=True)).sign()
        return left * sign.mT, right * sign

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        xs = As + [b.mT for b in Bs] + [a.grad for a in As] + [b.grad.mT for b in Bs]
        if space == "parameter":
            if not opt.state:
                return
            for key in ("exp_avg", "exp_avg_sq"):
                xs += [opt.state[a][key] for a in As] + [opt.state[b][key].mT for b in Bs]
        Z = torch.stack(xs)
        F = Z[: 2 * G].double()
        XY = torch.bmm(F, F.mT)
        out = kernel(XY[:G], XY[G:], space == "parameter")
        if out is None:
            return
        if space == "gradient":
            S, S_inv = out
            torch._foreach_copy_(xs[2 * G:], torch.bmm(torch.cat([S_inv, S]).float(), Z[2 * G:]).unbind(0))
        else:
            left, right = out
            rT = right.mT
            T = torch.cat([left, rT, rT, left, rT, left, rT.square(), left.square()]).float()
            torch._foreach_copy_(xs, torch.bmm(T, Z).unbind(0))

    return opt.register_step_pre_hook(hook)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int, setup=lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, ``setup`` run untimed before each."""
    setup()
    fn()  # warm up
    ts = []
    for _ in range(repeats):
        setup()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def hook_only(layers: int, ranks: list[int], repeats: int, device: str) -> None:
    print(f"\n(a) hook alone, LLaMA-7B LoRA shapes, {layers} layers x 5 targets = {5 * layers} pairs, float32, {device}")
    head = f"{'r':>3} {'AdamW step':>11} {'grouped full':>13} {'grouped scalar':>15} {'per-layer full':>15} {'per-layer/grouped':>18} {'full/step':>10}"
    print(head)
    print("-" * len(head))
    for r in ranks:
        g = torch.Generator().manual_seed(0)
        pairs = []
        for _ in range(layers):
            for m, n in LLAMA7B.values():
                A = nn.Parameter((torch.randn(r, m, generator=g) / m**0.5).to(device))
                B = nn.Parameter((0.01 * torch.randn(n, r, generator=g)).to(device))
                A.grad = torch.randn(r, m, generator=g).to(device)
                B.grad = torch.randn(n, r, generator=g).to(device)
                pairs.append((A, B))
        params = [p for ab in pairs for p in ab]
        opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: the factors stay put between repeats
        opt.step()
        t_step = _time(opt.step, repeats)
        grads = [(A.grad.clone(), B.grad.clone()) for A, B in pairs]

        def restore():
            for (A, B), (gA, gB) in zip(pairs, grads):
                A.grad.copy_(gA)
                B.grad.copy_(gB)

        # one (never stepped) optimizer per handle: a parameter may be managed once per optimizer
        handles = {
            v: reflora.attach(torch.optim.SGD(params, lr=0.0), pairs, variant=v, warmup_steps=10**9)
            for v in ("full", "scalar")
        }
        runs = {"full": [], "scalar": [], "loop": []}
        for _ in range(3):  # interleave the candidates so drift hits them alike
            for v, h in handles.items():
                h.warmup_steps = 0
                runs[v].append(_time(lambda h=h: h._pre_hook(h.optimizer, (), {}), repeats, restore))
                h.warmup_steps = 10**9
            runs["loop"].append(_time(lambda: reference_per_layer(pairs), repeats, restore))
        for h in handles.values():
            h.remove()
        times = {k: min(v) for k, v in runs.items()}
        t_loop = times["loop"]
        print(
            f"{r:>3} {t_step * 1e3:>9.1f}ms {times['full'] * 1e3:>11.1f}ms {times['scalar'] * 1e3:>13.1f}ms "
            f"{t_loop * 1e3:>13.1f}ms {t_loop / times['full']:>17.1f}x {times['full'] / t_step:>9.0%}"
        )


def _hook_timer(handle, spent: list[float] | None = None, inner=None) -> list[float]:
    """Time ``handle``'s pre-hook (or ``inner`` run in its place) inside every optimizer step from
    now on, appending to ``spent``; returns ``spent``."""
    spent = [] if spent is None else spent
    inner = handle._pre_hook if inner is None else inner

    def timed(o, a, k):
        t0 = time.perf_counter()
        inner(o, a, k)
        spent.append(time.perf_counter() - t0)

    handle._hooks[0].remove()  # the timing wrapper in place of the plain hook
    handle._hooks[0] = handle.optimizer.register_step_pre_hook(timed)
    return spent


@torch.no_grad()
def grams_floor(handle) -> None:
    """A floor for (b), not a mode: only the float64 Grams ``A A^T``, ``B^T B`` of every pair,
    stacked per group as the hook does (``reflora.step.gram_stack``). Every full-variant step pays
    at least this: the float32 accuracy contract needs float64 Grams."""
    import reflora.step

    for group in handle.groups:
        reflora.step.gram_stack([handle.pairs[i] for i in group])


@torch.no_grad()
def default_floor(handle, opt, raw) -> None:
    """A floor for (b), not a mode: what the default (full variant, parameter space) cannot skip
    under its accuracy contract, with nothing between the parts: the float64 Grams and the
    default's ``r x r`` kernel on them (``reflora.step.group_metrics``: the same ``eigh`` closed form and
    resolution gate the default runs), then one in-place pass over every tensor the refactor
    rewrites (:func:`touch_floor`). The products themselves are what the default adds above it."""
    import reflora.step

    reflora.step.group_metrics([[handle.pairs[i] for i in g] for g in handle.groups], handle.config, True)
    touch_floor(opt, raw)


@torch.no_grad()
def touch_floor(opt, raw) -> None:
    """A floor for (b), not a mode: one in-place read and write of every tensor a parameter-space
    step rewrites under AdamW (both factors, their gradients, ``exp_avg`` and ``exp_avg_sq``): the
    memory traffic no refactor that moves the optimizer state can go below. The per-layer loop
    touches the gradients only."""
    ts = []
    for A, B in raw:
        for p in (A, B):
            ts += [p.data, p.grad, *(v for v in opt.state[p].values() if v.dim() > 0)]
    torch._foreach_mul_(ts, 1.0)


def training_step(rank: int, repeats: int, layers: int, seq: int, batch: int) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    cfg = transformers.LlamaConfig(
        vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    n_base = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    pairs = reflora.adapters.find_pairs(model)

    modes = [*MODES, ("full", "gradient", "compile"), ("full", "parameter", "block"), ("reference", "per-layer"), ("floor", "grams-f64"),
             ("floor", "touch-once"), ("floor", "default")]
    hook_time = {m: [] for m in modes}
    raw = [(p.A, p.B) for p in pairs]

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()  # optimizer state exists from here on
    results = {None: [], **{m: [] for m in modes}}
    order = [None, *modes]
    rng = random.Random(0)
    for rep in range(repeats + 1):
        rng.shuffle(order)  # no mode always runs first (or right after another) in a round
        for mode in order:
            h = None
            if mode is not None:
                if mode[0] in ("reference", "floor"):
                    h = reflora.attach(opt, pairs, warmup_steps=10**9)  # hooks only, never acts
                    inner = {"per-layer": lambda o, a, k: reference_per_layer(raw),
                             "grams-f64": lambda o, a, k: grams_floor(h),
                             "touch-once": lambda o, a, k: touch_floor(opt, raw),
                             "default": lambda o, a, k: default_floor(h, opt, raw)}[mode[1]]
                    _hook_timer(h, hook_time[mode], inner)
                else:
                    # a fresh handle every step: warmup_steps=0, or the default's warmup would time a no-op
                    extra = {"compile": {"compile": True}, "block": {"frame": "block"}}.get(mode[2] if len(mode) == 3 else "", {})
                    h = reflora.attach(opt, pairs, variant=mode[0], space=mode[1], warmup_steps=0, **extra)
                    _hook_timer(h, hook_time[mode])
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if h is not None:
                h.remove()
            if rep > 0:  # first round is warm-up
                results[mode].append(dt)
    base_t = statistics.median(results[None])
    print(
        f"\n(b) training step: Llama from config, {n_base / 1e6:.0f}M parameters ({layers} layers, hidden 768), "
        f"LoRA r={rank} on q,k,v,up,down ({len(pairs)} pairs), batch {batch}x{seq} tokens, AdamW, {repeats} interleaved repeats"
    )
    head = f"{'mode':<26} {'step (median)':>14} {'vs LoRA':>9} {'hook (median)':>14} {'hook / step':>12}"
    print(head)
    print("-" * len(head))
    print(f"{'LoRA (no hook)':<26} {base_t * 1e3:>12.0f}ms {'':>9} {'':>14} {'':>12}")
    for mode in modes:
        t = statistics.median(results[mode])
        hk = statistics.median(hook_time[mode][1:])
        print(f"{'-'.join(mode):<26} {t * 1e3:>12.0f}ms {t / base_t - 1:>+8.1%} {hk * 1e3:>12.2f}ms {hk / base_t:>11.2%}")


def _trimmed_mean(v: list[float], cut: float = 0.05) -> float:
    """The mean without the slowest ``cut`` of the samples (machine hiccups), for step times that
    vary by design (RefLoRA acting every ``interval`` steps: a median would read an idle step)."""
    v = sorted(v)
    return statistics.fmean(v[: max(1, int(len(v) * (1 - cut)))])


def _interleaved(runs: dict, repeats: int, warmup: int = 5, stat=statistics.median) -> dict:
    """Step every ``runs[key] = step_fn`` ``repeats`` times in a shuffled round-robin (machine drift
    hits all alike); ``{key: stat(step seconds)}`` (the median by default)."""
    times: dict = {k: [] for k in runs}
    order = list(runs)
    rng = random.Random(0)
    for rep in range(repeats + warmup):
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            runs[key]()
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {k: stat(v) for k, v in times.items()}


def small_model(repeats: int, width: int = 256, batch: int = 256, r: int = 4, compile: str = "none",
                interval: int = 1) -> dict:
    """(c) the hook's fixed cost: a PEFT MLP with 6 LoRA'd linear maps of one shape, a step of a few ms.

    Every mode trains its own copy of the same model; the copies step in a shuffled round-robin
    so that machine drift hits them alike; the median step time of each is compared with plain
    AdamW's. Besides, the pre-hook's own time is taken inside the training steps and when it is
    called back to back (the same work, caches warm): the difference is what tiny ops cost after
    a forward and backward pass have evicted the caches. Two more rows run :func:`minimal_hook`,
    the least a full-variant hook can do here: the floor of this approach on this machine.
    ``compile="kernel"`` attaches with ``compile=True``; ``compile="step"`` runs every optimizer
    step (plain AdamW's too) through ``torch.compile(opt.step)``, with the hook traced into it
    (no hook timings then, and no floor rows). ``interval`` is attach's (RefLoRA acts every
    ``interval`` steps; step times and the hook's time in the step are then means over acting
    and idle steps (without the slowest 5% of steps), and the back-to-back column is left out).
    Returns ``{mode: ratio}``.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(width, width), nn.ReLU()]
    base = nn.Sequential(*layers[:-1])
    names = [str(i) for i in range(0, 11, 2)]
    model0 = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=names))
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)
    runs, handles, in_step = {}, {}, {}
    floors = [("floor", "gradient"), ("floor", "parameter")] if compile == "none" else []
    for mode in [None, *MODES, *floors]:
        model = copy.deepcopy(model0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        if mode in floors:
            minimal_hook(model, opt, mode[1])
        elif mode is not None:
            handles[mode] = reflora.attach(opt, model, variant=mode[0], space=mode[1], compile=compile == "kernel",
                                           interval=interval, warmup_steps=0)  # every step timed acts
            if compile != "step":
                in_step[mode] = _hook_timer(handles[mode])
        opt_step = torch.compile(opt.step) if compile == "step" else opt.step

        def step(model=model, opt=opt, opt_step=opt_step):
            opt.zero_grad(set_to_none=True)
            (model(x) - y).square().mean().backward()
            opt_step()

        runs[mode] = step
    med = _interleaved(runs, repeats, stat=statistics.median if interval == 1 else _trimmed_mean)
    base_t = med[None]
    label = {"none": "", "kernel": " (attach(compile=True))", "step": " (torch.compile(opt.step))"}[compile]
    label += f" (interval={interval})" if interval != 1 else ""
    print(f"\n(c) fixed cost{label}: PEFT MLP, 6 LoRA'd Linear({width}, {width}), r={r}, batch {batch}, AdamW, "
          f"{repeats} interleaved steps per mode")
    head = f"{'mode':<26} {'step (median)' if interval == 1 else 'step (mean)':>14} {'vs AdamW':>9}"
    if in_step:
        head += f" {'hook in step':>13} {'hook back to back':>18}"
    print(head + "\n" + "-" * len(head))
    print(f"{'AdamW (no hook)':<26} {base_t * 1e3:>12.2f}ms {'':>9}")
    ratios = {}
    for mode in MODES:
        ratios[mode] = med[mode] / base_t
        row = f"{'-'.join(mode):<26} {med[mode] * 1e3:>12.2f}ms {ratios[mode]:>8.2f}x"
        if mode in in_step and interval != 1:
            row += f" {statistics.fmean(in_step[mode][5:]) * 1e6:>11.0f}us {'-':>18}"
        elif mode in in_step:
            h = handles[mode]
            hot = []
            with torch.no_grad():
                for _ in range(50):  # the same call, again and again: caches warm
                    t0 = time.perf_counter()
                    h._pre_hook(h.optimizer, (), {})
                    hot.append(time.perf_counter() - t0)
            hk = statistics.median(in_step[mode][5:])
            row += f" {hk * 1e6:>11.0f}us {statistics.median(hot[5:]) * 1e6:>16.0f}us"
        print(row)
    for mode in floors:  # benchmarks.overhead.minimal_hook: a floor, not a mode
        ratios[mode] = med[mode] / base_t
        print(f"{'minimal hook, full-' + mode[1]:<26} {med[mode] * 1e3:>12.2f}ms {ratios[mode]:>8.2f}x")
    return ratios


def bench_tasks(repeats: int, names: list[str]) -> dict:
    """(d) ``reflora bench``'s own tasks, one training step per method, interleaved (the bench's
    ``--full`` runs them one after another, where machine drift enters the ratios)."""
    from reflora.bench.methods import make_optimizer
    from reflora.bench.tasks import TASKS

    out = {}
    methods = ["lora", "reflora", "reflora-param", "reflora-s", "reflora-s-grad"]
    for name in names:
        task = TASKS[name]()
        runs = {}
        for method in methods:
            model = task.build(0)
            opt, _ = make_optimizer(method, model, task.shared_lr)
            batches = task.batches(0)

            def step(model=model, opt=opt, batches=batches):
                opt.zero_grad(set_to_none=True)
                task.loss(model, next(batches)).backward()
                opt.step()

            runs[method] = step
        med = _interleaved(runs, repeats)
        print(f"\n(d) bench task {name!r}: one training step per method, {repeats} interleaved steps each")
        head = f"{'method':<16} {'step (median)':>14} {'vs LoRA':>9}"
        print(head + "\n" + "-" * len(head))
        for method in methods:
            print(f"{method:<16} {med[method] * 1e3:>12.2f}ms {med[method] / med['lora'] - 1:>+8.1%}")
        out[name] = {m: med[m] / med["lora"] for m in methods}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="LLaMA-7B layers for (a) (default 8)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model-layers", type=int, default=12, help="layers of the ~100M Llama in (b)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-model", action="store_true", help="run (a) only")
    ap.add_argument("--device", default="cpu", help="device for (a), e.g. cuda (default cpu)")
    ap.add_argument("--sections", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"],
                    help="(a) hook alone at LLaMA-7B shapes, (b) 110M Llama training step, (c) small-model fixed "
                         "cost, (d) the bench's graph and vision tasks")
    ap.add_argument("--tasks", nargs="+", default=["graph", "vision"], help="bench tasks for (d)")
    ap.add_argument("--task-repeats", type=int, default=100, help="steps per method in (d)")
    ap.add_argument("--small-repeats", type=int, default=200, help="steps per mode in (c)")
    ap.add_argument("--small-interval", type=int, default=1, help="attach's interval in (c) (default 1)")
    ap.add_argument("--small-compile", choices=("none", "kernel", "step"), default="none",
                    help="(c) with attach(compile=True) ('kernel') or torch.compile(opt.step) ('step')")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if "a" in args.sections:
        hook_only(args.layers, args.ranks, args.repeats, args.device)
    if "b" in args.sections and not args.skip_model:
        training_step(16, args.repeats, args.model_layers, args.seq, args.batch)
    if "c" in args.sections and not args.skip_model:
        small_model(args.small_repeats, compile=args.small_compile, interval=args.small_interval)
    if "d" in args.sections and not args.skip_model:
        bench_tasks(args.task_repeats, args.tasks)


if __name__ == "__main__":
    main()
