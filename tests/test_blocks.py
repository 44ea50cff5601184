"""DropBP block skipping on a tiny real BERT: same forward, no backward inside skipped blocks,
the identity gradient through them."""
import pytest
import torch

from conftest import make_model
from hf_vsa.blocks import BlockSkip, find_blocks


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
