import torch

from pipeline.buffer import ReplayBuffer


def test_fresh_noise_share_is_binomial():
    buf = ReplayBuffer(256, (1, 4, 4), reinit_prob=0.05)
    buf.push(torch.full((256, 1, 4, 4), 5.0))  # impossible pixel value marks stored images
    g = torch.Generator().manual_seed(0)
    fresh = 0
    draws, n = 200, 128
    for _ in range(draws):
        x = buf.sample(n, g)
        fresh += int((x[:, 0, 0, 0] != 5.0).sum())
    share = fresh / (draws * n)
    # Binomial(25,600, 0.05): sd of the share is 0.0014
    assert abs(share - 0.05) < 0.006


def test_fresh_draws_are_uniform_noise_in_range():
    buf = ReplayBuffer(16, (1, 8, 8), reinit_prob=1.0)
    buf.push(torch.full((16, 1, 8, 8), 5.0))
    x = buf.sample(64, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1
    assert abs(x.mean().item()) < 0.05


def test_empty_buffer_gives_noise():
    buf = ReplayBuffer(16, (1, 2, 2), reinit_prob=0.0)
    x = buf.sample(8)
    assert x.shape == (8, 1, 2, 2) and x.min() >= -1 and x.max() <= 1


def test_capacity_and_fifo_overwrite():
    buf = ReplayBuffer(10, (1, 1, 1), reinit_prob=0.0)
    for value in range(4):  # 4 pushes of 4 = 16 images into 10 slots
        buf.push(torch.full((4, 1, 1, 1), float(value)))
    assert len(buf) == 10
    stored = sorted(buf.images().flatten().tolist())
    # The 10 newest survive: 2 of batch 1, all of batches 2 and 3, and all 4 of batch 0 are gone.
    assert stored == [1.0] * 2 + [2.0] * 4 + [3.0] * 4
    buf.push(torch.full((25, 1, 1, 1), 9.0))  # a push larger than the buffer keeps the newest
    assert len(buf) == 10 and (buf.images() == 9.0).all()


def test_state_dict_round_trip():
    buf = ReplayBuffer(8, (1, 2, 2), reinit_prob=0.3)
    buf.push(torch.rand(5, 1, 2, 2))
    other = ReplayBuffer(8, (1, 2, 2), reinit_prob=0.3)
    other.load_state_dict(buf.state_dict())
    assert len(other) == 5 and other.ptr == buf.ptr
    assert torch.equal(other.storage, buf.storage)


def _translated(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) pixels, the uncovered border at the background -1."""
    out = torch.full_like(image, -1.0)
    h, w = image.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_augmented_draws_are_shifted_copies_of_stored_images():
    torch.manual_seed(0)
    stored = torch.rand(8, 1, 10, 10) * 2 - 1
    buf = ReplayBuffer(8, (1, 10, 10), reinit_prob=0.0, augment_prob=1.0, augment_shift=2)
    buf.push(stored)
    x = buf.sample(200, torch.Generator().manual_seed(1))
    shifts = set()
    for image in x:
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            for source in stored
            if torch.equal(image, _translated(source, dy, dx))
        ]
        assert matches, "a draw is no shifted copy of a stored image"
        shifts.add(matches[0])
    assert len(shifts) >= 20  # of the 25 shifts, nearly all occur in 200 draws


def test_augment_share_and_off_switch():
    stored = torch.rand(64, 1, 8, 8) * 2 - 1
    plain = ReplayBuffer(64, (1, 8, 8), reinit_prob=0.1)
    off = ReplayBuffer(64, (1, 8, 8), reinit_prob=0.1, augment_prob=0.0, augment_shift=2)
    half = ReplayBuffer(64, (1, 8, 8), reinit_prob=0.0, augment_prob=0.5, augment_shift=3)
    for buf in (plain, off, half):
        buf.push(stored)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(plain.sample(32, g1), off.sample(32, g2))  # off: the plain draw, random numbers included
    assert torch.equal(g1.get_state(), g2.get_state())
    g = torch.Generator().manual_seed(4)
    x = half.sample(4000, g)
    unmoved = sum(bool((image == stored).flatten(1).all(1).any()) for image in x)
    # moved by (0, 0) also when chosen (1 in 49); Binomial sd of the share about 0.008
    assert abs(unmoved / 4000 - (0.5 + 0.5 / 49)) < 0.035


def test_from_config_carries_every_buffer_param():
    from pipeline.config import BufferConfig

    buf = ReplayBuffer.from_config(BufferConfig(size=32, reinit_prob=0.2, augment_prob=0.3, augment_shift=1), (1, 4, 4), "cpu")
    assert (buf.size, buf.reinit_prob, buf.augment_prob, buf.augment_shift) == (32, 0.2, 0.3, 1)
    assert buf.storage.shape == (32, 1, 4, 4)


def test_reservoir_fills_in_order_then_keeps_a_uniform_sample_of_everything_pushed():
    size, batches, n = 512, 80, 128  # 10,240 images: 20 times the buffer
    buf = ReplayBuffer(size, (1, 1, 1), reinit_prob=0.0, policy="reservoir")
    g = torch.Generator().manual_seed(0)
    buf.push(torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1), g)
    assert torch.equal(buf.images().flatten(), torch.arange(size, dtype=torch.float32))  # filled in order
    for b in range(batches):
        first = size + b * n
        buf.push(torch.arange(first, first + n, dtype=torch.float32).view(n, 1, 1, 1), g)
    total = size + batches * n
    ids = buf.images().flatten()
    assert len(buf) == size and buf.seen == total
    assert ids.unique().numel() == size  # each image is stored at most once
    # A uniform sample of 0 .. total-1: the mean id is total / 2 give or take 5 sd (sd = total / sqrt(12 size));
    # a fifo buffer would hold only the newest 512, mean total - 256.
    assert abs(ids.mean().item() - (total - 1) / 2) < 5 * total / (12 * size) ** 0.5
    assert (ids < size).sum() > 0  # images from the first push are still there


def test_reservoir_keeps_each_image_of_one_push_with_probability_size_over_pushed():
    # Ten images in one push into a buffer of 2 after 2 already stored: every one of the 12 stays with
    # probability 2/12, however many slots the push chooses twice (the later image wins, as if pushed one by one).
    g = torch.Generator().manual_seed(1)
    kept = torch.zeros(12)
    trials = 3000
    for _ in range(trials):
        buf = ReplayBuffer(2, (1, 1, 1), reinit_prob=0.0, policy="reservoir")
        buf.push(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1), g)
        buf.push(torch.arange(2, 12, dtype=torch.float32).view(10, 1, 1, 1), g)
        kept[buf.images().flatten().long()] += 1
    expected = trials * 2 / 12  # 500, sd about 20
    assert torch.all((kept - expected).abs() < 5 * (trials * (2 / 12) * (10 / 12)) ** 0.5), kept


def test_reservoir_state_round_trips_and_is_reproducible():
    def filled(seed):
        buf = ReplayBuffer(64, (1, 2, 2), reinit_prob=0.05, policy="reservoir")
        g = torch.Generator().manual_seed(seed)
        for _ in range(5):
            buf.push(torch.rand(40, 1, 2, 2, generator=g), g)
        return buf

    a, b = filled(3), filled(3)
    assert torch.equal(a.images(), b.images()) and a.seen == b.seen == 200
    c = ReplayBuffer(64, (1, 2, 2), reinit_prob=0.05, policy="reservoir")
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.images(), a.images()) and c.seen == 200 and len(c) == 64


def test_fifo_push_draws_no_random_numbers():
    g = torch.Generator().manual_seed(4)
    before = g.get_state()
    buf = ReplayBuffer(8, (1, 1, 1), reinit_prob=0.0)
    buf.push(torch.zeros(20, 1, 1, 1), g)
    assert torch.equal(g.get_state(), before)  # the book's buffer: the default's random numbers are unchanged
