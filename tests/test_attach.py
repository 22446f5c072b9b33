"""reflora.attach: every supported optimizer x mode, exact references, semantics, bad input."""

from __future__ import annotations

import io
import re

import warnings

import pytest
import torch
from torch import nn

import reflora
from reflora import UnsupportedOptimizerError, attach
from reflora.transport import register_state_transport

from attach_helpers import LR, MODE_IDS, MODES, OPTIMIZERS, LoRANet, setup, train

OPT_NAMES = list(OPTIMIZERS)


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_optimizer_mode_contract(opt_name, variant, space) -> None:
    net, opt, handle = setup(opt_name, variant, space)
    assert handle.num_groups == 2
    losses = train(net, opt, 60)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.75 * losses[0], (losses[0], losses[-1])
    assert handle.step_count == 60

    # a step with lr = 0 only refactors: B A (and the model output) must not change
    before = [o.detach().clone() for o in net.outputs()]
    deltas = net.deltas()
    for g in opt.param_groups:
        g["lr"] = 0.0
    net.loss().backward()
    opt.step()
    for d0, d1 in zip(deltas, net.deltas()):
        assert torch.allclose(d0, d1, atol=1e-5, rtol=1e-4)
    for o0, o1 in zip(before, net.outputs()):
        assert (o0 - o1).abs().max() <= 1e-4 * o0.abs().max()
    if space == "parameter":
        for a, b in net.pairs():  # and the factors are balanced now
            na, nb = a.detach().norm(), b.detach().norm()
            if variant == "scalar":
                assert torch.allclose(na, nb, rtol=1e-4)
            else:
                assert torch.allclose(a @ a.T, b.T @ b, atol=1e-4 * float(na * nb))


