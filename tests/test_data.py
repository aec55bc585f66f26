"""Data loaders on small files that the tests write in the official formats."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import BatchLoader, augment_batch, load_dataset, split_train_val
from benchmark.errors import DataError, UsageError


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28)
                                                         + imgs.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n)
                                                         + labels.tobytes())
        out[split] = imgs
    return out["train"], out["t10k"]


def test_mnist_idx_files(tmp_path: Path) -> None:
    train_imgs, test_imgs = write_mnist(tmp_path)
    data = load_dataset("mnist", tmp_path)
    assert data.train.x.shape == (20, 1, 28, 28) and data.train.x.dtype == torch.uint8
    assert torch.equal(data.train.x[:, 0], torch.from_numpy(train_imgs))
    assert torch.equal(data.test.y, torch.arange(10) % 10)
    assert data.info.scale == "mnist" and not data.info.flip


def write_cifar(root: Path, name: str = "cifar10") -> np.ndarray:
    rng = np.random.RandomState(1)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, meta, meta_key, n_cls = "labels", "batches.meta", "label_names", 10
    else:
        folder = root / "cifar-100-python"
        files, key, meta, meta_key, n_cls = ["train", "test"], "fine_labels", "meta", \
            "fine_label_names", 100
    folder.mkdir(parents=True)
    first = None
    for f in files:
        data = rng.randint(0, 256, (4, 3 * 32 * 32)).astype(np.uint8)
        first = data if first is None else first
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, key: [0, 1, 2, n_cls - 1]}, fh)
    with open(folder / meta, "wb") as fh:
        pickle.dump({meta_key: [f"c{i}" for i in range(n_cls)]}, fh)
    return first


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_python_pickles(tmp_path: Path, name: str, k: int) -> None:
    first = write_cifar(tmp_path, name)
    data = load_dataset(name, tmp_path)
    n_train = 20 if name == "cifar10" else 4
    assert data.train.x.shape == (n_train, 3, 32, 32) and len(data.test) == 4
    # official layout is CHW-flattened rows: pixel (c, h, w) = row[c*1024 + h*32 + w]
    assert int(data.train.x[0, 2, 5, 7]) == int(first[0, 2 * 1024 + 5 * 32 + 7])
    assert data.info.num_classes == k and data.train.y[3] == k - 1


def test_svhn_mat_files(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.RandomState(2)
    for split in ("train", "test"):
        X = rng.randint(0, 256, (32, 32, 3, 5)).astype(np.uint8)  # official: H×W×C×N
        y = np.array([[1], [2], [10], [4], [5]], dtype=np.uint8)  # official: digit 0 is label 10
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
    data = load_dataset("svhn", tmp_path)
    assert data.train.x.shape == (5, 3, 32, 32)
    assert data.train.y.tolist() == [1, 2, 0, 4, 5]
    X_train = scipy_io.loadmat(tmp_path / "train_32x32.mat")["X"]
    assert int(data.train.x[1, 2, 3, 4]) == int(X_train[3, 4, 2, 1])
    assert not data.info.flip


def test_image_folder_layout_with_provenance(tmp_path: Path) -> None:
    from PIL import Image
    root = tmp_path / "cifar10-jpeg"
    rng = np.random.RandomState(3)
    for split in ("train", "test"):
        for c in range(10):
            d = root / split / f"{c:02d}_class"
            d.mkdir(parents=True)
            for i in range(1 if split == "train" else 4):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(
                    d / f"{i}.png")
    (root / "PROVENANCE").write_text("a JPEG copy\n")
    data = load_dataset("cifar10", root)
    assert data.train.x.shape == (10, 3, 32, 32) and data.train.y.tolist() == list(range(10))
    assert "a JPEG copy" in data.info.provenance
    # the test split is read class by class but held in a fixed shuffled order (capped
    # evaluations take the first N points), and the images keep their labels
    assert sorted(data.test.y.tolist()) == sorted(list(range(10)) * 4)
    assert len(data.test.y[:10].unique()) > 3
    assert torch.equal(load_dataset("cifar10", root).test.x, data.test.x)
    first = np.asarray(Image.open(root / "test" / "03_class" / "2.png"))
    match = [i for i in range(40) if np.array_equal(data.test.x[i].permute(1, 2, 0).numpy(), first)]
    assert len(match) == 1 and int(data.test.y[match[0]]) == 3
    assert data.info.num_classes == 10 and data.info.mean[0] == pytest.approx(0.4914)


@pytest.mark.parametrize("name,expected", [("mnist", "MNIST/raw"), ("cifar10", "data_batch_1"),
                                           ("svhn", r"\{train,test\}_32x32.mat")])
def test_missing_files_name_what_is_expected(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected) as info:
        load_dataset(name, tmp_path)
    assert "advbench download" in str(info.value)
    assert info.value.exit_code == 2


def test_unknown_dataset() -> None:
    with pytest.raises(UsageError, match="valid: mnist5k"):
        load_dataset("imagenet")


def test_embedded_mnist5k_is_a_fixed_stratified_split() -> None:
    data = load_dataset("mnist5k")
    assert len(data.train) == 4000 and len(data.test) == 1000
    assert torch.bincount(data.test.y).tolist() == [100] * 10
    again = load_dataset("mnist5k")
    assert torch.equal(again.test.x, data.test.x)
    assert data.train.x.shape[1:] == (1, 28, 28) and int(data.train.x.max()) == 255
    # evaluation caps take the first N test points: they must not be one class
    assert len(data.test.y[:50].unique()) == 10


def test_validation_split_is_disjoint_and_fixed() -> None:
    data = load_dataset("synthetic")
    tr, va = split_train_val(data.train, 100, subset=50)
    tr2, va2 = split_train_val(data.train, 100, subset=50)
    assert len(va) == 100 and len(tr) == 50 and torch.equal(va.x, va2.x)
    rows = {bytes(r.numpy()) for r in data.train.x.flatten(1)}
    assert len(rows) == len(data.train)  # synthetic samples are distinct, so identity by bytes
    assert not {bytes(r.numpy()) for r in tr.x.flatten(1)} & {bytes(r.numpy()) for r in va.x.flatten(1)}


def test_augmentation_crops_and_flips_as_tensor_ops() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(2, 1, 4, 4) + 1
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=1, flip=False)
    for i in range(2):
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        windows = [padded[:, a:a + 4, b:b + 4] for a in range(3) for b in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


def test_loader_order_follows_generator_state() -> None:
    data = load_dataset("synthetic")
    g = torch.Generator().manual_seed(3)
    loader = BatchLoader(data.train, 100, generator=g)
    state = g.get_state()
    first = [y for _, y in loader]
    g.set_state(state)
    assert all(torch.equal(a, b) for a, (_, b) in zip(first, loader))
    assert sum(len(y) for y in first) == len(data.train)
