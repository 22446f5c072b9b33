"""Bad input to every public entry point of reflora.functional: (call, exception, message)."""

from __future__ import annotations

import re

import pytest
import torch

from reflora.functional import (
    Transform,
    apply_transform,
    map_first_moments,
    map_second_moments,
    precondition,
    preconditioner,
    refactor,
    refactor_transform,
)

A = torch.randn(8, 512)
B = torch.randn(768, 8)
T = refactor_transform(torch.randn(4, 6), torch.randn(5, 4))

CASES = [
    ("A not a tensor", lambda: refactor([[1.0]], B), TypeError, "A must be a torch.Tensor; got list"),
    ("A 1-D", lambda: refactor(torch.randn(8), B), ValueError, r"A must have at least 2 dimensions .* got shape \(8,\)"),
    ("B 1-D", lambda: refactor(A, torch.randn(8)), ValueError, r"B must have at least 2 dimensions"),
    (
        "rank mismatch",
        lambda: refactor(A, torch.randn(768, 4)),
        ValueError,
        re.escape("A has rank 8 (shape (8, 512)) but B has rank 4 (shape (768, 4))"),
    ),
    ("integer dtype", lambda: refactor(A.long(), B.long()), TypeError, r"A has dtype torch.int64; expected a real floating"),
    ("bool dtype", lambda: refactor(A > 0, B), TypeError, r"A has dtype torch.bool"),
    ("complex dtype", lambda: refactor(A, B.to(torch.complex64)), TypeError, r"B has dtype torch.complex64"),
    ("mixed dtypes", lambda: refactor(A, B.double()), TypeError, r"A has dtype torch.float32 but B has dtype torch.float64"),
    ("different devices", lambda: refactor(A, B.to("meta")), ValueError, r"A is on cpu but B is on meta"),
    (
        "batch shapes do not broadcast",
        lambda: refactor(torch.randn(3, 8, 16), torch.randn(2, 20, 8)),
        ValueError,
        r"batch shapes of A \(3,\) and B \(2,\) do not broadcast",
    ),
    ("rank 0", lambda: refactor(torch.randn(0, 16), torch.randn(8, 0)), ValueError, r"A has shape \(0, 16\), an empty matrix; expected \(\.\.\., r, m\) with r, m, n >= 1"),
    ("empty B", lambda: refactor(torch.randn(4, 16), torch.randn(0, 4)), ValueError, r"B has shape \(0, 4\), an empty matrix"),
    ("unknown frame", lambda: refactor(A, B, frame="eigen"), ValueError, r"frame must be one of \('paper', 'symmetric', 'block'\); got 'eigen'"),
    ("unknown variant", lambda: refactor(A, B, variant="diag"), ValueError, r"variant must be one of \('full', 'scalar'\); got 'diag'"),
    ("eps wrong type", lambda: refactor(A, B, eps="1e-6"), TypeError, r"eps must be a float or None; got str"),
    ("eps negative", lambda: refactor(A, B, eps=-1.0), ValueError, r"eps must be in \[0, 1\); got -1.0"),
    ("grads not a pair", lambda: refactor(A, B, torch.randn(8, 512)), TypeError, r"grads must be a \(grad_A, grad_B\) tuple"),
    (
        "grad_A wrong shape",
        lambda: refactor(A, B, (torch.randn(8, 511), torch.randn(768, 8))),
        ValueError,
        re.escape("grad_A has shape (8, 511) but A has shape (8, 512)"),
    ),
    (
        "grad_B wrong shape",
        lambda: precondition(A, B, torch.randn(8, 512), torch.randn(8, 768)),
        ValueError,
        re.escape("grad_B has shape (8, 768) but B has shape (768, 8)"),
    ),
    ("grad integer", lambda: precondition(A, B, A.long(), B), TypeError, r"grad_A has dtype torch.int64"),
    ("grad on another device", lambda: precondition(A, B, A.to("meta"), B), ValueError, r"grad_A is on meta but A is on cpu"),
    ("precondition unknown variant", lambda: precondition(A, B, A, B, variant="x"), ValueError, r"variant must be one of"),
    ("preconditioner rank mismatch", lambda: preconditioner(torch.randn(3, 5), torch.randn(5, 4)), ValueError, r"A has rank 3"),
    ("transform wrong type", lambda: apply_transform(torch.eye(4), A, B), TypeError, r"transform must be a Transform"),
    (
        "transform not square",
        lambda: map_first_moments(Transform(torch.randn(4, 3), torch.randn(4, 4)), A, B),
        ValueError,
        r"transform.left must be \(\.\.\., r, r\) or \(\.\.\., 1, 1\); got shape \(4, 3\)",
    ),
    ("unknown second-moment rule", lambda: map_second_moments(T, torch.ones(4, 6), torch.ones(5, 4), rule="exact"), ValueError, r"rule must be one of \('square', 'keep', 'reset'\); got 'exact'"),
    ("moment integer", lambda: map_first_moments(T, torch.ones(4, 6, dtype=torch.long), torch.ones(5, 4)), TypeError, r"m_A has dtype torch.int64"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, pattern) -> None:
    with pytest.raises(exc, match=pattern):
        call()
