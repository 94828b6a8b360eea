"""Our one representation of a spatial transform, in world (RAS, mm) coordinates.

A :class:`Transform` maps points of the *reference* (fixed) space to the *moving* space, the
direction in which images are pulled: the moved image is ``moved(x) = moving(T(x))`` with::

    T(x) = affine @ (x + field(x))

``x`` is a RAS point in mm, ``field`` a dense displacement in RAS mm sampled (trilinearly, zero
outside its grid) at ``x`` on ``field_geometry``, and ``affine`` a 4x4 RAS-to-RAS matrix. This is
the order of an ITK composite transform ``[affine, field]`` as ANTs and fMRIPrep write
``*_xfm.h5``: the displacement is applied first, then the affine. A purely linear transform has
``field=None``.

No torch here (``io`` never imports torch); the engine builds and resamples with tensors.

Transform files
---------------
:func:`save_transform` and :func:`load_transform` pick the format from the file name. Every file
stores the same meaning, fixed (reference) points to moving points, except where a format's own
convention says otherwise (LTA):

``.lta``
    FreeSurfer LTA, ``LINEAR_RAS_TO_RAS``, ``src`` = moving grid, ``dst`` = fixed grid. FreeSurfer
    matrices map *src to dst* (moving to fixed), so the file holds ``inv(affine)``. Linear only.
``.txt`` / ``.mat``
    ITK affine as ANTs writes it (``AffineTransform_double_3_3``; text *Insight Transform File
    V1.0* or the MATLAB v4 binary with the variables ``AffineTransform_double_3_3`` and
    ``fixed``). ITK works in LPS and maps fixed points to moving points:
    ``M_lps = diag(-1, -1, 1, 1) @ affine @ diag(-1, -1, 1, 1)``. Linear only. ITK's rigid and
    similarity types (Euler3D, CenteredEuler3D, VersorRigid3D, Similarity3D, QuaternionRigid,
    Rigid3D) are read too, as SimpleITK or BRAINSFit write them.
``.h5``
    ITK HDF5 composite as ANTs and fMRIPrep store ``*_xfm.h5``: ``TransformGroup/0``
    ``CompositeTransform_double_3_3``, ``/1`` ``AffineTransform_double_3_3``, then, with a field,
    ``/2`` ``DisplacementFieldTransform_float_3_3`` (LPS vectors). ITK applies the last member
    first, so ``[affine, field]`` is exactly ``T(x) = affine @ (x + field(x))``.
``.nii.gz`` / ``.nii`` / ``.mgz``
    A dense displacement ``d(x) = T(x) - x`` with the affine folded in, on the field's grid (or on
    the fixed grid for a linear transform). ``x + d(x)`` maps fixed points to moving points: it
    pulls the moving image onto the fixed grid. ``field_convention='itk'`` (the default) writes
    what ``antsApplyTransforms`` reads: LPS vectors, 5-D ``(X, Y, Z, 1, 3)``, NIfTI intent 1007
    (vector). ``'synthmorph'`` writes what ``mri_synthmorph`` writes and ``mri_synthmorph apply``
    reads: RAS vectors, ``(X, Y, Z, 3)`` (three frames in MGZ).
"""

from __future__ import annotations

import os
import platform
import re
import zlib
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from types import SimpleNamespace

import nibabel as nb
import numpy as np
from scipy.ndimage import map_coordinates

from ..errors import TransformFileError
from .images import Geometry