@pytest.mark.parametrize("opt_name", OPT_NAMES)
@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_checkpoint_round_trip_is_identical(opt_name, variant, space) -> None:
    kw = dict(warmup_steps=2, interval=2)
    net, opt, handle = setup(opt_name, variant, space, **kw)
    train(net, opt, 7)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "reflora": handle.state_dict()}, buf)
    train(net, opt, 6)
    want = [p.detach().clone() for p in net.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    net2, opt2, handle2 = setup(opt_name, variant, space, seed=1, **kw)  # different init on purpose
    net2.load_state_dict(ckpt["model"])
    net2.W0, net2.targets, net2.X = net.W0, net.targets, net.X
    opt2.load_state_dict(ckpt["opt"])
    handle2.load_state_dict(ckpt["reflora"])
    assert handle2.step_count == 7
    train(net2, opt2, 6)
    for w, p in zip(want, net2.parameters()):
        assert torch.equal(w, p.detach())


def _sqrtm_spd(X):
    w, V = torch.linalg.eigh(X)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def test_full_gradient_sgd_matches_independent_preconditioned_gd() -> None:
    """S computed independently as the geometric mean X^-1/2 (X^1/2 Y X^1/2)^1/2 X^-1/2."""
    g = torch.Generator().manual_seed(3)
    m, n, r, lr = 20, 12, 3, 0.01
    target = torch.randn(n, m, generator=g, dtype=torch.float64)
    A0 = torch.randn(r, m, generator=g, dtype=torch.float64)
    B0 = 0.1 * torch.randn(n, r, generator=g, dtype=torch.float64)

    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = torch.optim.SGD([A, B], lr=lr)
    attach(opt, [(A, B)], variant="full", space="gradient", warmup_steps=0)  # the form from step 1
    a, b = A0.clone(), B0.clone()
    for _ in range(20):
        opt.zero_grad()
        (0.5 * (B @ A - target).square().sum()).backward()
        opt.step()
        G = b @ a - target
        X, Y = a @ a.T, b.T @ b
        Xh = _sqrtm_spd(X)
        Xih = torch.linalg.inv(Xh)
        S = Xih @ _sqrtm_spd(Xh @ Y @ Xh) @ Xih
        a, b = a - lr * torch.linalg.solve(S, b.T @ G), b - lr * (G @ a.T) @ S
    assert torch.allclose(B.detach() @ A.detach(), b @ a, rtol=1e-9, atol=1e-9)


def test_scalar_parameter_adam_matches_hand_rolled_reflora_s() -> None:
    g = torch.Generator().manual_seed(4)
    m, n, r = 16, 10, 3
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    target = torch.randn(n, m, generator=g, dtype=torch.float64)
    A0 = torch.randn(r, m, generator=g, dtype=torch.float64)
    B0 = torch.zeros(n, r, dtype=torch.float64)

    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = torch.optim.Adam([A, B], lr=lr, betas=(b1, b2), eps=eps)
    attach(opt, [(A, B)], variant="scalar", space="parameter")

    a, b = A0.clone(), B0.clone()
    ma, va, mb, vb = (torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b))
    for t in range(1, 21):
        opt.zero_grad()
        (0.5 * (B @ A - target).square().sum()).backward()
        opt.step()
        # reference: gradients at (a, b); rescale to equal norms (p = 1 while b = 0), move the
        # gradients and Adam's moments with it, then one textbook Adam step
        G = b @ a - target
        ga, gb = b.T @ G, G @ a.T
        na, nb = a.norm(), b.norm()
        p = (nb / na).sqrt() if (na > 0 and nb > 0) else torch.tensor(1.0, dtype=torch.float64)
        a, b, ga, gb = a * p, b / p, ga / p, gb * p
        ma, va, mb, vb = ma / p, va / p**2, mb * p, vb * p**2
        ma = b1 * ma + (1 - b1) * ga
        va = b2 * va + (1 - b2) * ga**2
        mb = b1 * mb + (1 - b1) * gb
        vb = b2 * vb + (1 - b2) * gb**2
        c1, c2 = 1 - b1**t, 1 - b2**t
        a = a - lr * (ma / c1) / ((va / c2).sqrt() + eps)
        b = b - lr * (mb / c1) / ((vb / c2).sqrt() + eps)
    assert torch.allclose(A.detach(), a, rtol=1e-9, atol=1e-12)
    assert torch.allclose(B.detach(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant, space", MODES, ids=MODE_IDS)
def test_warmup_longer_than_run_is_bit_identical(variant, space) -> None:
    net, opt, _ = setup("AdamW", variant, space, warmup_steps=100)
    bare = LoRANet()
    bare_opt = OPTIMIZERS["AdamW"](list(bare.parameters()), LR["AdamW"])
    train(net, opt, 15)
    train(bare, bare_opt, 15)
    for p, q in zip(net.parameters(), bare.parameters()):
        assert torch.equal(p, q)


def test_remove_restores_the_bare_optimizer() -> None:
    net, opt, handle = setup("Adam", "full", "gradient")
    bare = LoRANet()
    bare_opt = OPTIMIZERS["Adam"](list(bare.parameters()), LR["Adam"])
    handle.remove()
    train(net, opt, 5)
    train(bare, bare_opt, 5)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), bare.parameters()))
    attach(opt, net.pairs())  # can attach again after removal


def test_counts_optimizer_steps_not_micro_batches() -> None:
    net, opt, handle = setup("SGD", "full", "parameter", warmup_steps=3)
    for _ in range(5):
        opt.zero_grad()
        for _ in range(4):  # gradient accumulation
            (net.loss() / 4).backward()
        opt.step()
    assert handle.step_count == 5


def test_grad_scaler_skipped_step_is_not_counted() -> None:
    net, opt, handle = setup("Adam", "full", "parameter")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    train(net, opt, 2)
    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    scaler.scale(net.loss()).backward()
    net.A[0].grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert handle.step_count == 2
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))
    opt.zero_grad()
    scaler.scale(net.loss()).backward()
    scaler.step(opt)
    scaler.update()
    assert handle.step_count == 3


def test_pairs_without_gradients_are_skipped() -> None:
    net = LoRANet()
    extra_A = nn.Parameter(torch.randn(4, 8))
    extra_B = nn.Parameter(torch.randn(8, 4))  # never used in the loss: grads stay None
    opt = torch.optim.Adam([*net.parameters(), extra_A, extra_B], lr=1e-2)
    handle = attach(opt, [*net.pairs(), (extra_A, extra_B)], space="parameter")
    snapshot = extra_A.detach().clone()
    train(net, opt, 3)
    assert handle.step_count == 3 and torch.equal(extra_A, snapshot)


