import pytest
import torch

from pipeline.figures import image_grid, to_unit


@pytest.mark.parametrize("n, nrow", [(7, 3), (12, 4), (2, 10)])
def test_image_grid_is_torchvisions_make_grid(n, nrow):
    from torchvision.utils import make_grid

    images = torch.rand(n, 1, 5, 4, generator=torch.Generator().manual_seed(n)) * 2 - 1
    expected = make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)[0].numpy()
    grid = image_grid(images, nrow=nrow)
    assert grid.shape == expected.shape
    assert (grid == expected).all()


def test_one_image_keeps_its_border():  # (make_grid returns a single image unpadded)
    grid = image_grid(torch.full((1, 1, 5, 4), -1.0))
    assert grid.shape == (9, 8)
    assert grid[2:7, 2:6].max() == 0.0 and grid.sum() == grid.size - 20
