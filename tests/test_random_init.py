"""linf_random_init: Philox known answers, bit-exact with the reference, reproducible by seed, the
same for any thread count and layout, inside the ball, uniform."""
import numpy as np
import pytest
import scipy.stats
import torch

from robust_ext import ops, reference
from _cases import DTYPES, layout

M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox_py(ctr, key, rounds=10):
    """Philox4x32 on Python ints, written from Salmon et al. (SC'11), independent of the package."""
    c, k = list(ctr), list(key)
    for _ in range(rounds):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & MASK, p1 & MASK, ((p0 >> 32) ^ c[3] ^ k[1]) & MASK, p0 & MASK]
        k = [(k[0] + W0) & MASK, (k[1] + W1) & MASK]
    return c


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    assert philox_py([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox_py([MASK] * 4, [MASK] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox_py([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed", [0, 1, 0x0123456789ABCDEF, -5])
def test_words_match_independent_philox(seed):
    """The element -> (counter, word) mapping and the words, via float64 (which keeps all 32 bits)."""
    n = 200
    out = ops._IMPL["cpu"].linf_random_init(torch.zeros(n, dtype=torch.float64), 1.0, -1.0, 1.0,
                                            torch.tensor(seed))
    words = (out * 2**31 + 2**31).to(torch.int64).tolist()
    key = seed & (2**64 - 1)
    for i in range(n):
        counter = (i // 64) * 16 + i % 16
        expected = philox_py([counter & MASK, counter >> 32, 0, 0], [key & MASK, key >> 32])[(i // 16) % 4]
        assert words[i] == expected, i
    assert torch.equal(reference.linf_random_init(torch.zeros(n, dtype=torch.float64), 1.0, -1.0, 1.0,
                                                  torch.tensor(seed)), out)


@pytest.mark.needs_extension
@pytest.mark.parametrize("lay", ["contiguous", "channels_last", "strided", "batch_inner"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_in_every_layout(dtype, lay):
    x = layout(torch.rand(3, 4, 13, 7).to(dtype), lay)
    eps = torch.tensor([0.0, 0.1, 0.5])
    seed = torch.tensor(987654321)
    for e in (0.03, eps):
        e_f, e_t = (e, None) if isinstance(e, float) else (0.0, e)
        out = torch.ops.robust_ext.linf_random_init(x, e_f, 0.0, 1.0, seed, e_t)
        ref = reference.linf_random_init(x, e_f, 0.0, 1.0, seed, e_t)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        # the noise belongs to the logical element, whatever the layout
        same = torch.ops.robust_ext.linf_random_init(x.contiguous(), e_f, 0.0, 1.0, seed, e_t)
        torch.testing.assert_close(out, same, rtol=0, atol=0)
        assert out.stride() == torch.empty_like(x).stride()


def test_reproducible_by_seed_and_generator():
    x = torch.rand(16, 3, 8, 8)
    torch.manual_seed(7)
    a = ops.linf_random_init(x, 0.1)
    b = ops.linf_random_init(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(ops.linf_random_init(x, 0.1), a)
    assert not torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ops.linf_random_init(x, 0.1, generator=g1), ops.linf_random_init(x, 0.1, generator=g2))
    assert not torch.equal(ops.linf_random_init(x, 0.1, generator=torch.Generator().manual_seed(4)),
                           ops.linf_random_init(x, 0.1, generator=torch.Generator().manual_seed(3)))


def test_thread_count_independent():
    x = torch.rand(64, 3, 32, 32)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(ops.linf_random_init(x, 0.05, generator=torch.Generator().manual_seed(11)))
    torch.set_num_threads(2)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inside_ball_and_bounds(dtype):
    x = (0.05 + 0.9 * torch.rand(32, 3, 16, 16)).to(dtype)  # inside the bounds: clipping only moves closer
    eps = torch.linspace(0.0, 0.4, 32)
    out = ops.linf_random_init(x, eps, 0.05, 0.95)
    dist = (out.double() - x.double()).abs().amax(dim=(1, 2, 3))
    tol = torch.finfo(dtype).eps * 2
    assert (dist <= eps.double() + tol).all()
    assert out.min() >= 0.05 and out.max() <= 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform(dtype):
    """Away from the bounds the noise is U(-eps, eps): KS test, mean, and no two equal neighbours."""
    n = 200_000
    x = torch.full((n,), 0.5, dtype=dtype)
    u = ((ops.linf_random_init(x, 0.25, generator=torch.Generator().manual_seed(5)) - x) / 0.25).double().numpy()
    assert scipy.stats.kstest(u, "uniform", args=(-1, 2)).pvalue > 1e-3
    assert abs(u.mean()) < 4 * (1 / np.sqrt(3)) / np.sqrt(n)
    # per-block structure must not leak: words of one counter are independent
    blocks = u[: n // 64 * 64].reshape(-1, 4, 16)
    assert abs(np.corrcoef(blocks[:, 0, :].ravel(), blocks[:, 1, :].ravel())[0, 1]) < 0.02
    counts, _ = np.histogram(u, bins=20, range=(-1, 1))
    assert scipy.stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.slow  # > 2**31 elements, 8 GB (the suite's peak memory)
@pytest.mark.needs_extension
def test_64bit_indexing_and_per_sample():
    """More than 2**31 elements: per-sample budgets and Philox counters past 32-bit indices."""
    half = 2**30 + 64
    x = torch.zeros(2, half, dtype=torch.bfloat16)
    seed = torch.tensor(42)
    out = torch.ops.robust_ext.linf_random_init(x, 0.0, -1.0, 1.0, seed, torch.tensor([0.5, 0.25]))
    for i in (half - 3, 2 * half - 1, 2 * half - 70):
        counter = (i // 64) * 16 + i % 16
        word = philox_py([counter & MASK, counter >> 32, 0, 0], [42, 0])[(i // 16) % 4]
        u = ((word >> 8) - 2**23) * 2.0**-23
        eps = 0.5 if i < half else 0.25
        expected = torch.tensor(eps * u, dtype=torch.float32).to(torch.bfloat16)
        assert out.view(-1)[i] == expected, i
    # aminmax: no 2 GB temporaries beside the two 4 GB tensors (the suite's peak memory)
    lo0, hi0 = torch.aminmax(out[0])
    lo1, hi1 = torch.aminmax(out[1])
    assert max(-lo0, hi0) <= 0.5 and max(-lo1, hi1) <= 0.25
    assert max(-lo1, hi1) > 0.24
