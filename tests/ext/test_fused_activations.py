"""The fused adapter's own activation functions (CPU: the vector exp / tanh / erf of
csrc/cpu/vec_math.h; CUDA: the device math library), isolated by running the op with identity
projections, so that out = act(x) exactly. Checked against float64 over the whole float range, by the
numerical rule against ATen's float32 functions, plus relative accuracy where the function has it."""

import pytest
import torch
import torch.nn.functional as F

import sparseadapter_ext as ops
from sparseadapter import SparseLinear

WIDTH = 64
FUNCTIONS = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def _identity(device):
    eye = torch.eye(WIDTH)
    return tuple(None if t is None else t.to(device) for t in SparseLinear.from_dense(eye, eye.bool()).csr_buffers())


def _inputs(device):
    """Both signs from 1e-8 to 100 on a log scale, a dense sweep of [-8, 8] (every branch boundary
    of the approximations lies in there), and zero; a whole number of 32-token tiles and a partial one."""
    mag = torch.logspace(-8, 2, 40 * WIDTH, dtype=torch.float64)
    values = torch.cat([mag, -mag, torch.linspace(-8, 8, 97 * WIDTH + 5, dtype=torch.float64), torch.zeros(WIDTH - 5)])
    return values.reshape(-1, WIDTH).to(device)


@pytest.mark.parametrize("activation", list(FUNCTIONS))
def test_activation_matches_float64(device, activation):
    fn = FUNCTIONS[activation]
    x64 = _inputs(device)
    x = x64.float()
    buf = _identity(device)
    out = ops.sparse_adapter(x, None, buf, buf, activation, 1.0).double()
    ref = fn(x.double())  # the exact function of the float32 inputs
    err = (out - ref).abs()
    aten_err = (fn(x).double() - ref).abs().max().item()
    # the numerical rule, with an absolute floor of about one float32 ulp at 1
    assert err.max().item() <= 2 * aten_err + 1e-7, (
        f"{activation}: max error {err.max().item():.3g}, ATen {aten_err:.3g}"
    )
    if activation in ("silu", "tanh"):  # accurate relative to the result, down to tiny values
        significant = ref.abs() > 1e-30
        rel = (err[significant] / ref.abs()[significant]).max().item()
        assert rel < 1e-6, f"{activation}: relative error {rel:.3g}"
    if activation == "gelu":  # x/2 (1 + erf): absolute error scales with |x|
        assert (err <= 4e-7 * x64.abs().clamp_min(1)).all()


@pytest.mark.parametrize("activation", [*FUNCTIONS, "relu"])
def test_activation_limits(device, activation, path):
    """Infinities give the function's limits (gelu and silu of -inf: 0) and NaN stays NaN, also
    through relu (as torch.relu). The dense path multiplies the expanded weight's zeros too, so there,
    as in a dense layer, one non-finite input makes every output NaN: NaN must still come out."""
    x = torch.full((1, WIDTH), float("nan"), device=device)
    x[0, :3] = torch.tensor([float("inf"), float("-inf"), -1e4])
    buf = _identity(device)
    out = ops.sparse_adapter(x, None, buf, buf, activation, 1.0)[0].tolist()
    if path == "dense":
        assert all(v != v for v in out)
        return
    limits = {
        "gelu": [float("inf"), 0.0, 0.0],
        "silu": [float("inf"), 0.0, 0.0],
        "tanh": [1.0, -1.0, -1.0],
        "relu": [float("inf"), 0.0, 0.0],
    }
    assert out[:3] == limits[activation]
    assert all(v != v for v in out[3:])
