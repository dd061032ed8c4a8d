"""Every bad input raises a clear error naming the argument, through the extension and the reference."""
import pytest
import torch

from robust_ext import ops

X = torch.rand(4, 3, 5, 5)


def err(match):
    return pytest.raises((RuntimeError, TypeError, ValueError), match=match)


@pytest.mark.usefixtures("impl")
class TestBadInput:
    def test_shape_mismatch(self):
        with err("grad must have the same shape as x"):
            ops.linf_step(X.clone(), torch.rand(4, 3, 5, 4), X, 0.1, 0.1)
        with err("x_adv must have the same shape as x"):
            ops.linf_project(torch.rand(3, 3, 5, 5), X, 0.1)

    def test_dtype_mismatch(self):
        with err("grad must have the same dtype as x"):
            ops.linf_step(X.clone(), X.double(), X, 0.1, 0.1)
        with err("x_adv must have the same dtype as x"):
            ops.linf_step_(X.half(), X, X, 0.1, 0.1)

    def test_integer_tensors(self):
        xi = torch.randint(0, 255, (4, 3, 5, 5), dtype=torch.uint8)
        with err("x must be float32, float64, float16 or bfloat16"):
            ops.fgsm(xi, xi, 0.1)
        with err("x must be float32, float64, float16 or bfloat16"):
            ops.linf_random_init(xi.int(), 0.1)
        with err("eps as a tensor must be float32, float64, float16 or bfloat16"):
            ops.linf_step(X, X, X, 0.1, torch.ones(4, dtype=torch.int64))
        with err("alpha as a tensor must be float32, float64, float16 or bfloat16"):
            ops.linf_step(X, X, X, torch.ones(4).to(torch.float8_e4m3fn), 0.1)

    def test_negative_or_nan_eps(self):
        with err("eps must be >= 0"):
            ops.linf_step(X, X, X, 0.1, -0.1)
        with err("eps must not be NaN"):
            ops.linf_project(X, X, float("nan"))
        with err("eps must be >= 0 and not NaN for every sample"):
            ops.fgsm(X, X, torch.tensor([0.1, -0.1, 0.1, 0.1]))
        with err("eps must be >= 0 and not NaN for every sample"):
            ops.linf_random_init(X, torch.tensor([0.1, float("nan"), 0.1, 0.1]))
        with err("alpha must not be NaN"):
            ops.linf_step(X, X, X, float("nan"), 0.1)

    def test_bounds(self):
        with err("clip_min must be <= clip_max"):
            ops.linf_step(X, X, X, 0.1, 0.1, 1.0, 0.0)
        with err("clip_min and clip_max must not be NaN"):
            ops.fgsm(X, X, 0.1, float("nan"), 1.0)

    def test_per_sample_length_and_rank(self):
        with err(r"eps as a tensor must be 1-D with one value per sample \(4\), got shape \[3\]"):
            ops.linf_step(X, X, X, 0.1, torch.full((3,), 0.1))
        with err(r"alpha as a tensor must be 1-D with one value per sample \(4\)"):
            ops.linf_step(X, X, X, torch.full((4, 1), 0.1), 0.1)
        with err("x needs a batch dimension"):
            ops.fgsm(torch.tensor(0.5), torch.tensor(1.0), torch.tensor([0.1]))

    def test_python_types(self):
        with err("eps must be a float or a tensor"):
            ops.linf_step(X, X, X, 0.1, "0.1")
        with err("clip_max must be a float"):
            ops.linf_project(X, X, 0.1, 0.0, None)
        with err("x must be a torch.Tensor"):
            ops.fgsm([1.0], X, 0.1)
        with err("generator must be a torch.Generator"):
            ops.linf_random_init(X, 0.1, generator=123)

    def test_inplace_on_leaf_requiring_grad(self):
        leaf = X.clone().requires_grad_(True)
        with err("x_adv requires grad, but robust_ext ops are not differentiable"):
            ops.linf_step_(leaf, X, X, 0.1, 0.1)
        with err("x_adv requires grad, but robust_ext ops are not differentiable"):
            ops.linf_project_(leaf, X, 0.1)
        with torch.no_grad():  # allowed, as for any in-place update of a leaf
            ops.linf_step_(leaf, X, X, 0.1, 0.1)

    def test_no_silent_gradients(self):
        """The ops have no derivative: inputs autograd would track are refused, not silently dropped."""
        w = X.clone().requires_grad_(True)
        with err("x_adv requires grad, but robust_ext ops are not differentiable"):
            ops.linf_step_(w * 1.0, X, X, 0.1, 0.1)  # a non-leaf: autograd would keep MulBackward
        with err("x requires grad, but robust_ext ops are not differentiable"):
            ops.linf_project(X, w, 0.1)
        with err("grad requires grad"):
            ops.fgsm(X, w, 0.1)
        with err("eps requires grad"):
            ops.linf_step(X, X, X, 0.1, torch.full((4,), 0.1, requires_grad=True))
        with torch.no_grad():
            ops.linf_random_init(w, 0.1)

    def test_overlapping_output(self):
        with err("more than one element of the written-to tensor refers to a single memory location"):
            ops.linf_step_(torch.rand(1, 3, 5, 5).expand(4, 3, 5, 5), X, X, 0.1, 0.1)