def test_interval_caches_the_metric_between_refreshes() -> None:
    g = torch.Generator().manual_seed(5)
    A = nn.Parameter(torch.randn(3, 10, generator=g, dtype=torch.float64))
    B = nn.Parameter(torch.randn(6, 3, generator=g, dtype=torch.float64))
    target = torch.randn(6, 10, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD([A, B], lr=1e-2)
    handle = attach(opt, [(A, B)], interval=3)
    metrics = []
    for _ in range(4):
        metrics.append(reflora.preconditioner(A.detach(), B.detach(), resolved=handle.resolved))
        opt.zero_grad()
        (0.5 * (B @ A - target).square().sum()).backward()
        gA = A.grad.clone()
        a0 = A.detach().clone()
        opt.step()
        S, S_inv = metrics[3 * (len(metrics) - 1 >= 3)]
        assert torch.allclose((a0 - A.detach()) / 1e-2, S_inv @ gA)
    assert "cache" in handle.state_dict() and len(handle.state_dict()["cache"]) == 1


class _Unregistered(torch.optim.Optimizer):  # plain SGD, no transport registered
    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_gradient_mode_works_with_an_unregistered_optimizer() -> None:
    net = LoRANet()
    opt = _Unregistered(net.parameters(), lr=2e-3)
    attach(opt, net.pairs(), space="gradient")
    losses = train(net, opt, 40)
    assert losses[-1] < losses[0]
    other = LoRANet()
    with pytest.raises(UnsupportedOptimizerError, match=r"register_state_transport\(_Unregistered.*space='gradient'"):
        attach(_Unregistered(other.parameters(), lr=1.0), other.pairs(), space="parameter")


def test_registered_custom_transport_is_used() -> None:
    class MomentumOnly(torch.optim.SGD):
        pass

    net = LoRANet()
    opt = MomentumOnly(net.parameters(), lr=1e-3, momentum=0.9)
    attach(opt, net.pairs(), space="parameter", warmup_steps=0)  # inherits SGD's registration through the MRO
    train(net, opt, 3)

    class Odd(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["weird"] = torch.zeros_like(p)
                        p.add_(p.grad, alpha=-group["lr"])

    register_state_transport(Odd, {"momentum": "first"})
    net = LoRANet()
    opt = Odd(net.parameters())
    attach(opt, net.pairs(), space="parameter", warmup_steps=0)
    train(net, opt, 1)
    with pytest.raises(KeyError, match="holds state 'weird'"):
        train(net, opt, 1)


def test_multiple_adapters_and_double_attach() -> None:
    net = LoRANet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    pairs = net.pairs()
    h1 = attach(opt, pairs[:1], variant="full")
    h2 = attach(opt, pairs[1:], variant="scalar", space="parameter")
    train(net, opt, 3)
    assert h1.step_count == h2.step_count == 3
    with pytest.raises(ValueError, match="already managed by RefLoRAHandle"):
        attach(opt, pairs[:1])


@pytest.mark.compile
@pytest.mark.parametrize("space", ["gradient", "parameter"])
def test_compiled_kernel_matches_eager_without_recompiling(space) -> None:
    torch._dynamo.reset()
    # warmup_steps=0: the kernel compiles at step 1, so steps 3-5 must not recompile
    net, opt, _ = setup("AdamW", "full", space, compile=True, warmup_steps=0)
    ref, ref_opt, _ = setup("AdamW", "full", space, warmup_steps=0)
    train(net, opt, 2)
    train(ref, ref_opt, 2)
    with torch.compiler.set_stance("fail_on_recompile"):
        train(net, opt, 3)
    train(ref, ref_opt, 3)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4)


def test_attach_to_a_peft_model() -> None:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = attach(opt, model, space="parameter")
    assert len(handle.pairs) == 4
    ids = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------- bad input


def _opt(*params):
    return torch.optim.SGD(list(params), lr=0.1)


P = lambda *shape: nn.Parameter(torch.randn(*shape))  # noqa: E731
A_, B_ = P(4, 8), P(6, 4)

BAD = [
    ("not an optimizer", lambda: attach("adam", [(A_, B_)]), TypeError, "optimizer must be a torch.optim.Optimizer; got str"),
    ("closure-only optimizer", lambda: attach(torch.optim.LBFGS([A_, B_]), [(A_, B_)]), UnsupportedOptimizerError, "LBFGS.step requires a closure"),
    ("params not in optimizer", lambda: attach(_opt(P(3)), [(A_, B_)]), ValueError, r"pair 'pair0': its A factor \(shape \(4, 8\)\) is not a parameter of this torch\.optim\.sgd\.SGD"),
    ("rank mismatch", lambda: attach(_opt(A_, P(6, 3)), [(A_, P(6, 3))]), ValueError, re.escape("A has rank 4 (shape (4, 8)) but B has rank 3 (shape (6, 3))")),
    ("duplicate pairs", lambda: attach(_opt(A_, B_), [(A_, B_), (A_, B_)]), ValueError, "shares its A factor with pair 'pair0'"),
    ("frozen factor (LoRA-FA)", lambda: attach(_opt(A_, B_), [(A_.detach(), B_)]), ValueError,
     r"pair 'pair0': its A factor \(shape \(4, 8\)\) is frozen \(requires_grad=False\).*LoRA-FA"),
    ("interval < 1", lambda: attach(_opt(A_, B_), [(A_, B_)], interval=0), ValueError, "interval must be >= 1; got 0"),
    ("interval float", lambda: attach(_opt(A_, B_), [(A_, B_)], interval=1.5), TypeError, "interval must be an int; got float"),
    ("negative warmup", lambda: attach(_opt(A_, B_), [(A_, B_)], warmup_steps=-1), ValueError, "warmup_steps must be >= 0; got -1"),
    ("unknown variant", lambda: attach(_opt(A_, B_), [(A_, B_)], variant="diag"), ValueError, "variant must be one of"),
    ("unknown space", lambda: attach(_opt(A_, B_), [(A_, B_)], space="weights"), ValueError, r"space must be one of \('auto', 'gradient', 'parameter'\); got 'weights'"),
    ("unknown second-moment rule", lambda: attach(_opt(A_, B_), [(A_, B_)], second_moment="exact"), ValueError, "second_moment must be one of"),
    ("no pairs at all", lambda: attach(_opt(A_, B_), []), ValueError, "no pairs given: RefLoRA would be a silent no-op"),
    ("module without pairs", lambda: attach(_opt(A_, B_), nn.Linear(3, 3)), ValueError, "no trainable low-rank pair found in Linear"),
    ("pairs is a tensor", lambda: attach(_opt(A_, B_), A_), TypeError, "pairs must be an nn.Module"),
    ("pair not a tuple", lambda: attach(_opt(A_, B_), [A_]), TypeError, r"pairs\[0\] must be an \(A, B\) tuple"),
    ("compile not bool", lambda: attach(_opt(A_, B_), [(A_, B_)], compile="yes"), TypeError, "compile must be a bool"),
]


@pytest.mark.parametrize("call, exc, pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_attach_bad_input(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()


def test_load_state_dict_rejects_other_settings() -> None:
    net, opt, handle = setup("Adam", "full", "gradient")
    state = handle.state_dict()
    net2, opt2, handle2 = setup("Adam", "scalar", "gradient")
    with pytest.raises(ValueError, match="saved with variant='full' but this handle has variant='scalar'"):
        handle2.load_state_dict(state)


# ------------------------------------------------------------------------ space="auto" (default)


class _MyAdamW(torch.optim.AdamW):  # a subclass follows its registered base class
    pass


AUTO = [
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-2), "parameter"),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=1e-2), "parameter"),
    ("NAdam", lambda ps: torch.optim.NAdam(ps, lr=1e-2), "parameter"),
    ("RAdam", lambda ps: torch.optim.RAdam(ps, lr=1e-2), "parameter"),
    ("RMSprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "parameter"),
    ("Adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2), "parameter"),
    ("AdamW subclass", lambda ps: _MyAdamW(ps, lr=1e-2), "parameter"),
    ("SGD momentum", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), "gradient"),
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=1e-2), "gradient"),
    ("Adamax (unregistered)", lambda ps: torch.optim.Adamax(ps, lr=1e-2), "gradient"),
    ("own optimizer (unregistered)", lambda ps: _Unregistered(ps), "gradient"),
]
if hasattr(torch.optim, "Adafactor"):
    AUTO.append(("Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2), "parameter"))


@pytest.mark.parametrize("make, want", [a[1:] for a in AUTO], ids=[a[0] for a in AUTO])
def test_auto_space_per_optimizer_family(make, want) -> None:
    net = LoRANet()
    opt = make(list(net.parameters()))
    assert reflora.default_space(opt) == want
    handle = attach(opt, net.pairs())  # space="auto" is the default
    assert handle.space == want and f"space={want!r}" in repr(handle)
    assert handle.state_dict()["space"] == want
    losses = train(net, opt, 3)
    assert handle.step_count == 3 and torch.isfinite(torch.tensor(losses)).all()


def test_auto_space_with_transformers_adafactor() -> None:
    transformers = pytest.importorskip("transformers")
    net = LoRANet()
    opt = transformers.optimization.Adafactor(list(net.parameters()), lr=1e-2, relative_step=False)
    assert reflora.default_space(opt) == "parameter"
    assert attach(opt, net.pairs()).space == "parameter"


@pytest.mark.parametrize("opt_name, space", [("AdamW", "parameter"), ("SGD", "gradient")])
def test_auto_space_trains_as_the_explicit_space(opt_name, space) -> None:
    net, ref = LoRANet(), LoRANet()
    opt = OPTIMIZERS[opt_name](list(net.parameters()), LR[opt_name])
    ref_opt = OPTIMIZERS[opt_name](list(ref.parameters()), LR[opt_name])
    assert attach(opt, net.pairs()).space == space
    attach(ref_opt, ref.pairs(), space=space)
    train(net, opt, 4)
    train(ref, ref_opt, 4)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), ref.parameters()))


