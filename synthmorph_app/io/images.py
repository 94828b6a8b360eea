"""Load and validate 3D MRI volumes (NIfTI, MGZ) with nibabel.

No torch here: the engine turns the validated arrays into tensors.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import InputImageError

LOGGER = logging.getLogger('synthmorph_app.io.images')

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


def missing_file_reason(path: str | os.PathLike, what: str) -> str | None:
    """Why the file ``what`` (at ``path``) cannot be opened, where it does not exist: a link
    to nothing (a DataLad or git-annex file whose content is not fetched) or no file at all;
    None where it exists."""
    path = Path(path)
    if path.exists():
        return None
    if path.is_symlink():
        return (f'The {what} is a link to a file that does not exist ({os.readlink(path)}): '
                'in a DataLad or git-annex dataset, fetch it first (datalad get).')
    return f'The {what} does not exist.'


def load_image(
    path: str | os.PathLike, *, kind: str = 'image', frames: bool = False
) -> nb.spatialimages.SpatialImage:
    """Load a 3D image and check that it can be registered.

    Singleton trailing dimensions are squeezed (a ``(X, Y, Z, 1)`` file is 3D). With
    ``frames``, a 4D series ``(X, Y, Z, T)`` is accepted too (an fMRI or diffusion series, or
    tissue probability maps, to resample through a transform); its header keeps the frames'
    spacing (the repetition time) and units.
    Raises :class:`InputImageError` naming the file for: a missing file, an unknown extension,
    a truncated or corrupt file, colour (RGB) voxels, fewer or more than three dimensions, a
    singular header affine, a NIfTI header without orientation (both codes 0) or with a qform
    and an sform that disagree on the axes, NaN or infinite intensities and an image that holds
    one value only. The data are loaded into memory; the path stays in
    ``img.extra['source']``.
    """
    path = Path(path)
    what = f'{kind} <{path}>'
    missing = missing_file_reason(path, what)
    if missing:
        raise InputImageError(missing)
    if path.is_dir():
        raise InputImageError(f'The {what} is a directory, not an image file.')
    if image_suffix(path) is None:
        raise InputImageError(
            f'The {what} has an unknown extension: use one of {", ".join(IMAGE_SUFFIXES)}.'
        )
    try:
        img = _read(path)
        data = np.asanyarray(img.dataobj)
    except (
        OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
        nb.filebasedimages.ImageFileError, nb.spatialimages.HeaderDataError,
    ) as err:
        raise InputImageError(f'The {what} cannot be read (truncated or corrupt?): {err}') from err
    if data.dtype.fields is not None:  # RGB(A) voxels: a screenshot or a colour map
        raise InputImageError(
            f'The {what} holds colour (RGB) voxels of type {data.dtype}; a grey-scale MRI '
            'volume is needed.'
        )
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 and not (frames and data.ndim == 4):
        raise InputImageError(
            f'The {what} has {data.ndim} dimensions {tuple(data.shape)}; '
            + ('a 3D volume or a 4D series is needed.' if frames else
               'a 3D volume is needed (extract one volume of a 4D series first, e.g. with '
               'fslroi or nibabel).')
        )
    if min(data.shape[:3]) < 2:
        raise InputImageError(
            f'The {what} is a single slice {tuple(data.shape)}; a 3D volume is needed.'
        )
    affine = np.asarray(img.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
        raise InputImageError(
            f'The {what} has a singular or non-finite voxel-to-world matrix; fix its header '
            '(qform/sform) before registering.'
        )
    _check_orientation(img, what)
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
    out = nb.Nifti1Image(data, affine, header=_clean_header(img), extra={'source': str(path)})
    if data.ndim == 4 and isinstance(img, nb.MGHImage):  # MGH keeps the TR in ms
        out.header.set_zooms((*out.header.get_zooms()[:3], float(img.header['tr']) / 1000))
        out.header.set_xyzt_units('mm', 'sec')
    return out


def _read(path: Path) -> nb.spatialimages.SpatialImage:
    """``nibabel.load``, and a ``.nii.gz``/``.mgz`` that is not compressed read as it is.

    Such misnamed files are common (a converter or a copy that dropped the compression), and
    ITK, ANTs and FSL read them, since their gzip layer passes plain bytes through.
    """
    suffix = image_suffix(path)
    if suffix in ('.nii.gz', '.mgz'):
        with open(path, 'rb') as f:
            compressed = f.read(2) == b'\x1f\x8b'
        if not compressed:
            raw = path.read_bytes()
            kinds = (nb.MGHImage,) if suffix == '.mgz' else (nb.Nifti1Image, nb.Nifti2Image)
            # nibabel logs each header problem of a wrong guess: ours is the message
            quiet, level = nb.imageglobals.logger, nb.imageglobals.logger.level
            quiet.setLevel(logging.CRITICAL)
            try:
                for kind in kinds:
                    try:
                        img = kind.from_bytes(raw)
                        np.asanyarray(img.dataobj)  # a short file fails here, not later
                        return img
                    except Exception:  # noqa: BLE001, S112 - nibabel raises many kinds
                        continue
            finally:
                quiet.setLevel(level)
            raise ValueError(f'named {suffix} but neither gzip-compressed nor a readable '
                             'uncompressed image')
    return nb.load(str(path))


#: A qform and an sform further apart than this (mm, over the field of view) are warned about.
FORM_GAP_MM = 0.1


def _form_gap(qform: np.ndarray, sform: np.ndarray, shape) -> float:
    """The largest distance (mm) between where the qform and the sform put the corners of a
    grid of ``shape`` (both maps are affine, so the corners bound it)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing='ij')).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.linalg.norm((qform - sform)[:3] @ corners, axis=0).max())


