"""DropBP block skipping on a tiny real BERT: same forward, no backward inside skipped blocks,
the identity gradient through them."""
import pytest
import torch

from conftest import make_model
from hf_vsa.blocks import BlockSkip, Consistency, find_blocks
from hf_vsa.policy import drop_probabilities


def batch():
    g = torch.Generator().manual_seed(0)
    return dict(input_ids=torch.randint(5, 64, (4, 12), generator=g), labels=torch.tensor([0, 1, 1, 0]))


def test_find_blocks_returns_the_encoder_layers():
    model = make_model()
    assert find_blocks(model) == list(model.bert.encoder.layer)
    assert find_blocks(torch.nn.Linear(2, 2)) == []


def test_a_skipped_block_keeps_the_forward_and_runs_no_backward():
    torch.manual_seed(0)
    model = make_model().eval()  # no dropout: two forwards are comparable bit for bit
    layers = find_blocks(model)
    skip = BlockSkip(layers)
    ref = model(**batch()).loss
    skip.skipped = {len(layers) - 1}  # the top block
    loss = model(**batch()).loss
    assert torch.equal(loss, ref)  # the value is unchanged, bit for bit
    loss.backward()
    assert all(p.grad is None for p in layers[-1].parameters())  # autograd never entered it
    assert all(p.grad is not None for p in layers[0].parameters())  # the blocks below still learn
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    assert torch.is_grad_enabled()
    skip.reset()
    model.zero_grad()
    model(**batch()).loss.backward()
    assert all(p.grad is not None for p in layers[-1].parameters())  # reset: nothing skipped


def test_the_gradient_passes_a_skipped_block_unchanged():
    model = make_model().eval()
    layers = find_blocks(model)
    seen = {}

    def grab(name):
        def hook(m, args, out):
            out.register_hook(lambda g: seen.__setitem__(name, g))  # (returns None: output unchanged)
        return hook
    BlockSkip(layers).skipped = {1}  # (its hooks run first: "out" sees the rebuilt output)
    layers[0].register_forward_hook(grab("in"))  # the skipped block's input is layer 0's output
    layers[1].register_forward_hook(grab("out"))
    model(**batch()).loss.backward()
    assert torch.equal(seen["in"], seen["out"])


def test_skipping_needs_a_block_whose_output_is_shaped_like_its_input():
    proj = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])
    skip = BlockSkip(list(proj))
    skip.skipped = {0}
    with pytest.raises(TypeError, match="not shaped like its input"):
        proj[0](torch.randn(2, 4, requires_grad=True))
    skip.reset()
    assert torch.is_grad_enabled()


def test_only_blocks_with_less_signal_per_cost_than_the_step_are_dropped_noisier_ones_more_often():
    # kappa per group (blocks, then the always-computed tensors); a = sqrt(kappa); block k is dropped
    # with probability base * (1 - a_k) where a_k < 2/3 * (the size-weighted mean of a), never elsewhere.
    k = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert drop_probabilities(k(0.04, 0.81, 0.64), 0.5, [10, 10, 10]).tolist() == pytest.approx([0.4, 0.0])
    # the same signal everywhere: a skipped backward saves 2/3 of a block's cost and loses all its progress
    assert drop_probabilities(k(0.25, 0.25, 0.25), 0.5, [10, 10, 10]).tolist() == [0.0, 0.0]
    # the sizes weigh the mean: noisy blocks beside a large clean group are dropped; beside a small
    # one, only the block well below its noisy peer
    assert drop_probabilities(k(0.04, 0.01, 0.81), 0.5, [1, 1, 100]).tolist() == pytest.approx([0.4, 0.45])
    assert drop_probabilities(k(0.04, 0.01, 0.81), 0.5, [100, 100, 1]).tolist() == pytest.approx([0.0, 0.45])
    # kappa outside [0, 1] (noisy estimates) is clamped: a negative lag-1 cosine is pure noise
    assert drop_probabilities(k(-0.3, 1.2, 1.0), 0.5, [1, 1, 1]).tolist() == pytest.approx([0.5, 0.0])


def lin(n):
    return torch.nn.Parameter(torch.zeros(n))


def test_consistency_is_the_running_cosine_of_consecutive_backprop_gradients():
    a, b, c = lin(10), lin(3), lin(5000)  # two blocks: (a, b) and (c); c is longer than the sample
    m = Consistency([[a, b], [c]], "cpu")
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(p.numel(), generator=g) for p in (a, b, c)]

    def step(t, sign=1.0, ys=None):
        for p, v in zip((a, b, c), ys or x):
            p.grad = sign * v
        m.update(t)

    step(0)
    assert m.measured == 0  # one gradient: nothing to compare yet
    step(1)  # the same gradients: cosine 1
    assert m.mean.tolist() == pytest.approx([1.0, 1.0])
    step(2, -1.0)  # reversed: cosine -1, running mean 0
    assert m.mean.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    step(4)  # step 3 ran no backward: no pair, no measurement
    assert m.measured == 2 and m.mean.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    # On the sample, a partly correlated gradient reads about its true cosine (0.6).
    y = [0.6 * v + 0.8 * torch.randn(v.numel(), generator=g) for v in x]
    y = [v * x[i].norm() / v.norm() for i, v in enumerate(y)]
    step(5, ys=y)
    measured = m.mean * 3  # the running mean of (1, -1, cos)
    truth = torch.nn.functional.cosine_similarity(y[2], x[2], dim=0)
    assert abs(measured[1].item() - truth.item()) < 0.06


def test_a_non_finite_gradient_leaves_the_consistency_as_it_was():
    a = lin(8)
    m = Consistency([[a]], "cpu")
    a.grad = torch.ones(8)
    m.update(0)
    m.update(1)
    a.grad = torch.full((8,), float("inf"))  # an fp16 overflow step
    m.update(2)
    assert m.mean.tolist() == [1.0]


def test_a_gradient_alike_on_a_few_columns_only_reads_its_true_cosine():
    # Two gradients of a 384 x 384 weight that agree on 8 evenly spaced columns and are independent
    # elsewhere: the true cosine is ~8/384. A sample taken at a fixed stride (147456 / 1024 = 144)
    # would fall on exactly those 8 columns and read 1; the random sample reads the truth.
    w = lin(384 * 384)
    m = Consistency([[w]], "cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(384, 384, generator=g), torch.randn(384, 384, generator=g)
    y[:, ::48] = x[:, ::48]
    w.grad = x.reshape(-1)
    m.update(0)
    w.grad = y.reshape(-1)
    m.update(1)
    truth = torch.nn.functional.cosine_similarity(x.reshape(-1), y.reshape(-1), dim=0).item()
    assert abs(m.mean.item() - truth) < 0.1
    assert torch.nn.functional.cosine_similarity(x.reshape(-1)[::144], y.reshape(-1)[::144], dim=0) > 0.99


def test_a_block_cosine_weighs_each_tensor_by_its_size():
    # A 90000-element matrix whose gradients are unrelated from step to step and a 300-element bias
    # whose gradient repeats: the block's cosine is ~300/90300. Unweighted, the bias would make up
    # 300 of the 1324 sampled elements and the reading would be ~0.23.
    w, b = lin(300 * 300), lin(300)
    m = Consistency([[w, b]], "cpu", seed=0)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(300, generator=g)
    for t in range(2):
        w.grad, b.grad = torch.randn(300 * 300, generator=g), bias
        m.update(t)
    assert abs(m.mean.item() - 300 / 90300) < 0.05