def test_auto_space_falls_back_where_parameter_space_would_raise() -> None:
    g = torch.Generator().manual_seed(0)
    # newton_schulz refuses full-variant parameter space on pairs of rank above the layer's size
    A, B = nn.Parameter(torch.randn(8, 32, generator=g)), nn.Parameter(torch.randn(3, 8, generator=g))
    opt = torch.optim.AdamW([A, B], lr=1e-2)
    with pytest.raises(ValueError, match="newton_schulz"):
        attach(opt, [(A, B)], space="parameter", solver="newton_schulz", rank_above_size="act")
    handle = attach(opt, [(A, B)], solver="newton_schulz", rank_above_size="act")
    assert handle.space == "gradient"
    handle.remove()
    # the scalar variant and the eigh solver have no such rule: parameter space
    assert attach(opt, [(A, B)], variant="scalar", solver="newton_schulz", rank_above_size="act").space == "parameter"

    # state the transport cannot move: a warning, then gradient space
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    train(net, opt, 1)
    A0 = net.pairs()[0][0]
    opt.state[A0]["extra"] = torch.zeros(3)
    with pytest.raises(KeyError, match="extra"):
        attach(opt, net.pairs(), space="parameter")
    with pytest.warns(UserWarning, match=r"space='auto'.*cannot be moved.*using space='gradient'"):
        handle = attach(opt, net.pairs())
    assert handle.space == "gradient"


