import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import DataError, load_split, prepare, read_idx, save_split, Split, write_idx


def test_embedded_mnist5k_is_split_stratified_and_scaled(tmp_path):
    splits, summary = prepare(DataConfig(source="mnist5k", test_fraction=0.2, seed=0), tmp_path)
    train, test = splits["train"], splits["test"]
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    assert train.images.shape[1:] == (1, 32, 32)
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert (train.images[:, :, :2, :] == -1.0).all()  # padded with the background value
    assert summary["splits"]["test"]["per_digit"]["7"] == 100
    again, _ = prepare(DataConfig(source="mnist5k", test_fraction=0.2, seed=0), tmp_path)
    assert torch.equal(again["test"].labels, test.labels)  # deterministic


def _write_fake_mnist(root, n_train=300, n_test=100, gz=False):
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        data[prefix] = (images, labels)
    return folder, data


@pytest.mark.parametrize("gz", [False, True])
def test_full_mnist_path_reads_idx_files_without_network(tmp_path, gz):
    _, data = _write_fake_mnist(tmp_path, gz=gz)
    splits, summary = prepare(DataConfig(source="mnist"), tmp_path)
    assert len(splits["train"]) == 300 and len(splits["test"]) == 100
    expected = torch.from_numpy(data["train"][0][0].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(splits["train"].images[0, 0, 2:30, 2:30], expected)
    assert splits["test"].labels.tolist() == data["t10k"][1].astype(int).tolist()
    assert summary["source"] == "mnist"


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    folder, _ = _write_fake_mnist(tmp_path)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    with pytest.raises(DataError, match="truncated"):
        prepare(DataConfig(source="mnist"), tmp_path)


def test_prepared_split_checks(tmp_path):
    good = Split(torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.long))
    save_split(good, tmp_path / "ok.pt")
    assert len(load_split(tmp_path / "ok.pt")) == 4
    save_split(Split(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)), tmp_path / "shape.pt")
    with pytest.raises(DataError, match="shape"):
        load_split(tmp_path / "shape.pt")
    save_split(Split(torch.full((4, 1, 32, 32), 200.0), torch.zeros(4, dtype=torch.long)), tmp_path / "range.pt")
    with pytest.raises(DataError, match="expected \\[-1, 1\\]"):
        load_split(tmp_path / "range.pt")
    save_split(Split(torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long)), tmp_path / "empty.pt")
    with pytest.raises(DataError, match="empty"):
        load_split(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="not a prepared split"):
        load_split(tmp_path / "junk.pt")


def test_bad_magic_number_is_a_clear_error(tmp_path):
    folder, _ = _write_fake_mnist(tmp_path)
    path = folder / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x07  # no IDX type code
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte is not an IDX file \(bad magic number\)"):
        prepare(DataConfig(source="mnist"), tmp_path)
    path.write_bytes(b"\x1f\x8b" + bytes(raw[2:]))  # gzip's magic in a plain file name
    with pytest.raises(DataError, match="bad magic number"):
        read_idx(path)


def test_image_shape_and_label_count_mismatches_are_clear_errors(tmp_path):
    folder, data = _write_fake_mnist(tmp_path)
    images, labels = data["train"]
    write_idx(folder / "train-images-idx3-ubyte", images[:, :27, :27])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds shape \(300, 27, 27\), expected \(N, 28, 28\)"):
        prepare(DataConfig(source="mnist"), tmp_path)
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:-1])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte holds \(299,\) labels for 300 images"):
        prepare(DataConfig(source="mnist"), tmp_path)


def test_failed_download_names_the_missing_files_and_what_to_do(tmp_path, monkeypatch):
    """No network here: the download is simulated by a torchvision MNIST whose download fails."""
    import urllib.error

    import torchvision

    folder, _ = _write_fake_mnist(tmp_path)
    (folder / "t10k-images-idx3-ubyte").unlink()
    calls = []

    class Offline:
        def __init__(self, root, train=True, download=False, **kwargs):
            calls.append((root, train, download))
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError) as info:
        prepare(DataConfig(source="mnist"), tmp_path)
    message = str(info.value)
    assert calls and calls[0] == (str(tmp_path), True, True)  # it did try to download, into raw_dir
    assert "\n" not in message
    assert "t10k-images-idx3-ubyte" in message and "train-images-idx3-ubyte" not in message  # only what is missing
    assert "download failed (URLError)" in message
    assert "place the four IDX files there or use data.source=mnist5k" in message
    assert str(folder) in message


def test_prepare_stage_reports_a_data_error_in_one_line_exit_1(tmp_path, monkeypatch, capsys):
    import yaml

    from pipeline.__main__ import main
    from tests.conftest import tiny_params_dict

    folder, _ = _write_fake_mnist(tmp_path)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    raw = tiny_params_dict({"data": {"source": "mnist", "limit": 0}, "paths": {"raw_dir": str(tmp_path)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing prepared
