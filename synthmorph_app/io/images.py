"""Load and validate 3D MRI volumes (NIfTI, MGZ) with nibabel.

No torch here: the engine turns the validated arrays into tensors.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import InputImageError

#: File name endings we read and write as images.
IMAGE_SUFFIXES = ('.nii.gz', '.nii', '.mgz', '.mgh')


def image_suffix(path: str | os.PathLike) -> str | None:
    """Return the image suffix of ``path`` (``'.nii.gz'``, ``'.mgz'``...) or None."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in world space: ``shape`` (3 ints) and ``affine`` (4x4 voxel to RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @classmethod
    def from_image(cls, img: nb.spatialimages.SpatialImage) -> Geometry:
        return cls(tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=float))

    @property
    def voxel_sizes(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def __eq__(self, other):
        return (
            isinstance(other, Geometry)
            and self.shape == other.shape
            and np.allclose(self.affine, other.affine, atol=1e-5)
        )

    def __hash__(self):  # pragma: no cover - geometries are compared, not hashed
        return hash(self.shape)


def load_image(path: str | os.PathLike, *, kind: str = 'image') -> nb.spatialimages.SpatialImage:
    """Load a 3D image and check that it can be registered.

    Singleton trailing dimensions are squeezed (a ``(X, Y, Z, 1)`` file is 3D).
    Raises :class:`InputImageError` naming the file for: a missing file, an unknown extension,
    a truncated or corrupt file, fewer or more than three dimensions, a singular header affine,
    NaN or infinite intensities and an image that holds one value only. The data are loaded
    into memory; the path stays in ``img.extra['source']``.
    """
    path = Path(path)
    what = f'{kind} <{path}>'
    if not path.exists():
        raise InputImageError(f'The {what} does not exist.')
    if path.is_dir():
        raise InputImageError(f'The {what} is a directory, not an image file.')
    if image_suffix(path) is None:
        raise InputImageError(
            f'The {what} has an unknown extension: use one of {", ".join(IMAGE_SUFFIXES)}.'
        )
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (
        OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
        nb.filebasedimages.ImageFileError, nb.spatialimages.HeaderDataError,
    ) as err:
        raise InputImageError(f'The {what} cannot be read (truncated or corrupt?): {err}') from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputImageError(
            f'The {what} has {data.ndim} dimensions {tuple(data.shape)}; a 3D volume is needed '
            '(extract one volume of a 4D series first, e.g. with fslroi or nibabel).'
        )
    if min(data.shape) < 2:
        raise InputImageError(
            f'The {what} is a single slice {tuple(data.shape)}; a 3D volume is needed.'
        )
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputImageError(
            f'The {what} has a singular or non-finite voxel-to-world matrix; fix its header '
            '(qform/sform) before registering.'
        )
    if np.issubdtype(data.dtype, np.complexfloating) or data.dtype == bool:
        data = np.abs(data).astype(np.float32)
    data = np.asarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        bad = int((~np.isfinite(data)).sum())
        raise InputImageError(
            f'The {what} contains {bad} NaN or infinite voxels; replace them '
            '(e.g. with 0) before registering.'
        )
    if float(data.max()) == float(data.min()):
        raise InputImageError(
            f'The {what} holds a single value ({float(data.min())}) everywhere: it is empty.'
        )
    # the data are in memory: the file's name stays in ``extra`` for messages
    return nb.Nifti1Image(data, affine, header=_clean_header(img), extra={'source': str(path)})


def load_masks(fixed=None, moving=None) -> dict:
    """The brain masks given (paths or None), checked by :func:`load_image`, as the
    ``fixed_mask``/``moving_mask`` keywords of ``engine.register.register``."""
    return {f'{side}_mask': load_image(path, kind=f'{side} mask')
            for side, path in (('fixed', fixed), ('moving', moving)) if path}


def _clean_header(img) -> nb.Nifti1Header | None:
    """Keep what a NIfTI header can carry (orientation codes), drop the rest."""
    if isinstance(img, nb.Nifti1Image):
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        hdr.set_slope_inter(None, None)
        return hdr
    return None


def save_image(img: nb.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write ``img`` atomically: to a temporary name beside ``path``, then rename.

    The format follows the name (``.nii.gz``, ``.nii``, ``.mgz``). An interrupted write never
    leaves a file at ``path`` that looks complete.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix is None:
        raise InputImageError(
            f'Cannot write <{path}>: unknown extension, use one of {", ".join(IMAGE_SUFFIXES)}.'
        )
    if suffix in ('.mgz', '.mgh') and not isinstance(img, nb.MGHImage):
        data = np.asanyarray(img.dataobj)
        if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            data = data.astype(np.float32)
        img = nb.MGHImage(data, img.affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}{suffix}')
    try:
        nb.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