def test_auto_space_under_a_deepspeed_wrapper() -> None:
    # DeepSpeed ZeRO is detected by the wrapper's module; parameter space is unsupported there
    inner = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-2)
    Wrapper = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})
    wrapper = Wrapper()
    wrapper.optimizer = inner
    assert reflora.default_space(inner) == "parameter"
    assert reflora.default_space(wrapper) == "gradient"


def test_func_defaults_follow_attach() -> None:
    from reflora.func import adamw, sgd

    net = LoRANet()
    params = list(net.parameters())
    names = [(f"p{2 * k}", f"p{2 * k + 1}") for k in range(len(net.pairs()))]
    assert adamw(names).space == attach(torch.optim.AdamW(params), net.pairs()).space == "parameter"
    net = LoRANet()
    sgd_space = attach(torch.optim.SGD(list(net.parameters()), lr=0.1, momentum=0.9), net.pairs()).space
    assert sgd(names, momentum=0.9).space == sgd_space == "gradient"
    assert adamw(names, space="gradient").space == "gradient" and sgd(names, space="parameter").space == "parameter"


def test_resuming_an_old_gradient_space_checkpoint_under_auto_names_the_fix() -> None:
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    ckpt = attach(opt, net.pairs(), space="gradient").state_dict()  # the default before space="auto"
    net2 = LoRANet()
    handle = attach(torch.optim.AdamW(list(net2.parameters()), lr=1e-2), net2.pairs())
    with pytest.raises(ValueError, match=r"saved with space='gradient' but this handle has space='parameter'.*"
                                         r"space='gradient' explicitly"):
        handle.load_state_dict(ckpt)