def test_partial_overlap_is_refused(impl):
    buf = torch.rand(200)
    for call in (lambda: ops.linf_step_(buf[1:101], buf[0:100], buf[100:200], 0.1, 0.1),
                 lambda: ops.linf_step_(buf[0:100], buf[1:101], buf[100:200], 0.1, 0.1),
                 lambda: ops.linf_project_(buf[50:150], buf[0:100], 0.1),
                 # the same bytes in another order (ATen: same range, other strides -> partial)
                 lambda: ops.linf_project_(buf[:100].view(10, 10), buf[:100].view(10, 10).t(), 0.1)):
        with pytest.raises(RuntimeError, match="unsupported operation: some elements of the input tensor and the "
                                               "written-to tensor refer to a single memory location"):
            call()
    # the same view as an input, or a disjoint one, is fine
    before = buf.clone()
    ops.linf_step_(buf[0:100], buf[0:100], buf[100:200], 0.1, 0.1)
    assert not torch.equal(buf, before)


def test_partial_overlap_of_strided_views_reads_inputs_first():
    """Non-dense views go through copies, so overlapping ones still read every input before writing."""
    buf = torch.rand(2, 101)
    x_adv, grad, x = buf[:, 1:51], buf[:, 0:50], buf[:, 51:101]
    expected = ops.reference.linf_step(x_adv.clone(), grad.clone(), x.clone(), 0.1, 0.05, 0.0, 1.0)
    ops.linf_step_(x_adv, grad, x, 0.1, 0.05)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a GPU")
def test_device_mismatch():
    with err("grad must be on the same device as x"):
        ops.linf_step(X.cuda(), X, X.cuda(), 0.1, 0.1)
    with err("eps must be on the same device as x"):
        ops.linf_step(X.cuda(), X.cuda(), X.cuda(), 0.1, torch.full((4,), 0.1))


@pytest.mark.usefixtures("impl")
class TestBadInputL2:
    """The L2 ops share the L-inf ops' checks and messages (csrc/ball_ops.h, reference._check_*)."""

    def test_shapes_dtypes_budgets(self):
        with err("grad must have the same shape as x"):
            ops.l2_step(X.clone(), torch.rand(4, 3, 5, 4), X, 0.1, 0.1)
        with err("x_adv must have the same dtype as x"):
            ops.l2_project_(X.double(), X, 0.1)
        with err("eps must be >= 0"):
            ops.fgm(X, X, -0.1)
        with err("alpha must not be NaN"):
            ops.l2_step_(X.clone(), X, X, float("nan"), 0.1)
        with err("eps must be >= 0 and not NaN for every sample"):
            ops.l2_random_init(X, torch.tensor([0.1, float("nan"), 0.1, 0.1]))
        with err(r"eps as a tensor must be 1-D with one value per sample \(4\), got shape \[3\]"):
            ops.l2_step(X, X, X, 0.1, torch.full((3,), 0.1))
        with err("clip_min must be <= clip_max"):
            ops.l2_project(X, X, 0.1, 1.0, 0.0)
        with err("x must be float32, float64, float16 or bfloat16"):
            ops.fgm(X.int(), X.int(), 0.1)
        with err("generator must be a torch.Generator"):
            ops.l2_random_init(X, 0.1, generator=1)

    def test_no_grad_and_overlap(self):
        leaf = X.clone().requires_grad_(True)
        with err("x_adv requires grad, but robust_ext ops are not differentiable"):
            ops.l2_step_(leaf, X, X, 0.1, 0.1)
        with err("more than one element of the written-to tensor refers to a single memory location"):
            ops.l2_project_(torch.rand(1, 3, 5, 5).expand(4, 3, 5, 5), X, 0.1)
        buf = torch.rand(200)
        with pytest.raises(RuntimeError, match="some elements of the input tensor and the written-to tensor"):
            ops.l2_step_(buf[1:101], buf[0:100], buf[100:200], 0.1, 0.1)
