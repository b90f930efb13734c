import torch

from pipeline.config import ModelConfig
from pipeline.model import EnergyNet, count_parameters, frozen


def test_output_shape_and_parameter_count():
    model = EnergyNet.from_config(ModelConfig())
    scores = model(torch.zeros(5, 1, 32, 32))
    assert scores.shape == (5,)
    # conv 416 + 4,640 + 18,496 + 36,928, dense 16,448 + 65: the book's ~77k
    assert count_parameters(model) == 76_993


def test_frozen_restores_requires_grad():
    model = EnergyNet()
    with frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
        x = torch.zeros(2, 1, 32, 32, requires_grad=True)
        model(x).sum().backward()
        assert x.grad is not None
        assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