def test_auto_falls_back_to_gradient_space_with_one_notice_for_an_unregistered_optimizer() -> None:
    net = LoRANet()
    opt = torch.optim.Adamax(list(net.parameters()), lr=1e-2)
    with pytest.warns(reflora.GradientSpaceFallbackWarning, match=r"register_state_transport\(Adamax"):
        handle = attach(opt, net.pairs())
    assert handle.space == "gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(net, opt, 3)  # once per handle: nothing more while training
        handle.remove()
        attach(opt, net.pairs(), space="gradient")  # explicit: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=reflora.GradientSpaceFallbackWarning)
        net3 = LoRANet()
        attach(torch.optim.Adamax(list(net3.parameters()), lr=1e-2), net3.pairs())
        net4 = LoRANet()  # a registered SGD-like optimizer picks gradient space by design: no notice
        attach(torch.optim.SGD(list(net4.parameters()), lr=1e-2), net4.pairs())


@pytest.mark.parametrize("option, saved, now", [
    ("resolved", 0.0, None), ("frame", "symmetric", None), ("second_moment", "keep", "square"),
    ("solver", "newton_schulz", "eigh"),
])
def test_load_state_dict_refuses_other_arithmetic_options_unless_not_strict(option, saved, now) -> None:
    extra = {"frame": "symmetric"} if option == "solver" else {}  # newton_schulz needs the symmetric frame
    net, opt, handle = setup("AdamW", "full", "parameter", **{option: saved}, **extra)
    train(net, opt, 4)
    state = handle.state_dict()
    assert state[option] == saved
    net2 = LoRANet()
    opt2 = OPTIMIZERS["AdamW"](list(net2.parameters()), LR["AdamW"])
    handle2 = attach(opt2, net2.pairs(), variant="full", space="parameter", **{option: now}, **extra)
    with pytest.raises(ValueError, match=rf"saved with .*{option}={saved!r} but this handle has .*{option}=.*attach with "
                                         rf".*{option}={saved!r} to resume the run as saved, or call load_state_dict\(state, strict=False\)"):
        handle2.load_state_dict(state)
    with pytest.warns(UserWarning, match=rf"other settings.*{option}="):
        handle2.load_state_dict(state, strict=False)
    assert handle2.step_count == 4
    # checkpoints written before these options were saved load without the check
    old = {k: v for k, v in state.items() if k not in ("resolved", "frame", "second_moment", "solver", "eps")}
    handle2.load_state_dict(old)


def test_a_pair_without_gradients_after_the_first_steps_is_named_once() -> None:
    net = LoRANet()
    opt = torch.optim.AdamW(list(net.parameters()), lr=1e-2)
    handle = attach(opt, net.pairs())
    unused = net.pairs()[2]
    with pytest.warns(reflora.UnusedPairWarning, match=r"'pair2': a factor has had no gradient in the first 3"):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            sum(0.5 * o.square().mean() for o in net.outputs()[:2]).backward()
            opt.step()
    assert unused[0].grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step()
    assert handle.step_count == 6
