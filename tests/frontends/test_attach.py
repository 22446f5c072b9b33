"""reflora.attach: every supported optimizer x mode (product kept, loss falls, checkpoint round trip),
exact references, a PEFT model, bad input."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn

from reflora import attach, UnsupportedOptimizerError

from attach_helpers import LoRANet, MODE_IDS, MODES, OPTIMIZERS, setup, train

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


# ------------------------------------------------------------------------ space="auto" (default)


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