@dataclass
class Transform:
    """A reference-to-moving world-space transform (see the module docstring).

    Parameters
    ----------
    affine
        4x4 RAS-to-RAS matrix, applied after the field.
    field
        ``(X, Y, Z, 3)`` float32 displacement in RAS mm on ``field_geometry``, or None.
    field_geometry
        The grid the field is stored on (usually the fixed image's grid).
    reference
        The grid of the fixed image: where moved images are resampled by default.
    moving
        The grid of the moving image (the source of an LTA).
    """

    affine: np.ndarray = dc_field(default_factory=lambda: np.eye(4))
    field: np.ndarray | None = None
    field_geometry: Geometry | None = None
    reference: Geometry | None = None
    moving: Geometry | None = None

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=float)
        if self.affine.shape != (4, 4):
            raise ValueError(f'affine must be 4x4, got {self.affine.shape}')
        if self.field is not None:
            self.field = np.asarray(self.field, dtype=np.float32)
            if self.field_geometry is None:
                raise ValueError('a displacement field needs its field_geometry')
            if self.field.shape != (*self.field_geometry.shape, 3):
                raise ValueError(
                    f'field shape {self.field.shape} does not match its geometry '
                    f'{(*self.field_geometry.shape, 3)}'
                )

    @property
    def is_linear(self) -> bool:
        return self.field is None

    def displacement_at(self, points: np.ndarray) -> np.ndarray:
        """The field's displacement (RAS mm) at ``points`` (N, 3); zero outside its grid.

        Within one voxel beyond the outer voxel centres it blends towards zero, as the
        engine's resampler (``grid_sample``, zero padding) does: scipy's ``'constant'`` mode
        would drop the displacement of an outer voxel whose centre lands a rounding error
        outside the grid (a composed field read back at its own voxels lost 2 % of them).
        """
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        if self.field is None:
            return np.zeros_like(points)
        ijk = apply_affine(np.linalg.inv(self.field_geometry.affine), points).T
        return np.stack(
            [
                map_coordinates(self.field[..., c], ijk, order=1, mode='grid-constant',
                                cval=0.0)
                for c in range(3)
            ],
            axis=-1,
        )

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map RAS points (N, 3) of the reference space to the moving space."""
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        return apply_affine(self.affine, points + self.displacement_at(points))

    def linear_inverse(self) -> Transform:
        """The exact inverse of a linear transform (swaps reference and moving grids)."""
        if not self.is_linear:
            raise ValueError(
                'Only linear transforms invert exactly here; the engine inverts deformable '
                'ones through the negated velocity field.'
            )
        return replace(
            self, affine=np.linalg.inv(self.affine), reference=self.moving, moving=self.reference
        )

    def then_linear(self, matrix: np.ndarray, moving: Geometry | None = None) -> Transform:
        """``x -> matrix @ T(x)``: this transform, then a linear map into another space.

        ``matrix`` maps points of this transform's moving space to those of ``moving`` (e.g. a
        rigid map from a T1w to the same person's FLAIR). The field stays as it is, since the
        matrix only joins the affine that follows it.
        """
        return replace(self, affine=np.asarray(matrix, dtype=float) @ self.affine,
                       moving=moving)

    def after_linear(self, matrix: np.ndarray, reference: Geometry | None = None) -> Transform:
        """``x -> T(matrix @ x)``: a linear map from another space, then this transform.

        ``matrix`` maps points of ``reference`` to this transform's reference space. As
        ``T(M x) = A M (x + M^-1 u(M x))``, the field keeps its samples on its grid moved by
        ``M^-1``, its vectors turned by ``M^-1``.
        """
        matrix = np.asarray(matrix, dtype=float)
        out = replace(self, affine=self.affine @ matrix, reference=reference)
        if self.field is not None:
            inv = np.linalg.inv(matrix)
            out.field = (self.field @ inv[:3, :3].T).astype(np.float32)
            out.field_geometry = Geometry(self.field_geometry.shape,
                                          inv @ self.field_geometry.affine)
        return out


def compose(first: Transform, second: Transform, grid: Geometry | None = None) -> Transform:
    """``x -> second(first(x))``: ``first`` maps reference points into an intermediate space,
    ``second`` maps those into its moving space.

    Points pass in this order; an image moved through the result goes the other way, through
    ``second`` first: e.g. ``first`` a T1w -> MNI registration and ``second`` fMRIPrep's
    boldref -> T1w matrix move a BOLD series onto MNI in one resampling, as the list
    ``[first, second]`` does in ``antsApplyTransforms``. Where either is linear the result is
    exact (:meth:`Transform.then_linear`, :meth:`Transform.after_linear`). Two deformable
    transforms become one field on ``grid`` (default: ``first``'s reference grid, else its
    field's), the chain evaluated at its voxel centres, with the affines joined,
    ``C = A2 @ A1``: resampled onto that grid the result is the chain's at every voxel; off the
    grid it falls back to ``C``. nitransforms' ``TransformChain`` maps points through such
    chains too, but the resampler and the writers here take one :class:`Transform` on a grid.
    """
    if second.is_linear:
        return first.then_linear(second.affine, moving=second.moving)
    if first.is_linear:
        return second.after_linear(first.affine, reference=first.reference)
    grid = grid or first.reference or first.field_geometry
    joined = second.affine @ first.affine
    to_joined = np.linalg.inv(joined)
    field = _on_grid(grid, lambda pts, zs: apply_affine(
        to_joined, second.map_points(first.map_points(pts))) - pts)
    return Transform(joined, field, grid, reference=first.reference, moving=second.moving)


def compose_files(xfm: Transform, before, *, grid: Geometry | None = None,
                  field_convention: str = 'itk') -> Transform:
    """``xfm`` with the transform files an image goes through before it (``before``, the
    image's own first) composed in by :func:`compose`, two fields meeting on ``grid``: one
    transform, so the whole chain costs one resampling (``apply --before``). An entry is a
    path, or ``(path, invert)`` where ``invert`` asks for the file's inverse
    (:func:`inverted`; ``apply --before-inverse``)."""
    for entry in reversed(list(before or ())):
        path, invert = (entry, False) if isinstance(entry, (str, os.PathLike)) else entry
        step = load_transform(path, field_convention=field_convention)
        xfm = compose(xfm, inverted(step, path) if invert else step, grid)
    return xfm


def load_chain(path, *, before=(), invert: bool = False, reference: Geometry | None = None,
               moving: Geometry | None = None, field_convention: str = 'itk') -> Transform:
    """What ``apply`` moves an image through: the file ``path`` (its inverse with ``invert``,
    linear only) with the ``before`` steps composed in (:func:`compose_files`).

    ``reference`` is the output grid where given (``-r``); ``moving`` the grid of the image
    moved, which an FSL FLIRT matrix needs.
    """
    if invert:
        xfm = inverted(load_transform(path, field_convention=field_convention), path)
        xfm.reference = reference or xfm.reference
    else:
        xfm = load_transform(path, field_convention=field_convention, reference=reference,
                             moving=moving)
    if before:
        xfm = compose_files(xfm, before, field_convention=field_convention,
                            grid=reference or xfm.reference or xfm.field_geometry)
    return xfm


def inverted(xfm: Transform, path) -> Transform:
    """The exact inverse of the linear transform read from ``path``; a deformable one is one
    clear error (its inverse is a file of its own: ``register -T``, the BIDS-App's
    ``from-<template>_to-T1w``)."""
    if not xfm.is_linear:
        raise TransformFileError(
            f'The transform file <{path}> holds a displacement field: only linear transforms '
            'are inverted here. Use the inverse register wrote with it (-T; the BIDS-App\'s '
            'from-<template>_to-<contrast> file).'
        )
    return xfm.linear_inverse()


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points (N, 3)."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


# --------------------------------------------------------------------------------------------
# Transform files
# --------------------------------------------------------------------------------------------

#: File name endings :func:`save_transform` and :func:`load_transform` understand.
TRANSFORM_SUFFIXES = ('.lta', '.txt', '.mat', '.h5', '.nii.gz', '.nii', '.mgz')
#: Endings that hold a linear transform only.
LINEAR_SUFFIXES = ('.lta', '.txt', '.mat')
#: Endings that hold a dense displacement field.
FIELD_SUFFIXES = ('.nii.gz', '.nii', '.mgz')
#: Vector conventions of displacement-field images.
FIELD_CONVENTIONS = ('itk', 'synthmorph')

_SUPPORTED = (
    '.lta (FreeSurfer), .txt or .mat (ITK/ANTs affine; .mat also FSL FLIRT), .h5 (ITK/ANTs '
    'composite) or .nii.gz, .nii, .mgz (displacement field)'
)
_EXPECTED = {
    '.lta': 'a FreeSurfer LTA text file (LINEAR_RAS_TO_RAS or LINEAR_VOX_TO_VOX)',
    '.txt': 'an ITK "Insight Transform File V1.0" holding affine transforms',
    '.mat': 'an ITK/ANTs MATLAB v4 affine (AffineTransform_double_3_3 and fixed) or an FSL '
            'FLIRT matrix (text, 4 x 4)',
    '.h5': 'an ITK HDF5 transform (TransformGroup of affines and displacement fields)',
    '.nii.gz': 'a displacement field image of shape (X, Y, Z, 3) or (X, Y, Z, 1, 3)',
}
_EXPECTED['.nii'] = _EXPECTED['.mgz'] = _EXPECTED['.nii.gz']
#: RAS <-> LPS (its own inverse).
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS3 = np.diag([-1.0, -1.0, 1.0])
_ITK_LINEAR = re.compile(
    r'^(AffineTransform|MatrixOffsetTransformBase|Rigid3DTransform)_(double|float)_3_3$')
#: ITK's rotation (and similarity) parameterisations: rotation parameters, then the
#: translation (and a scale); the centre in the fixed parameters (CenteredEuler3D: in its
#: parameters, between the angles and the translation).
_ITK_ROTATIONS = re.compile(
    r'^(Euler3D|CenteredEuler3D|VersorRigid3D|Similarity3D|QuaternionRigid)Transform_'
    r'(double|float)_3_3$')
_ITK_TRANSLATION = re.compile(r'^TranslationTransform_(double|float)_3_3$')
_ITK_IDENTITY = re.compile(r'^IdentityTransform_(double|float)_3_3$')
_ITK_FIELD = re.compile(r'^DisplacementFieldTransform_(double|float)_3_3$')
_ITK_COMPOSITE = re.compile(r'^CompositeTransform_(double|float)_3_3$')
#: Exceptions that mean "this file is not what its name says" while parsing.
_PARSE_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AssertionError,
    AttributeError,
    UnicodeDecodeError,
    zlib.error,
    nb.filebasedimages.ImageFileError,
)


def transform_suffix(path: str | os.PathLike) -> str | None:
    """The transform suffix of ``path`` (``'.lta'``, ``'.nii.gz'``...) or None."""
    name = str(path).lower()
    for suffix in TRANSFORM_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def transform_description(path: str | os.PathLike, *, field_convention: str = 'itk') -> str:
    """One sentence saying what a transform file of this name holds and which way it maps.

    For ``--help`` texts and logs. ``field_convention`` matters for field images only.
    Raises :class:`TransformFileError` for a name with an unknown extension.
    """
    suffix = _suffix_or_raise(path)
    _check_convention(field_convention)
    pull = 'it pulls the moving image onto the fixed grid'
    if suffix == '.lta':
        return (
            '.lta: FreeSurfer LTA, RAS-to-RAS; its matrix maps moving (src) points to fixed '
            "(dst) points, FreeSurfer's convention, the inverse of the fixed-to-moving mapping "
            'used to resample (mri_vol2vol --mov moving --targ fixed --lta file).'
        )
    if suffix in ('.txt', '.mat'):
        kind = 'text (Insight Transform File)' if suffix == '.txt' else 'MATLAB binary'
        return (
            f'{suffix}: ITK/ANTs affine, {kind}, in LPS; maps fixed points to moving points, so '
            f'{pull} (antsApplyTransforms -r fixed -i moving -t file).'
        )
    if suffix == '.h5':
        return (
            '.h5: ITK/ANTs HDF5 composite transform (affine then displacement field, as '
            f"fMRIPrep's *_xfm.h5), in LPS; maps fixed points to moving points, so {pull} "
            '(antsApplyTransforms -r fixed -i moving -t file).'
        )
    if field_convention == 'itk':
        return (
            f'{suffix}: ITK/ANTs displacement field on the fixed grid (LPS mm vectors, '
            f'X,Y,Z,1,3, affine folded in); x + d(x) maps fixed points to moving points, so '
            f'{pull} (antsApplyTransforms -t file).'
        )
    return (
        f'{suffix}: mri_synthmorph displacement field on the fixed grid (RAS mm vectors, '
        f'X,Y,Z,3, affine folded in); x + d(x) maps fixed points to moving points, so {pull} '
        '(mri_synthmorph apply file moving out).'
    )


def save_transform(
    xfm: Transform, path: str | os.PathLike, *, field_convention: str = 'itk'
) -> Path:
    """Write ``xfm`` to ``path`` in the format its name says; return the path.

    The file is written atomically: to a temporary name beside ``path``, then renamed, so an
    interrupted write never leaves a file that looks complete. See the module docstring for
    the formats and their directions.

    Parameters
    ----------
    xfm
        The transform (fixed-to-moving, see :class:`Transform`).
    path
        ``.lta``, ``.txt``, ``.mat`` (linear only), ``.h5`` (linear or with a field) or
        ``.nii.gz``/``.nii``/``.mgz`` (a dense displacement field, the affine folded in).
    field_convention
        For field images: ``'itk'`` (default; LPS vectors, 5-D, what ``antsApplyTransforms``
        reads) or ``'synthmorph'`` (RAS vectors, ``(X, Y, Z, 3)``, what ``mri_synthmorph``
        writes and ``mri_synthmorph apply`` reads). Both map fixed to moving points.

    Notes
    -----
    A field image folds the affine into ``d(x) = T(x) - x`` on the fixed image's grid
    (``xfm.reference``; the field's own grid when there is no reference), resampling the field
    there when it lives on another grid. It is exact on and between that grid's voxel centres,
    but outside the grid readers assume zero displacement (identity) where ``T`` would still
    apply its affine. ``.h5`` keeps affine and field apart, each field on its own grid, and is
    exact everywhere; its field is stored uncompressed (deflate on float vectors took seconds
    per megavoxel and saved little). FreeSurfer's warp-specific MGZ tags (source geometry, format code) are not
    written: the ``'synthmorph'`` image holds the vectors on the fixed grid only.

    Raises
    ------
    TransformFileError
        Unknown extension; a field into a linear-only format; an LTA without both grids; a
        linear transform into a field image without a reference grid; a write that failed.
    """
    path = Path(path)
    suffix = _suffix_or_raise(path)
    _check_convention(field_convention)
    if suffix in LINEAR_SUFFIXES and not xfm.is_linear:
        raise TransformFileError(
            f'Cannot write <{path}>: {suffix} holds linear transforms only and this transform '
            'has a displacement field; save it as .h5 (ITK composite) or as a field image '
            '(.nii.gz, .mgz).'
        )
    if suffix == '.lta':
        if xfm.moving is None or xfm.reference is None:
            missing = ' and '.join(
                n
                for n, g in (('moving (src)', xfm.moving), ('fixed (dst)', xfm.reference))
                if g is None
            )
            raise TransformFileError(
                f'Cannot write <{path}>: an LTA records the moving (src) and fixed (dst) grids, '
                f'and the {missing} grid is unknown; give the transform its grids or save it as '
                '.txt/.mat/.h5.'
            )
        writer = _write_lta
    elif suffix == '.txt':
        writer = _write_itk_text
    elif suffix == '.mat':
        writer = _write_itk_mat
    elif suffix == '.h5':
        writer = _write_itk_h5
    else:
        if xfm.is_linear and xfm.reference is None:
            raise TransformFileError(
                f'Cannot write <{path}>: a linear transform becomes a displacement field on the '
                'fixed grid, and this transform has no reference (fixed) grid; save it as '
                '.lta/.txt/.mat/.h5 or give it a reference.'
            )

        def writer(xfm, tmp):
            _write_field_image(xfm, tmp, suffix, field_convention)

    _atomic_write(path, suffix, lambda tmp: writer(xfm, tmp))
    return path


def load_transform(
    path: str | os.PathLike,
    *,
    field_convention: str = 'itk',
    reference: Geometry | None = None,
    moving: Geometry | None = None,
) -> Transform:
    """Read a transform file written by us, ANTs/ITK, FreeSurfer or ``mri_synthmorph``.

    Parameters
    ----------
    path
        Any name :func:`save_transform` writes (see the module docstring).
    field_convention
        How to read the vectors of a field image: ``'itk'`` (LPS, default) or ``'synthmorph'``
        (RAS). The array may be ``(X, Y, Z, 3)`` or ``(X, Y, Z, 1, 3)`` in either.
    reference, moving
        Grids to attach where the file does not record them (everything but an LTA, whose
        ``dst``/``src`` grids win when valid). A field's grid is the default reference.

    Returns
    -------
    Transform
        Fixed-to-moving. An ITK composite of several affines and at most one field is composed
        exactly into one :class:`Transform` (affines applied before the field are folded into
        the field's grid); several fields meet on the grid of the one applied first
        (:func:`compose`).

    Raises
    ------
    TransformFileError
        Missing, unreadable or corrupt file, unknown extension, unsupported content
        (non-linear ITK transforms other than displacement fields, LTAs of several
        transforms), FSL matrices without the grids of their images.
    """
    path = Path(path)
    suffix = _suffix_or_raise(path)
    _check_convention(field_convention)
    if not path.exists():
        raise TransformFileError(
            f'The transform file <{path}> does not exist (transforms are read from {_SUPPORTED}).'
        )
    if path.is_dir():
        raise TransformFileError(f'The transform file <{path}> is a directory, not a file.')
    try:
        if suffix == '.lta':
            xfm = _read_lta(path, reference, moving)
        elif suffix in ('.txt', '.mat', '.h5'):
            if suffix == '.txt':
                parts = _read_itk_text(path)
            elif suffix == '.mat' and is_fsl_matrix(path):
                return _checked(path, _read_fsl(path, reference, moving))
            elif suffix == '.mat':
                parts = _read_itk_mat(path)
            else:
                parts = _read_itk_h5(path)
                grids = _get_grids(path)
                reference = reference or grids.get('reference')
                moving = moving or grids.get('moving')
            affine, field, fgeom = _compose(parts)
            if field is not None and reference is None:
                reference = fgeom
            xfm = Transform(affine, field, fgeom, reference, moving)
        else:
            field, fgeom = _read_field_image(path, field_convention)
            xfm = Transform(np.eye(4), field, fgeom, reference or fgeom, moving)
    except TransformFileError:
        raise
    except _PARSE_ERRORS as err:
        raise TransformFileError(
            f'The transform file <{path}> cannot be read (truncated or corrupt?): a {suffix} '
            f'file must be {_EXPECTED[suffix]}. {type(err).__name__}: {err}'
        ) from err
    return _checked(path, xfm)


def _checked(path: Path, xfm: Transform) -> Transform:
    if not np.all(np.isfinite(xfm.affine)) or abs(np.linalg.det(xfm.affine[:3, :3])) < 1e-8:
        raise TransformFileError(
            f'The transform file <{path}> holds a singular or non-finite matrix.'
        )
    if xfm.field is not None and not np.all(np.isfinite(xfm.field)):
        raise TransformFileError(
            f'The transform file <{path}> holds NaN or infinite displacements.'
        )
    return xfm


def is_fsl_matrix(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a ``.mat``) is an FSL FLIRT matrix: text, four rows of four numbers
    (ITK's ``.mat`` is a binary MATLAB file)."""
    path = Path(path)
    if transform_suffix(path) != '.mat' or not path.is_file() or path.stat().st_size > 4096:
        return False
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return len(rows) == 4 and all(len(r) == 4 for r in rows) and bool(
            np.all(np.isfinite(np.array(rows, dtype=float))))
    except (UnicodeDecodeError, ValueError):
        return False


def _read_fsl(path: Path, reference: Geometry | None, moving: Geometry | None) -> Transform:
    """An FSL FLIRT matrix as a Transform, through nitransforms' FSL reader.

    FLIRT maps the *input* (moving) image's scaled voxel coordinates (x mirrored for images
    stored with a positive determinant) to the reference image's, so its meaning depends on
    both grids: ``reference`` (FLIRT's ``-ref``) and ``moving`` (its ``-in``) are needed.
    """
    if reference is None or moving is None:
        missing = ' and '.join(n for n, g in (('the reference (-ref) image', reference),
                                               ('the input (-in) image', moving)) if g is None)
        raise TransformFileError(
            f'The transform file <{path}> is an FSL FLIRT matrix, which means something only '
            f'with the grids of both images FLIRT used; {missing} is not known here (apply: '
            'give -r REFERENCE, and resample the image FLIRT moved; in a chain (--before) '
            'convert it first, e.g. c3d_affine_tool -ref REF -src IN FILE -fsl2ras -oitk '
            'FILE.txt).'
        )
    from nitransforms.io.fsl import FSLLinearTransform

    ras = FSLLinearTransform.from_string(path.read_text()).to_ras(moving=moving,
                                                                  reference=reference)
    return Transform(ras, reference=reference, moving=moving)


# --- helpers ---------------------------------------------------------------------------------


def _suffix_or_raise(path) -> str:
    suffix = transform_suffix(path)
    if suffix is None:
        raise TransformFileError(
            f'The transform file <{path}> has an unknown extension: use {_SUPPORTED}.'
        )
    return suffix


def _check_convention(field_convention: str) -> None:
    if field_convention not in FIELD_CONVENTIONS:
        raise ValueError(
            f'field_convention must be one of {FIELD_CONVENTIONS}, got {field_convention!r}'
        )


def _atomic_write(path: Path, suffix: str, write) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path`` (same suffix), then rename."""
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}{suffix}')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise TransformFileError(f'Cannot write the transform <{path}>: {err}') from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _grid_points(geometry: Geometry, z: slice | None = None) -> np.ndarray:
    """RAS mm of the voxel centres of ``geometry`` (optionally slices ``z``), (N, 3), C order."""
    shape = geometry.shape
    ks = np.arange(shape[2])[z] if z is not None else np.arange(shape[2])
    ijk = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), ks, indexing='ij'))
    return apply_affine(geometry.affine, ijk.reshape(3, -1).T)


def displacement_on_grid(xfm: Transform, grid: Geometry) -> np.ndarray:
    """``T(x) - x`` (RAS mm, float32, (X, Y, Z, 3)) at the voxel centres of ``grid``.

    Computed in slabs of z to bound memory; where ``grid`` is the field's own grid the stored
    displacements are used as they are (no interpolation).
    """
    own = xfm.field is not None and grid == xfm.field_geometry

    def displacement(pts, zs):
        disp = xfm.field[:, :, zs].reshape(-1, 3).astype(float) if own \
            else xfm.displacement_at(pts)
        return apply_affine(xfm.affine, pts + disp) - pts

    return _on_grid(grid, displacement)


def _on_grid(grid: Geometry, vectors) -> np.ndarray:
    """``vectors(points, zs)`` ((N, 3) from the RAS points of the voxels of ``grid`` in the
    z-slab ``zs``, C order) as a float32 ``(X, Y, Z, 3)`` array, in slabs of about 2 million
    voxels to bound memory."""
    out = np.empty((*grid.shape, 3), dtype=np.float32)
    step = max(1, 2_000_000 // max(1, grid.shape[0] * grid.shape[1]))
    for z0 in range(0, grid.shape[2], step):
        zs = slice(z0, min(z0 + step, grid.shape[2]))
        out[:, :, zs] = vectors(_grid_points(grid, zs), zs).reshape(
            grid.shape[0], grid.shape[1], -1, 3)
    return out


# --- LTA (through nitransforms) ----------------------------------------------------------------


def _write_lta(xfm: Transform, tmp: Path) -> None:
    """Write a FreeSurfer LTA with nitransforms' LTA writer, setting src/dst ourselves.

    nitransforms' ``FSLinearTransform.from_ras`` records the *reference* as ``src`` and the
    moving image as ``dst`` while storing ``inv(ras)`` (moving to reference): that contradicts
    FreeSurfer, whose RAS2RAS matrices map src to dst (``mri_robust_register``,
    ``mri_synthmorph`` and ``mri_vol2vol --mov src --targ dst`` all agree). We keep its matrix
    and text layout and put the moving grid in ``src`` and the fixed grid in ``dst``.
    """
    from nitransforms.io.lta import FSLinearTransformArray, VolumeGeometry

    lta = FSLinearTransformArray.from_ras(xfm.affine[None])
    inner = lta['xforms'][0].structarr
    for key, geom in (('src', xfm.moving), ('dst', xfm.reference)):
        stand_in = SimpleNamespace(shape=tuple(geom.shape), affine=np.asarray(geom.affine))
        inner[key] = np.asanyarray(VolumeGeometry.from_image(stand_in))
    lta.structarr['subject'] = 'unknown'
    tmp.write_text(lta.to_string())


def _read_lta(path: Path, reference, moving) -> Transform:
    """Read an LTA with nitransforms (RAS2RAS or VOX2VOX; one transform)."""
    from nitransforms.io.lta import FSLinearTransformArray

    lta = FSLinearTransformArray.from_string(path.read_text())
    if lta['nxforms'] != 1:
        raise TransformFileError(
            f'The LTA <{path}> holds {lta["nxforms"]} transforms; one is supported (split it '
            "with FreeSurfer's lta_convert)."
        )
    inner = lta['xforms'][0]
    code = int(inner.structarr['type'])
    src, dst = _lta_geometry(inner['src']), _lta_geometry(inner['dst'])
    if code == 0 and (src is None or dst is None):
        raise TransformFileError(
            f'The LTA <{path}> is LINEAR_VOX_TO_VOX without valid src and dst volume info, so '
            'its voxels cannot be placed in the world; convert it with lta_convert --outlta '
            '--src moving --trg fixed.'
        )
    if code not in (0, 1):
        raise TransformFileError(
            f'The LTA <{path}> has type {code}; only LINEAR_VOX_TO_VOX (0) and '
            'LINEAR_RAS_TO_RAS (1) are supported: convert it with lta_convert --outlta.'
        )
    # to_ras() converts VOX2VOX to RAS2RAS and returns inv(matrix): dst (fixed) -> src (moving).
    affine = np.asarray(inner.to_ras(), dtype=float)
    return Transform(affine, reference=dst or reference, moving=src or moving)


def _lta_geometry(vg) -> Geometry | None:
    sa = vg.structarr
    shape = tuple(int(v) for v in np.ravel(sa['volume']))
    if not int(sa['valid']) or min(shape) < 1 or np.any(np.asarray(sa['voxelsize']) <= 0):
        return None
    return Geometry(shape, np.asarray(vg.as_affine(), dtype=float))


# --- ITK affine: text, MATLAB, shared -------------------------------------------------------


def _itk_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITK ``AffineTransform`` (parameters (12,), centre (3,)) of a RAS fixed->moving matrix."""
    lps = _LPS @ affine @ _LPS
    return np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]), np.zeros(3)


def _affine_from_itk(params, fixed) -> np.ndarray:
    """RAS matrix of an ITK ``AffineTransform``: ``y = M (x - c) + t + c`` in LPS."""
    params = np.asarray(params, dtype=float).ravel()
    fixed = np.zeros(3) if fixed is None else np.asarray(fixed, dtype=float).ravel()
    if params.size != 12 or fixed.size != 3:
        raise ValueError(
            f'an ITK 3-D affine needs 12 parameters and 3 fixed parameters, got {params.size} '
            f'and {fixed.size}'
        )
    lps = np.eye(4)
    lps[:3, :3] = params[:9].reshape(3, 3)
    lps[:3, 3] = params[9:] + fixed - lps[:3, :3] @ fixed
    return _LPS @ lps @ _LPS


def _itk_linear_part(ttype: str, params, fixed, path) -> np.ndarray | None:
    """RAS matrix of a linear ITK transform, or None if ``ttype`` is not linear."""
    if _ITK_LINEAR.match(ttype):
        return _affine_from_itk(params, fixed)
    rotation = _ITK_ROTATIONS.match(ttype)
    if rotation:
        matrix, translation, center = _itk_rotation(rotation.group(1), params, fixed)
        return _affine_from_itk(np.r_[matrix.ravel(), translation], center)
    if _ITK_TRANSLATION.match(ttype):
        t = np.asarray(params, dtype=float).ravel()
        if t.size != 3:
            raise ValueError(f'a TranslationTransform needs 3 parameters, got {t.size}')
        return _LPS @ np.block([[np.eye(3), t[:, None]], [np.zeros((1, 3)), 1.0]]) @ _LPS
    if _ITK_IDENTITY.match(ttype):
        return np.eye(4)
    return None


def _versor_matrix(v) -> np.ndarray:
    """The rotation of a versor (the vector part of a unit quaternion; ITK's ``Versor``)."""
    x, y, z = v
    w = np.sqrt(max(0.0, 1.0 - (x * x + y * y + z * z)))
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _euler_matrix(ax, ay, az, zyx: bool) -> np.ndarray:
    """ITK ``Euler3DTransform``'s rotation: ``Rz Rx Ry``, or ``Rz Ry Rx`` with ComputeZYX."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _itk_rotation(kind: str, params, fixed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(matrix, translation, centre)`` in LPS of an ITK rotation or similarity transform
    (:data:`_ITK_ROTATIONS`); tested against the transforms ANTs writes."""
    params = np.asarray(params, dtype=float).ravel()
    fixed = np.zeros(3) if fixed is None else np.asarray(fixed, dtype=float).ravel()
    sizes = {'Euler3D': 6, 'CenteredEuler3D': 9, 'VersorRigid3D': 6, 'Similarity3D': 7,
             'QuaternionRigid': 7}
    if params.size != sizes[kind]:
        raise ValueError(f'an ITK {kind}Transform needs {sizes[kind]} parameters, got '
                         f'{params.size}')
    center = fixed[:3] if fixed.size >= 3 else np.zeros(3)
    if kind in ('Euler3D', 'CenteredEuler3D'):
        zyx = fixed.size > 3 and bool(fixed[3])
        matrix = _euler_matrix(*params[:3], zyx)
        if kind == 'CenteredEuler3D':
            center, params = params[3:6], np.r_[params[:3], params[6:]]
        return matrix, params[3:6], center
    if kind == 'QuaternionRigid':  # x, y, z, w: normalised, as ITK takes it
        q = params[:4] / np.linalg.norm(params[:4])
        return _versor_matrix(q[:3] * np.sign(q[3] or 1.0)), params[4:7], center
    matrix = _versor_matrix(params[:3])
    if kind == 'Similarity3D':
        matrix = matrix * params[6]
    return matrix, params[3:6], center


def _unsupported(ttype: str, path) -> TransformFileError:
    return TransformFileError(
        f'The transform file <{path}> holds an ITK {ttype}, which is not supported: we read '
        'AffineTransform, MatrixOffsetTransformBase, Rigid3D, Euler3D, CenteredEuler3D, '
        'VersorRigid3D, Similarity3D, QuaternionRigid, Translation and Identity transforms and '
        'DisplacementFieldTransform (convert others to an affine, e.g. by resaving with ANTs).'
    )


def _write_itk_text(xfm: Transform, tmp: Path) -> None:
    """Write the Insight Transform File V1.0 text ANTs writes, at full double precision.

    Not through nitransforms: its ITK text writer prints 6 significant digits (``%g``; about
    1e-4 mm at 100 mm from the origin) and labels the transform ``AffineTransform_float_3_3``.
    """
    params, fixed = _itk_affine(xfm.affine)
    tmp.write_text(
        '#Insight Transform File V1.0\n'
        '#Transform 0\n'
        'Transform: AffineTransform_double_3_3\n'
        f'Parameters: {" ".join(_fmt(v) for v in params)}\n'
        f'FixedParameters: {" ".join(_fmt(v) for v in fixed)}\n'
    )


def _fmt(value: float) -> str:
    return f'{float(value) + 0.0:.17g}'


def _read_itk_text(path: Path) -> list:
    """Parse an Insight Transform File into ``[('affine', M) | ...]`` in file order."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines or not lines[0].startswith('#Insight Transform File'):
        raise TransformFileError(
            f'The transform file <{path}> is not an ITK text transform (it must begin with '
            '"#Insight Transform File V1.0").'
        )
    entries = []
    for line in lines[1:]:
        if line.startswith('#'):
            continue
        key, sep, value = line.partition(':')
        key = key.strip()
        if not sep or key not in ('Transform', 'Parameters', 'FixedParameters'):
            raise ValueError(f'unexpected line {line!r}')
        if key == 'Transform':
            entries.append({'type': value.strip(), 'params': None, 'fixed': None})
            continue
        if not entries:
            raise ValueError(f'{key} before any "Transform:" line')
        entries[-1]['params' if key == 'Parameters' else 'fixed'] = np.array(
            value.split(), dtype=float
        )
    parts = []
    for entry in entries:
        ttype = entry['type']
        if _ITK_COMPOSITE.match(ttype):
            continue
        if _ITK_FIELD.match(ttype):
            raise TransformFileError(
                f'The transform file <{path}> names a displacement field whose data ITK stores '
                'elsewhere; use the .h5 composite or the field image instead.'
            )
        matrix = _itk_linear_part(ttype, _need(entry['params'], ttype), entry['fixed'], path)
        if matrix is None:
            raise _unsupported(ttype, path)
        parts.append(('affine', matrix))
    if not parts:
        raise TransformFileError(f'The transform file <{path}> holds no transform.')
    return parts


def _need(value, ttype):
    if value is None:
        raise ValueError(f'{ttype} has no "Parameters:" line')
    return value


def _write_itk_mat(xfm: Transform, tmp: Path) -> None:
    """Write the MATLAB v4 file ANTs writes (``AffineTransform_double_3_3``, ``fixed``).

    Not through nitransforms, which stores ``fixed`` as float32 where ANTs stores doubles.
    """
    from scipy.io import savemat

    params, fixed = _itk_affine(xfm.affine)
    savemat(
        str(tmp),
        {'AffineTransform_double_3_3': params[:, None], 'fixed': fixed[:, None]},
        format='4',
    )


def _read_itk_mat(path: Path) -> list:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mdict = loadmat(str(path))
    except MatReadError as err:  # not a ValueError: re-raise as one the caller reports
        raise ValueError(f'not a MATLAB file: {err}') from err
    names = [k for k in mdict if not k.startswith('__')]
    for name in names:
        matrix = _itk_linear_part(name, mdict[name], mdict.get('fixed'), path)
        if matrix is not None:
            return [('affine', matrix)]
    others = [n for n in names if n != 'fixed']
    if others:
        raise _unsupported(others[0], path)
    raise TransformFileError(
        f'The transform file <{path}> holds no ITK transform (expected a variable '
        'AffineTransform_double_3_3 and "fixed", as ANTs writes).'
    )


# --- ITK HDF5 composite ----------------------------------------------------------------------


def _write_itk_h5(xfm: Transform, tmp: Path) -> None:
    """Write an ITK HDF5 composite as ANTs/fMRIPrep store ``*_xfm.h5``, with h5py.

    nitransforms reads these files (``nitransforms.io.itk.ITKCompositeH5``) but cannot write
    them (it writes its own X5 format), so we write the layout ITK's HDF5TransformIO uses:
    ``TransformGroup/<i>/{TransformType, TransformFixedParameters, TransformParameters}``,
    types as variable-length ASCII strings, member 0 the composite itself (type only).
    A displacement field's fixed parameters are size (3), origin (3, LPS), spacing (3) and the
    direction matrix (9, LPS, row-major: ``D[i, j]`` is the LPS component ``i`` of voxel axis
    ``j``); its parameters are the LPS vectors interleaved per voxel, x fastest (ITK/Fortran
    order: ``moveaxis(field, -1, 0).ravel(order='F')``).
    """
    import h5py

    text = h5py.string_dtype('ascii')

    def put_type(group, name):
        group.create_dataset('TransformType', data=np.array([name], dtype=object), dtype=text)

    with h5py.File(tmp, 'w') as h5:
        for key, value in (
            ('HDFVersion', f'HDF5 library version: {h5py.version.hdf5_version}'),
            ('OSName', platform.system()),
            ('OSVersion', platform.release()),
        ):
            h5.create_dataset(key, data=np.array([value], dtype=object), dtype=text)
        _put_grids(h5, xfm)
        root = h5.create_group('TransformGroup')
        put_type(root.create_group('0'), 'CompositeTransform_double_3_3')
        params, fixed = _itk_affine(xfm.affine)
        group = root.create_group('1')
        put_type(group, 'AffineTransform_double_3_3')
        group.create_dataset('TransformFixedParameters', data=fixed.astype(np.float64))
        group.create_dataset('TransformParameters', data=params.astype(np.float64))
        if xfm.field is not None:
            geom = xfm.field_geometry
            lin = geom.affine[:3, :3]
            spacing = np.sqrt((lin**2).sum(axis=0))
            direction = _LPS3 @ lin / spacing
            origin = _LPS3 @ geom.affine[:3, 3]
            fixed = np.concatenate(
                [np.asarray(geom.shape, dtype=float), origin, spacing, direction.ravel()]
            )
            vectors = xfm.field * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
            values = np.moveaxis(vectors.astype(np.float32), -1, 0).ravel(order='F')
            group = root.create_group('2')
            put_type(group, 'DisplacementFieldTransform_float_3_3')
            group.create_dataset('TransformFixedParameters', data=fixed)
            group.create_dataset('TransformParameters', data=values)


_GRID_ATTR = 'synthmorph_app_{}_grid'


def _put_grids(h5, xfm: Transform) -> None:
    """Record the fixed (reference) and moving grids as root attributes.

    ITK's composite has no slot for the grid a transform was made for, and ITK, ANTs and
    nitransforms ignore extra root attributes; ``synthmorph-app apply`` reads them back, so an
    image is resampled onto the fixed image's grid without ``-r``.
    """
    for name, geom in (('reference', xfm.reference), ('moving', xfm.moving)):
        if geom is not None:
            h5.attrs[_GRID_ATTR.format(name)] = np.concatenate(
                [np.asarray(geom.shape, dtype=float), np.asarray(geom.affine, float).ravel()]
            )


def _get_grids(path: Path) -> dict:
    import h5py

    grids = {}
    with h5py.File(path, 'r') as h5:
        for name in ('reference', 'moving'):
            value = h5.attrs.get(_GRID_ATTR.format(name))
            if value is not None and np.size(value) == 19:
                value = np.asarray(value, dtype=float)
                grids[name] = Geometry(tuple(int(v) for v in value[:3]), value[3:].reshape(4, 4))
    return grids


def _read_itk_h5(path: Path) -> list:
    """Members of an ITK HDF5 transform file in file order (composite header skipped)."""
    import h5py

    parts = []
    with h5py.File(path, 'r') as h5:
        if 'TransformGroup' not in h5:
            raise TransformFileError(
                f'The transform file <{path}> is HDF5 but not an ITK transform (no '
                'TransformGroup); X5 and other layouts are not supported.'
            )
        root = h5['TransformGroup']
        for key in sorted(root.keys(), key=int):
            group = root[key]
            ttype = group['TransformType'][0]
            ttype = (ttype.decode() if isinstance(ttype, bytes) else str(ttype)).strip()
            if _ITK_COMPOSITE.match(ttype):
                continue
            params = _h5_values(group, 'Parameters')
            fixed = _h5_values(group, 'FixedParameters')
            matrix = _itk_linear_part(ttype, params, fixed, path)
            if matrix is not None:
                parts.append(('affine', matrix))
            elif _ITK_FIELD.match(ttype):
                parts.append(('field', *_field_from_itk(params, fixed)))
            else:
                raise _unsupported(ttype, path)
    if not parts:
        raise TransformFileError(f'The transform file <{path}> holds no transform.')
    return parts


def _h5_values(group, what: str) -> np.ndarray:
    # Old ITK versions misspelled the dataset names ("Tranform..."); read both.
    for name in (f'Transform{what}', f'Tranform{what}'):
        if name in group:
            return np.asarray(group[name])
    raise KeyError(f'{group.name} has no Transform{what}')


def _field_from_itk(params, fixed) -> tuple[np.ndarray, Geometry]:
    fixed = np.asarray(fixed, dtype=float).ravel()
    if fixed.size != 18:
        raise ValueError(f'a 3-D displacement field needs 18 fixed parameters, got {fixed.size}')
    shape = tuple(round(float(v)) for v in fixed[:3])
    origin, spacing, direction = fixed[3:6], fixed[6:9], fixed[9:].reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS3 @ direction * spacing
    affine[:3, 3] = _LPS3 @ origin
    values = np.asarray(params, dtype=np.float32).ravel()
    if values.size != 3 * int(np.prod(shape)):
        raise ValueError(f'{values.size} displacement values do not fill a {shape} grid')
    field = np.moveaxis(values.reshape((3, *shape), order='F'), 0, -1)
    field = np.ascontiguousarray(field * np.array([-1.0, -1.0, 1.0], dtype=np.float32))
    return field, Geometry(shape, affine)


def _compose(parts: list) -> tuple[np.ndarray, np.ndarray | None, Geometry | None]:
    """Compose ITK members (file order; ITK applies the last first) into ``A (x + f(x))``,
    through :func:`compose` in the order points pass.

    Affines compose by matrix products. A field ``h`` applied after an affine ``A`` is rewritten
    exactly: ``A x + h(A x) = A (x + g(x))`` with ``g = L^-1 h`` (``L`` the linear part of ``A``)
    on the grid ``inv(A) @ grid``, which holds the same values (no resampling;
    :meth:`Transform.after_linear`). Several fields (a composite of two registrations) become
    one field on the grid of the field applied first, where the composite is exact at every
    voxel.
    """
    out = Transform()
    for part in reversed(parts):
        step = Transform(part[1]) if part[0] == 'affine' else Transform(np.eye(4), *part[1:])
        out = compose(out, step)
    return out.affine, out.field, out.field_geometry


# --- dense displacement-field images ---------------------------------------------------------


def _write_field_image(xfm: Transform, tmp: Path, suffix: str, convention: str) -> None:
    # On the fixed image's grid when known (what mri_synthmorph writes and its apply expects),
    # else on the field's own grid.
    grid = xfm.reference if xfm.reference is not None else xfm.field_geometry
    disp = displacement_on_grid(xfm, grid)
    if convention == 'itk':
        disp *= np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    if suffix == '.mgz':
        nb.save(nb.MGHImage(disp, grid.affine), str(tmp))
        return
    data = disp[:, :, :, None, :] if convention == 'itk' else disp
    img = nb.Nifti1Image(data, grid.affine)
    img.header.set_qform(grid.affine, code=1)
    img.header.set_sform(grid.affine, code=1)
    img.header.set_xyzt_units('mm')
    if convention == 'itk':
        img.header.set_intent('vector')
    nb.save(img, str(tmp))


def _read_field_image(path: Path, convention: str) -> tuple[np.ndarray, Geometry]:
    img = nb.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 3:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] != 3:
        raise TransformFileError(
            f'The transform file <{path}> has shape {tuple(img.shape)}, not a 3-D displacement '
            'field: expected (X, Y, Z, 3) or (X, Y, Z, 1, 3).'
        )
    if convention == 'itk':
        data = data * np.array([-1.0, -1.0, 1.0], dtype=np.float32)
    return np.ascontiguousarray(data), Geometry.from_image(img)
