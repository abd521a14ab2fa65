import numpy as np
import pytest
import torch
from PIL import Image

from diffaccel.data import load_dataset, save_grid
from diffaccel.errors import UserError


def test_bundled_datasets():
    d = load_dataset("mnist5k")
    assert len(d) == 5000 and d.shape == (1, 32, 32)
    x = d.get_batch(torch.arange(8))
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    assert torch.all(d.images[:, :, :2, :] == 0)  # the 2-pixel padding of MNIST-32
    d = load_dataset("digits", resolution=16, channels=3)
    assert len(d) == 1797 and d.shape == (3, 16, 16)


def test_hflip_uses_the_given_generator():
    d = load_dataset("digits", hflip=True)
    a = d.get_batch(torch.arange(64), torch.Generator().manual_seed(3))
    b = d.get_batch(torch.arange(64), torch.Generator().manual_seed(3))
    plain = load_dataset("digits").get_batch(torch.arange(64))
    assert torch.equal(a, b)
    flipped = [(not torch.equal(a[i], plain[i])) for i in range(64)]
    assert 10 < sum(flipped) < 54
    for i in range(64):
        assert torch.equal(a[i], plain[i]) or torch.equal(a[i], plain[i].flip(-1))


def test_image_folder_recursive_and_resize(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"a{i}.png")
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(tmp_path / "sub" / "b.jpg")
    with pytest.raises(UserError, match="different sizes"):
        load_dataset(str(tmp_path))
    d = load_dataset(str(tmp_path), resolution=8)
    assert d.shape == (3, 8, 8) and len(d) == 4


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no images"):
        load_dataset(str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="bad.png"):
        load_dataset(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path / "missing"))


def test_npz_layouts_and_errors(tmp_path):
    x = np.random.default_rng(0).random((5, 8, 8, 3)).astype(np.float32)  # NHWC in [0, 1]
    np.savez(tmp_path / "a.npz", images=x)
    d = load_dataset(str(tmp_path / "a.npz"))
    assert d.shape == (3, 8, 8)
    np.testing.assert_allclose(d.images.permute(0, 2, 3, 1).numpy(), np.round(x * 255), atol=0)
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "b.npz", x)
    with pytest.raises(UserError, match="NaN"):
        load_dataset(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 5)))
    with pytest.raises(UserError, match="shape"):
        load_dataset(str(tmp_path / "c.npz"))
    (tmp_path / "d.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="d.npz"):
        load_dataset(str(tmp_path / "d.npz"))


def test_mnist_idx_and_cifar(tmp_path):
    import pickle
    import struct

    imgs = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 2, 4, 4) + imgs.tobytes())
    d = load_dataset(str(tmp_path / "t10k-images-idx3-ubyte"))
    assert d.shape == (1, 4, 4) and torch.equal(d.images[:, 0], torch.from_numpy(imgs))
    (tmp_path / "cut-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 2, 4, 4) + imgs.tobytes()[:5])
    with pytest.raises(UserError, match="truncated"):
        load_dataset(str(tmp_path / "cut-idx3-ubyte"))
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 1, 2]}, f)
    d = load_dataset(str(cifar))
    assert d.shape == (3, 32, 32) and torch.equal(d.images.reshape(3, -1), torch.from_numpy(data))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    with open(cifar / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(UserError, match="refusing"):
        load_dataset(str(cifar))


def test_save_grid(tmp_path):
    path = save_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=5)
    im = Image.open(path)
    assert im.size == (5 * 10 + 2, 2 * 10 + 2) and im.format == "PNG"


def test_mnist5k_limit_takes_every_class():
    # stored sorted by class: a limit must not mean "the first N", which would all be zeros
    import numpy as np

    from diffaccel.data import load_dataset, mnist5k_labels

    full = load_dataset("mnist5k").images
    part = load_dataset("mnist5k", limit=300).images
    labels = mnist5k_labels()
    index = {bytes(x.numpy()): i for i, x in enumerate(full)}
    picked = [index[bytes(x.numpy())] for x in part]
    assert picked == sorted(picked) and len(set(picked)) == 300
    assert np.bincount(labels[picked], minlength=10).min() >= 15
