"""The numerical rule itself (conftest.assert_close_to_reference): a correct result summed in another
order passes even where the dense error is 0; a result with one term missing, or off by K ulps of
the outputs' scale, fails."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_reference, float64_reference

TOKENS, OUT, TERMS = 48, 32, 256


def _sequential(x, w, dtype, order, skip=None):
    """x @ w.T as one running sum per output in the kernels' accumulation type, the terms taken in
    `order` ("reversed" or "sorted": ascending values, whose partial sums drift furthest); `skip`
    (token, out, term) leaves one term out. Rounded to dtype at the end."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    terms = x.to(acc)[:, None, :] * w.to(acc)[None]
    if skip is not None:
        terms[skip] = 0
    terms = terms.flip(-1) if order == "reversed" else terms.sort(-1).values
    total = torch.zeros(terms.shape[:-1], dtype=acc)
    for k in range(terms.shape[-1]):
        total += terms[..., k]
    return total.to(dtype)


def _case(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, TERMS, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(OUT, TERMS, generator=gen, dtype=torch.float64).to(dtype)
    ref64, abs64 = float64_reference(F.linear, x, w)
    return x, w, ref64, abs64, F.linear(x, w)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("order", ["reversed", "sorted"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_another_summation_order_passes(dtype, order, seed):
    x, w, ref64, abs64, dense = _case(dtype, seed)
    assert_close_to_reference(_sequential(x, w, dtype, order), ref64, abs64, TERMS, dense, order)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_missing_term_fails(dtype, seed):
    """The term left out is the one of average size, S_i / K, of the output with the largest sum."""
    x, w, ref64, abs64, dense = _case(dtype, seed)
    t, o = divmod(int(abs64.argmax()), OUT)
    size = (x[t].double() * w[o].double()).abs()
    k = int((size - abs64[t, o] / TERMS).abs().argmin())
    wrong = _sequential(x, w, dtype, "reversed", skip=(t, o, k))
    with pytest.raises(AssertionError, match="beyond the rule"):
        assert_close_to_reference(wrong, ref64, abs64, TERMS, dense, "one term missing")


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_error_of_k_ulps_fails(dtype, seed):
    x, w, ref64, abs64, dense = _case(dtype, seed)
    wrong = _sequential(x, w, dtype, "reversed").double()
    wrong[0, 0] += TERMS * torch.finfo(dtype).eps * ref64.abs().max()
    with pytest.raises(AssertionError, match="beyond the rule"):
        assert_close_to_reference(wrong.to(dtype), ref64, abs64, TERMS, dense, "K ulps off")
