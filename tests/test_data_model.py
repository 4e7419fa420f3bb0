import math

import pytest
import torch

from train import CODE_MAX, SumSignDataset, SumSignModel


def test_labels_say_whether_the_features_sum_above_zero():
    data = SumSignDataset(3000, 32, seed=0, split="train")
    x, y = data.__getitems__(list(range(len(data))))
    assert x.shape == (3000, 32) and y.shape == (3000,)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, (x.double().sum(1) > 0).float())
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < y.mean() < 0.6
    # uniform on [-1, 1]: mean 0, variance 1/3 (plus 1/(3*127) from the 255-point grid)
    assert abs(x.mean()) < 0.01
    assert x.var().item() == pytest.approx((1 + 1 / CODE_MAX) / 3, rel=0.02)


def test_batch_fetch_matches_single_samples():
    data = SumSignDataset(100, 16, seed=1, split="val")
    xb, yb = data.__getitems__([5, 0, 99])
    for row, i in enumerate([5, 0, 99]):
        x, y = data[i]
        assert torch.equal(xb[row], x) and yb[row] == y


def test_each_split_is_a_pure_function_of_seed_and_split():
    a = SumSignDataset(500, 24, seed=7, split="train")
    b = SumSignDataset(500, 24, seed=7, split="train")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.labels, b.labels)
    torch.manual_seed(123)  # the global RNG has no say
    c = SumSignDataset(500, 24, seed=7, split="train")
    assert torch.equal(a.codes, c.codes)
    val = SumSignDataset(500, 24, seed=7, split="val")
    other_seed = SumSignDataset(500, 24, seed=8, split="train")
    assert not torch.equal(a.codes, val.codes)
    assert not torch.equal(a.codes, other_seed.codes)
    # a shorter split is a prefix of a longer one drawn with the same seed
    assert torch.equal(SumSignDataset(300, 24, seed=7, split="train").codes, a.codes[:300])


def test_model_shapes_and_outputs():
    model = SumSignModel(features=40, hidden=8, lr=1e-3, batch_size=4)
    assert model.hidden.weight.shape == (8, 40) and model.out.weight.shape == (1, 8)
    assert model.hparams.lr == 1e-3 and model.hparams.batch_size == 4
    x = torch.rand(4, 40) * 2 - 1
    p = model(x)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()
    assert torch.allclose(p, torch.sigmoid(model.logits(x)))
    # both layers are linear: the network is one affine map
    w = (model.out.weight @ model.hidden.weight).squeeze(0)
    b = model.out.weight @ model.hidden.bias + model.out.bias
    assert torch.allclose(model.logits(x), x @ w + b, atol=1e-5)


def test_loss_is_finite_where_sigmoid_saturates():
    model = SumSignModel(features=4, hidden=2)
    with torch.no_grad():
        model.hidden.weight.fill_(1e4)
    x = torch.ones(2, 4)
    y = torch.tensor([0.0, 1.0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits(x), y)
    assert math.isfinite(loss.item()) and loss.item() > 1e3