def _itk_reads_sform(hdr) -> bool:
    """Whether ITK (ANTs) takes the sform of a header with both forms set: only where the
    sform is a rotation times the voxel sizes of ``pixdim`` (checked against antspyx: a
    shifted or rotated sform is read, a scaled or sheared one gives way to the qform, with
    ITK's warning "unexpected scales in sform")."""
    linear = hdr.get_sform()[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    zooms = np.asarray(hdr['pixdim'][1:4], dtype=float)
    rotation = linear / np.where(norms > 0, norms, 1.0)
    return bool(np.allclose(norms, zooms, rtol=1e-4, atol=1e-5)
                and np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-4))


def _check_orientation(img, what: str) -> None:
    """A NIfTI header must say where the head is: at least one of the qform and the sform
    (code > 0), and the two in agreement on the axes when both are set.

    With both codes 0 (nibabel resets an invalid code to 0) the world orientation is unknown:
    nibabel falls back to a bare voxel-size matrix and every tool guesses differently, so a
    registration in world space would mean nothing. A qform and an sform that name different
    axes (a flip or a swap between them) are read differently by different tools (ITK-based
    ones may take the qform, nibabel and FreeSurfer the sform), so our transforms would mean
    different things to them.
    """
    if not isinstance(img, nb.Nifti1Image):  # MGH and the rest always carry their orientation
        return
    hdr = img.header
    qcode, scode = int(hdr['qform_code']), int(hdr['sform_code'])
    if qcode == 0 and scode == 0:
        raise InputImageError(
            f'The {what} has no orientation in its header: qform_code and sform_code are both '
            '0 (or invalid), so left, front and top are unknown and a registration in world '
            'space would mean nothing. Set the qform or the sform to the orientation the '
            'scanner wrote (e.g. with fslorient, or nibabel set_qform(affine, code=1)) and '
            'run again.'
        )
    if qcode > 0 and scode > 0:
        q_axes = ''.join(nb.aff2axcodes(hdr.get_qform()))
        s_axes = ''.join(nb.aff2axcodes(hdr.get_sform()))
        gap = _form_gap(hdr.get_qform(), hdr.get_sform(), img.shape[:3])
        if q_axes == s_axes and gap > FORM_GAP_MM and not _itk_reads_sform(hdr):
            LOGGER.warning(
                'The %s has a qform and an sform that place its voxels up to %.1f mm apart, '
                'and an sform that shears or whose scales are not its voxel sizes (pixdim). '
                'synthmorph-app follows the sform (as nibabel, FSL and FreeSurfer do); ITK-based '
                'tools (ANTs, antsApplyTransforms) then read the qform, so with them its '
                'transforms will be off by as much. If the sform is right, fix the header (e.g. '
                'fslorient -copysform2qform) and run again.', what, gap)
        if q_axes != s_axes:
            raise InputImageError(
                f'The {what} has a qform ({q_axes}) and an sform ({s_axes}) that disagree on '
                'its orientation; tools differ in which one they read (ITK and ANTs may take '
                'the qform, nibabel and FreeSurfer the sform), so the result would not mean '
                'the same to all of them. Make them agree (e.g. fslorient -copysform2qform, '
                'once you know the sform is right) and run again.'
            )


def load_masks(fixed=None, moving=None, *, fixed_lesion=None, moving_lesion=None) -> dict:
    """The brain and lesion masks given (paths or None), checked by :func:`load_image`, as the
    ``fixed_mask``/``moving_mask``/``fixed_lesion_mask``/``moving_lesion_mask`` keywords of
    ``engine.register.register``."""
    given = (('fixed_mask', fixed, 'fixed mask'), ('moving_mask', moving, 'moving mask'),
             ('fixed_lesion_mask', fixed_lesion, 'fixed lesion mask'),
             ('moving_lesion_mask', moving_lesion, 'moving lesion mask'))
    return {key: load_image(path, kind=kind) for key, path, kind in given if path}


def _clean_header(img) -> nb.Nifti1Header | None:
    """Keep what a NIfTI header can carry (orientation codes), drop the rest."""
    if isinstance(img, nb.Nifti1Image):
        hdr = img.header.copy()
        hdr.set_data_dtype(np.float32)
        hdr.set_slope_inter(None, None)
        return hdr
    return None


def _seconds(img) -> float:
    """The spacing of a NIfTI series' frames (its repetition time) in seconds."""
    step = float(img.header.get_zooms()[3])
    unit = img.header.get_xyzt_units()[1] if isinstance(img, nb.Nifti1Image) else 'sec'
    return step * {'msec': 1e-3, 'usec': 1e-6}.get(unit, 1.0)


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
        series = img
        img = nb.MGHImage(data, img.affine)
        if data.ndim == 4:  # a series: the TR, in the ms MGH stores it in
            img.header['tr'] = _seconds(series) * 1000
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}{suffix}')
    try:
        nb.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
