"""The losses of recbole_mamba.nn.losses against plain, obviously-correct twins (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from recbole_mamba.nn import losses


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def random_problem(n_positions=37, n_items=23, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_positions, dim, generator=g, dtype=dtype)
    weight = torch.randn(n_items, dim, generator=g, dtype=dtype)
    targets = torch.randint(0, n_items, (n_positions,), generator=g)
    return hidden, weight, targets


# Full-softmax cross entropy in chunks ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 1000])
def test_chunked_cross_entropy_equals_plain_cross_entropy(chunk_size):
    hidden, weight, targets = random_problem()
    h, w = leaves(hidden, weight)
    h_ref, w_ref = leaves(hidden, weight)
    loss = losses.chunked_cross_entropy(h, w, targets, chunk_size)
    loss_ref = F.cross_entropy(h_ref @ w_ref.t(), targets)  # the plain twin: every logit at once
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    (2.5 * loss).backward()  # an upstream gradient other than 1 must be honoured
    (2.5 * loss_ref).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_chunked_cross_entropy_keeps_no_logits_for_backward():
    # What autograd keeps between forward and backward: a plain (or autograd-chunked) cross
    # entropy keeps all N x n_items logits; the chunked Function keeps inputs and one number per position.
    n_positions, n_items, dim = 64, 500, 8
    hidden, weight, targets = random_problem(n_positions, n_items, dim, dtype=torch.float32)

    def saved_elements(loss_fn):
        h, w = leaves(hidden, weight)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss_fn(h, w)
        return sum(saved)

    plain = saved_elements(lambda h, w: F.cross_entropy(h @ w.t(), targets))
    chunked = saved_elements(lambda h, w: losses.chunked_cross_entropy(h, w, targets, 16))
    assert plain >= n_positions * n_items  # the hook does see the logits of the plain loss
    # the hook sees the Function's saved tensors too: hidden, weight, targets, log-sum-exp
    assert 0 < chunked <= n_positions * dim + n_items * dim + 2 * n_positions


def test_chunked_cross_entropy_computes_in_float32_under_autocast():
    hidden, weight, targets = random_problem(dtype=torch.float32)
    expected = F.cross_entropy(hidden @ weight.t(), targets)
    h, w = leaves(hidden.bfloat16(), weight.bfloat16())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = losses.chunked_cross_entropy(h, w, targets, 8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # only the inputs' rounding to bfloat16 differs from the float32 loss
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)


def test_chunked_cross_entropy_without_grad_gives_the_value_and_no_gradient():
    hidden, weight, targets = random_problem()
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        loss = losses.chunked_cross_entropy(h, w, targets, 5)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), targets), rtol=1e-12, atol=1e-12)
    assert not loss.requires_grad


def test_liger_ce_kernel_is_refused_where_it_cannot_run():
    hidden, weight, targets = random_problem(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="runs on CUDA GPUs only"):
        losses.chunked_cross_entropy(hidden, weight, targets, 8, kernel="liger")
    with pytest.raises(ValueError, match="kernel must be one of"):
        losses.chunked_cross_entropy(hidden, weight, targets, 8, kernel="fast")


needs_liger = pytest.mark.skipif(
    not torch.cuda.is_available() or losses.liger_cross_entropy_missing("cuda") is not None,
    reason="needs a CUDA GPU and liger-kernel")


@needs_liger
@pytest.mark.parametrize("n_positions, n_items, chunk_size", [(1, 50, 4096), (1000, 3707, 64), (20000, 5000, 4096)])
def test_liger_ce_kernel_equals_the_torch_one_on_a_gpu(n_positions, n_items, chunk_size):
    # The fast path (Liger's fused Triton kernel) against the PyTorch chunks, float32, TF32 off.
    hidden, weight, targets = random_problem(n_positions, n_items, 64, dtype=torch.float32)
    hidden, weight, targets = hidden.cuda(), (weight * 0.1).cuda(), targets.cuda()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        results = {}
        for kernel in ("torch", "liger"):
            h, w = leaves(hidden, weight)
            loss = losses.chunked_cross_entropy(h, w, targets, chunk_size, kernel=kernel)
            (3.0 * loss).backward()
            results[kernel] = loss, h.grad, w.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for fast, slow in zip(results["liger"], results["torch"]):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))


@needs_liger
def test_liger_ce_kernel_under_bf16_autocast_computes_in_float32():
    hidden, weight, targets = random_problem(300, 500, 64, dtype=torch.float32)
    h, w = leaves(hidden.cuda().bfloat16(), weight.cuda().bfloat16())
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        loss = losses.chunked_cross_entropy(h, w, targets.cuda(), 64, kernel="liger")
    loss.backward()
    expected = F.cross_entropy(h.float() @ w.float().t(), targets.cuda())
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


# Pairwise losses with sampled negatives -----------------------------------------------------------


def scored_negatives(seed=1, n_positions=9, k=3, n_items=6):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(n_positions, generator=g, dtype=torch.float64)
    neg = torch.randn(n_positions, k, generator=g, dtype=torch.float64)
    targets = torch.randint(1, n_items, (n_positions,), generator=g)
    negatives = torch.randint(1, n_items, (n_positions, k), generator=g)
    assert (negatives == targets[:, None]).any(), "the problem should include accidental hits"
    return pos, neg, targets, negatives


def test_bpr_loss_equals_a_loop_over_valid_pairs():
    pos, neg, targets, negatives = scored_negatives()
    valid = negatives != targets[:, None]
    pairs = [
        -math.log(1e-10 + 1 / (1 + math.exp(-(pos[i] - neg[i, j]).item())))
        for i in range(len(pos))
        for j in range(neg.size(1))
        if negatives[i, j] != targets[i]
    ]
    torch.testing.assert_close(losses.bpr_loss(pos, neg, valid).item(), sum(pairs) / len(pairs))


def test_bpr_loss_with_one_negative_is_recboles_bpr():
    from recbole.model.loss import BPRLoss

    pos, neg, _, _ = scored_negatives(k=1)
    torch.testing.assert_close(losses.bpr_loss(pos, neg, torch.ones_like(neg, dtype=torch.bool)), BPRLoss()(pos, neg[:, 0]))


def test_bce_loss_equals_a_loop_over_positions():
    pos, neg, targets, negatives = scored_negatives()
    valid = negatives != targets[:, None]

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    per_position = []
    for i in range(len(pos)):
        loss = -log_sigmoid(pos[i].item())
        loss -= sum(log_sigmoid(-neg[i, j].item()) for j in range(neg.size(1)) if negatives[i, j] != targets[i])
        per_position.append(loss)
    torch.testing.assert_close(losses.bce_loss(pos, neg, valid).item(), sum(per_position) / len(per_position))


# Sampled softmax -----------------------------------------------------------------------------------


def sampled_softmax_loop(pos, neg, targets, negatives, log_q_pos=None, log_q_neg=None):
    per_position = []
    for i in range(len(pos)):
        target_logit = pos[i].item() - (0.0 if log_q_pos is None else log_q_pos[i].item())
        logits = [target_logit]
        for j in range(len(negatives)):
            if negatives[j] != targets[i]:
                logits.append(neg[i, j].item() - (0.0 if log_q_neg is None else log_q_neg[j].item()))
        log_sum = math.log(sum(math.exp(x) for x in logits))
        per_position.append(log_sum - target_logit)
    return sum(per_position) / len(per_position)


@pytest.mark.parametrize("with_log_q", [False, True])
def test_sampled_softmax_equals_a_loop(with_log_q):
    g = torch.Generator().manual_seed(3)
    n_positions, k, n_items = 8, 5, 7
    pos = torch.randn(n_positions, generator=g, dtype=torch.float64)
    neg = torch.randn(n_positions, k, generator=g, dtype=torch.float64)
    targets = torch.randint(1, n_items, (n_positions,), generator=g)
    negatives = torch.randint(1, n_items, (k,), generator=g)
    assert (negatives[None, :] == targets[:, None]).any()
    log_q = {}
    if with_log_q:
        log_q = {"log_q_pos": -torch.rand(n_positions, generator=g, dtype=torch.float64) * 3,
                 "log_q_neg": -torch.rand(k, generator=g, dtype=torch.float64) * 3}
    value = losses.sampled_softmax_loss(pos, neg, targets, negatives, **log_q)
    torch.testing.assert_close(value.item(), sampled_softmax_loop(pos, neg, targets, negatives, **log_q))


def test_log_q_correction_makes_popularity_sampled_softmax_estimate_the_full_softmax():
    # One position, 20 items, negatives drawn with skewed probabilities q. With the logQ correction
    # the sampled softmax's gradient with respect to the item scores approaches the full softmax's
    # (softmax - one-hot, up to a constant factor on the negatives' side); without it, popular
    # items are pushed down too hard.
    g = torch.Generator().manual_seed(0)
    n_items, k = 20, 20000
    q = torch.linspace(1, 30, n_items, dtype=torch.float64)
    q /= q.sum()
    scores = torch.randn(n_items, generator=g, dtype=torch.float64)
    target = torch.tensor([3])
    negatives = torch.multinomial(q, k, replacement=True, generator=g)
    full = torch.softmax(scores, dim=0)

    def negative_side_gradient(correct):
        s = scores.clone().requires_grad_()
        log_q = {"log_q_pos": q.log()[target], "log_q_neg": q.log()[negatives]} if correct else {}
        loss = losses.sampled_softmax_loss(s[target], s[negatives][None, :], target, negatives, **log_q)
        loss.backward()
        grad = s.grad.clone()
        grad[target] = 0  # compare where the items act as negatives
        return grad / grad.sum()

    expected = full.clone()
    expected[target] = 0
    expected /= expected.sum()
    corrected, uncorrected = negative_side_gradient(True), negative_side_gradient(False)
    assert (corrected - expected).abs().max() < 0.01
    assert (uncorrected - expected).abs().max() > 0.05


def test_in_batch_log_q_is_each_items_share_of_the_targets():
    targets = torch.tensor([4, 4, 2, 4, 7, 2])
    items = torch.tensor([2, 4, 7])
    expected = torch.tensor([math.log(2 / 6), math.log(3 / 6), math.log(1 / 6)])
    torch.testing.assert_close(losses.in_batch_log_q(targets, items, n_items=9), expected)


# Negative sampling -----------------------------------------------------------------------------------


def test_uniform_negatives_are_real_items():
    targets = torch.tensor([1, 2, 3])
    g = torch.Generator().manual_seed(0)
    drawn = losses.sample_negatives(targets, (5000,), n_items=6, how="uniform", generator=g)
    assert set(drawn.tolist()) == {1, 2, 3, 4, 5}  # never the padding id 0, every real item


def test_in_batch_negatives_are_targets_of_the_batch_with_their_frequency():
    targets = torch.tensor([7, 7, 7, 9])
    g = torch.Generator().manual_seed(0)
    drawn = losses.sample_negatives(targets, (4000, 2), n_items=10, how="in_batch", generator=g)
    assert drawn.shape == (4000, 2) and set(drawn.unique().tolist()) == {7, 9}
    assert abs((drawn == 7).double().mean().item() - 0.75) < 0.03
