"""Quality figures of one registration (numpy only): Jacobians and similarity.

>>> import numpy as np
>>> field = np.zeros((4, 4, 4, 3), dtype=np.float32)
>>> float(jacobian_determinant(field, np.eye(4), np.diag([2.0, 1, 1, 1])).mean())
2.0
>>> a = np.arange(27.0).reshape(3, 3, 3)
>>> round(ncc(a, 2 * a + 1), 6)
1.0
"""

from __future__ import annotations

import numpy as np


def jacobian_determinant(field: np.ndarray, grid_affine: np.ndarray,
                         affine: np.ndarray | None = None) -> np.ndarray:
    """Determinant of the Jacobian of ``T(x) = A (x + u(x))`` on the field's grid.

    ``field`` is ``(X, Y, Z, 3)`` in RAS mm on the grid ``grid_affine`` (voxel to RAS);
    derivatives are central differences in voxels, turned into mm through the grid's matrix.
    ``det(J) = det(A) det(I + du/dx)``. Values <= 0 mark folding.
    """
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f'field must be (X, Y, Z, 3), got {field.shape}')
    lin = np.asarray(grid_affine, dtype=float)[:3, :3]
    inv = np.linalg.inv(lin)
    # d u_i / d ijk_j, shape (X, Y, Z, 3 components, 3 voxel axes)
    grads = np.stack([np.stack(np.gradient(field[..., c].astype(np.float64), axis=(0, 1, 2)),
                               axis=-1) for c in range(3)], axis=-2)
    jac = grads @ inv + np.eye(3)  # d u / d RAS = d u / d ijk @ d ijk / d RAS
    det = np.linalg.det(jac)
    if affine is not None:
        det = det * np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])
    return det.astype(np.float32)


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation of two arrays (inside ``mask``)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f'arrays differ in shape: {a.shape} vs {b.shape}')
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def registration_qc(moved: np.ndarray, template: np.ndarray, mask: np.ndarray,
                    jacobian: np.ndarray | None) -> dict:
    """Per-image QC: similarity to the template, log-Jacobian spread, folding (%)."""
    mask = np.asarray(mask, dtype=bool)
    out = {'ncc_template': round(ncc(moved, template, mask), 5)}
    if jacobian is None:
        out.update(logjac_std=0.0, folding_pct=0.0)
    else:
        jac = np.asarray(jacobian)[mask]
        out['folding_pct'] = round(float((jac <= 0).mean() * 100), 5)
        logj = np.log(np.clip(jac, 1e-6, None))
        out['logjac_std'] = round(float(logj.std()), 5)
    return out
