"""``inplace_backward=True``: the gradient written over the logits' storage.

Same numbers as the SPEC (the float64 reference, the suite's tolerances) on
every backend and device, every scheme, dtype, reduction and layout; the
gradient that reaches the graph above the loss *is* the logits' storage when
the rows are contiguous; and autograd refuses, never miscomputes, whenever
the overwritten logits are still needed (another node saved them, a retained
graph runs twice), while leaves and distributed calls are refused up front.
"""

from __future__ import annotations

import math

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast._common import Kernel
from robustloss_fast.schemes import CCE, DM, GCE, NFL

from _backends import device_of, thin
from _cases import DTYPES, LOSSES, check_loss, dtype_id, make_problem, special_rows
from test_backends import PROBLEMS

INPLACE_ERROR = "modified by an inplace operation"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_inplace_backward_matches_the_reference(backend, loss, dtype):
    """Every loss x dtype x mode on the special-rows batch, and the shape families in rotation
    (strided and transposed layouts take the out-of-place path, which must be right too)."""
    d, modes = DTYPES.index(dtype), loss.modes
    for reduction, normalize in thin(modes, backend, 2, d):
        problem = make_problem((23, 11), dtype, backend.device, special=special_rows(loss))
        check_loss(backend, problem, loss, reduction, normalize, "special rows", inplace_backward=True)
    offset = (LOSSES.index(loss) + d) * 3
    for k, (what, shape, layout, config) in thin(list(enumerate(PROBLEMS)), backend, 2, offset):
        reduction, normalize = modes[(k + d) % len(modes)]
        problem = make_problem(shape, dtype, backend.device, config=config, layout=layout)
        check_loss(backend, problem, loss, reduction, normalize, what, inplace_backward=True)


def _graph(backend, n=9, c=13, dtype=torch.float32, scheme=None, **kw):
    """A leaf ``x``, non-leaf logits ``x * 2`` (MulBackward saves nothing), the loss, and the grad hook's record."""
    x = torch.randn(n, c, dtype=dtype, device=backend.device).requires_grad_()
    t = torch.randint(0, c, (n,), device=backend.device)
    t[2] = -100
    logits = x * 2
    seen = []
    logits.register_hook(lambda g: seen.append(g))
    loss = rf.robust_cross_entropy(logits, t, scheme or DM(), backend=backend.name, inplace_backward=True, **kw)
    return x, t, logits, loss, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_the_gradient_is_the_logits_storage(backend, dtype):
    x, t, logits, loss, seen = _graph(backend, dtype=dtype)
    ptr = logits.data_ptr()
    loss.backward()
    (g,) = seen
    assert g.data_ptr() == ptr, "the gradient was not written over the logits"
    assert torch.equal(logits.detach(), g)  # what the docs warn of: the logits now hold the gradient
    # ... and it is the right gradient: x * 2 passes 2 g down.
    x2 = x.detach().clone().requires_grad_()
    rf.robust_cross_entropy(x2 * 2, t, DM(), backend=backend.name).backward()
    torch.testing.assert_close(x.grad, x2.grad)  # the dtype's default tolerance: stats may differ in the last bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_a_step_holds_under_one_percent_of_the_logits(backend, dtype):
    """Issue #14's memory target: forward + backward of the loss on 2048 x 4096 logits allocates under 1% of
    the logits' bytes beyond what existed before (the row statistics, 48 bytes a row); the gradient that
    reaches the graph above is the logits' storage. The ordinary backward allocates a whole gradient (the
    assertion can fail)."""
    if backend.name == "torch":
        pytest.skip("the reference computes the gradient aside and copies it over the logits (documented)")
    if backend.device == "cpu" and backend.name != "cpu":
        pytest.skip(f"{backend.name} on CPU tensors runs under the Triton interpreter, which copies every "
                    "launch's tensors: its memory is not the GPU's")  # fmt: skip
    from robustloss_fast._bench import peak_cpu_bytes

    x = torch.randn(2048, 4096, dtype=torch.float32).to(dtype).to(backend.device).requires_grad_()
    t = torch.randint(0, 4096, (2048,)).to(backend.device)
    z = x + 0  # logits that are not a leaf; AddBackward passes the gradient itself up to x
    budget = 0.01 * z.numel() * z.element_size()

    def peak(inplace):
        x.grad = None

        def step():
            rf.robust_cross_entropy(z, t, DM(), backend=backend.name, inplace_backward=inplace).backward()

        if backend.device == "cpu":
            return peak_cpu_bytes(step)[0]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    ordinary = peak(False)
    assert ordinary >= z.numel() * z.element_size(), ordinary  # this measure sees a gradient's allocation
    inplace = peak(True)
    assert inplace < budget, (inplace, budget)
    assert x.grad.data_ptr() == z.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_in_place_is_bitwise_the_out_of_place_gradient(backend, dtype):
    """The same kernel writing over its input: every byte of every row equal to the ordinary backward's,
    at widths around the CPU vector lengths (8 and 16 floats: full vectors, tails, the target in a tail),
    so a store that writes past its row or a lane short shows. Two-term rows (label smoothing) and NFL's
    P-form rows included."""
    for c in (1, 7, 8, 15, 16, 17, 31, 33, 100):
        for scheme, kw in ((DM(), {}), (CCE(), {"label_smoothing": 0.1}), (NFL(), {"normalize": False})):
            x = (torch.randn(6, c, dtype=torch.float64) * 4).to(dtype).to(backend.device)
            t = torch.randint(0, c, (6,), device=backend.device)
            t[0], t[3] = c - 1, -100
            grads = []
            for inplace in (False, True):
                leaf = x.clone().requires_grad_()
                rf.robust_cross_entropy(leaf * 1, t, scheme, backend=backend.name, inplace_backward=inplace, **kw).backward()
                grads.append(leaf.grad)
            assert torch.equal(grads[0].view(torch.uint8), grads[1].view(torch.uint8)), (c, scheme, kw)


