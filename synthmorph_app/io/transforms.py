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
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field, replace

import numpy as np
from scipy.ndimage import map_coordinates

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
        """The field's displacement (RAS mm) at ``points`` (N, 3); zero outside its grid."""
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        if self.field is None:
            return np.zeros_like(points)
        ijk = apply_affine(np.linalg.inv(self.field_geometry.affine), points).T
        return np.stack(
            [
                map_coordinates(self.field[..., c], ijk, order=1, mode='constant', cval=0.0)
                for c in range(3)
            ],
            axis=-1,
        )

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map RAS points (N, 3) of the reference space to the moving space."""
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        return apply_affine(self.affine, points + self.displacement_at(points))

    def linear_inverse(self) -> 'Transform':
        """The exact inverse of a linear transform (swaps reference and moving grids)."""
        if not self.is_linear:
            raise ValueError(
                'Only linear transforms invert exactly here; the engine inverts deformable '
                'ones through the negated velocity field.'
            )
        return replace(
            self, affine=np.linalg.inv(self.affine), reference=self.moving, moving=self.reference
        )


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 matrix to points (N, 3)."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    return points @ matrix[:3, :3].T + matrix[:3, 3]