def test_strided_logits_keep_their_values(backend):
    """A slice of a wider tensor has no contiguous block to write into: out-of-place, logits untouched."""
    x = torch.randn(9, 20, device=backend.device).requires_grad_()
    t = torch.randint(0, 13, (9,), device=backend.device)
    wide = x * 2
    logits = wide[:, :13]
    before = logits.detach().clone()
    seen = []
    logits.register_hook(lambda g: seen.append(g))
    rf.robust_cross_entropy(logits, t, GCE(), backend=backend.name, inplace_backward=True).backward()
    assert seen[0].data_ptr() != logits.data_ptr()
    assert torch.equal(logits.detach(), before)
    x2 = x.detach().clone().requires_grad_()
    rf.robust_cross_entropy((x2 * 2)[:, :13], t, GCE(), backend=backend.name).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_a_node_that_saved_the_logits_is_refused(backend):
    """tanh saves its output, the logits: its backward runs after the loss's and must not read gradients."""
    x = torch.randn(7, 5, device=backend.device).requires_grad_()
    t = torch.randint(0, 5, (7,), device=backend.device)
    logits = torch.tanh(x) * 1  # still fine: MulBackward by a number saves nothing ...
    rf.robust_cross_entropy(logits, t, CCE(), backend=backend.name, inplace_backward=True).backward()
    logits = torch.tanh(x)  # ... but here the loss's logits are tanh's saved output
    loss = rf.robust_cross_entropy(logits, t, CCE(), backend=backend.name, inplace_backward=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_saved_tensor_hooks_take_the_ordinary_backward(backend):
    """Hooks switch autograd's version check off: under them the option must not write in place."""
    x = torch.randn(7, 5, device=backend.device).requires_grad_()
    t = torch.randint(0, 5, (7,), device=backend.device)
    with torch.autograd.graph.save_on_cpu():
        logits = torch.tanh(x)  # saved by tanh under the hooks: no version check would catch a write
        loss = rf.robust_cross_entropy(logits, t, CCE(), backend=backend.name, inplace_backward=True)
    before = logits.detach().clone()
    loss.backward()
    assert torch.equal(logits.detach(), before)
    x2 = x.detach().clone().requires_grad_()
    rf.robust_cross_entropy(torch.tanh(x2), t, CCE(), backend=backend.name).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_an_ignored_rows_nan_sample_weight_is_not_read(backend):
    """The normalised mean through the cross-row step of the in-place path: finite, as the default's."""
    x = torch.randn(6, 4, device=backend.device).requires_grad_()
    t = torch.tensor([0, 1, -100, 3, 2, 1], device=backend.device)
    sw = torch.tensor([1.0, 0.5, math.nan, 2.0, 1.0, 0.3], device=backend.device)
    got = rf.robust_cross_entropy(x * 1, t, DM(), sample_weight=sw, backend=backend.name, inplace_backward=True)
    want = rf.robust_cross_entropy(x * 1, t, DM(), sample_weight=sw, backend=backend.name)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)


def test_a_second_backward_through_a_retained_graph_is_refused(backend):
    x, t, logits, loss, _ = _graph(backend, scheme=NFL(gamma=2.0), normalize=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_leaves_and_distributed_calls_are_refused(backend):
    x = torch.randn(4, 3, device=backend.device).requires_grad_()
    t = torch.randint(0, 3, (4,), device=backend.device)
    with pytest.raises(ValueError, match="leaf"):
        rf.robust_cross_entropy(x, t, DM(), backend=backend.name, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf"):  # a view of one shares its storage
        rf.robust_cross_entropy(x.view(4, 3), t, DM(), backend=backend.name, inplace_backward=True)
    with pytest.raises(ValueError, match="process_group or vocab_parallel"):
        rf.robust_cross_entropy(x * 1, t, DM(), backend=backend.name, inplace_backward=True, vocab_parallel=True)
    # A leaf that needs no gradient is just an input: nothing is written, the value is the default's.
    z = x.detach()
    got = rf.robust_cross_entropy(z, t, DM(), backend=backend.name, inplace_backward=True)
    torch.testing.assert_close(got, rf.robust_cross_entropy(z, t, DM(), backend=backend.name))


def test_module_passes_the_option():
    loss_fn = rf.RobustCrossEntropyLoss(DM(), inplace_backward=True)
    assert "inplace_backward=True" in repr(loss_fn)
    x = torch.randn(6, 4, requires_grad=True)
    logits = x + 0
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    loss_fn(logits, torch.randint(0, 4, (6,))).backward()
    assert seen == [logits.data_ptr()]


def test_under_torch_compile_the_ordinary_backward_runs():
    """Inductor plans its own buffers: the compiled step matches eager and leaves its input alone."""
    torch._dynamo.reset()

    def step(x, t):
        return rf.robust_cross_entropy(x * 2, t, DM(), inplace_backward=True)

    x = torch.randn(8, 6, requires_grad=True)
    t = torch.randint(0, 6, (8,))
    value = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t)
    (grad,) = torch.autograd.grad(value, x)
    x2 = x.detach().clone().requires_grad_()
    expected = step(x2, t)
    (expected_grad,) = torch.autograd.grad(expected, x2)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_triton_inplace_op_passes_opcheck():
    """The Triton twin declares its write (``mutates_args``) and its fake kernel agrees with it."""
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable here: {reason}")
    device = device_of("triton")
    x = torch.randn(6, 9, device=device)
    t = torch.randint(0, 9, (6,), device=device)
    t[1] = -100
    dm = int(Kernel.DM)
    _, stats = torch.ops.robustloss.triton_forward(x, t, dm, 1.0, 8.0, None, None, -100, 1, True)
    grad = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.robustloss.triton_backward_.default, (x.clone(), grad, t, stats, None, -100, dm, 1.0))
