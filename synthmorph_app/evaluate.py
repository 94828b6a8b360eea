"""The paper's evaluation metrics: label overlap, MIND similarity, transform regularity.

One public module used by ``synthmorph-app evaluate``, by the benchmarks in ``benchmarks/`` and
by the BIDS-App's per-image and group QC, so every figure we publish means the same thing:

- :func:`dice_per_label` / :func:`mean_dice`: Dice overlap of two label maps on one grid (the
  moved labels are resampled with nearest-neighbour interpolation before, see :func:`evaluate`);
- :func:`mind_ncc`: the NCC of MIND-SSC descriptors (Heinrich et al. 2012) of two images on one
  grid, averaged over the 12 descriptor channels: contrast-independent, so it compares a moved
  FLAIR with a T1w as fairly as two T1w images (1 is best);
- :func:`jacobian_determinant` and :func:`jacobian_stats`: the determinant of the Jacobian of a
  transform, the standard deviation of its log (the spread of local volume change; 0 for a
  linear map) and the percentage of voxels where it is <= 0 (folding), inside a mask.

>>> import numpy as np
>>> a = np.zeros((4, 4, 4), int); a[:2] = 1; a[2:] = 2
>>> b = np.zeros_like(a); b[:3] = 1; b[3:] = 2
>>> {k: round(v, 3) for k, v in dice_per_label(a, b).items()}
{1: 0.8, 2: 0.667}
>>> field = np.zeros((4, 4, 4, 3), dtype=np.float32)
>>> float(jacobian_determinant(field, np.eye(4), np.diag([2.0, 1, 1, 1])).mean())
2.0
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field

import numpy as np

#: Voxels of context MIND-SSC reads around each voxel (dilation 2 + patch radius 1).
_MIND_HALO = 3
#: Largest slab (voxels) of MIND descriptors held at once: bounds memory at 1 mm.
_MIND_SLAB_VOXELS = 4_000_000
#: Largest slab (voxels) of Jacobians computed at once.
_JACOBIAN_SLAB_VOXELS = 2_000_000


# --- label overlap -----------------------------------------------------------------------------


def dice_per_label(moved: np.ndarray, fixed: np.ndarray,
                   labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice of each label between two label maps of one shape.

    ``labels`` defaults to the labels (> 0) present in *both* maps, the convention of the
    SynthMorph paper and of our benchmarks; a requested label absent from both maps is skipped,
    one present in only one map scores 0.
    """
    moved = np.asarray(moved)
    fixed = np.asarray(fixed)
    if moved.shape != fixed.shape:
        raise ValueError(f'label maps differ in shape: {moved.shape} vs {fixed.shape}')
    moved = np.rint(moved).astype(np.int64)
    fixed = np.rint(fixed).astype(np.int64)
    if labels is None:
        labels = np.intersect1d(np.unique(moved[moved > 0]), np.unique(fixed[fixed > 0]))
    # Counting pairs with bincount is one pass over the volume, not one per label.
    top = int(max(moved.max(initial=0), fixed.max(initial=0))) + 1
    count_m = np.bincount(moved.ravel(), minlength=top)
    count_f = np.bincount(fixed.ravel(), minlength=top)
    same = moved == fixed
    count_both = np.bincount(fixed[same].ravel(), minlength=top)
    out = {}
    for label in labels:
        label = int(label)
        if label < 0 or label >= top:
            continue
        total = count_m[label] + count_f[label]
        if total:
            out[label] = float(2.0 * count_both[label] / total)
    return out


def mean_dice(scores: dict[int, float]) -> float:
    """The mean of :func:`dice_per_label`'s scores (NaN when there is none)."""
    return float(np.mean(list(scores.values()))) if scores else float('nan')


def largest_labels(labels: np.ndarray, count: int, among: Iterable[int] | None = None) -> list:
    """The ``count`` labels (> 0) of ``labels`` with the most voxels (optionally ``among`` a set).

    The paper's "N largest structures" of the fixed label map.
    """
    values, sizes = np.unique(np.rint(labels).astype(np.int64), return_counts=True)
    keep = values > 0
    if among is not None:
        keep &= np.isin(values, list(among))
    order = np.argsort(-sizes[keep], kind='stable')
    return [int(v) for v in values[keep][order][:count]]


# --- MIND similarity ---------------------------------------------------------------------------


def mind_ncc(moved: np.ndarray, fixed: np.ndarray, mask: np.ndarray | None = None,
             dilation: int = 2) -> float:
    """NCC of the MIND-SSC descriptors of two images on one grid, inside ``mask`` (1 is best).

    Each of the 12 descriptor channels gives a Pearson correlation over the (masked) voxels; the
    result is their mean. Descriptors come from :func:`synthmorph_app.engine.similarity.mind_ssc`
    (the optimiser's own, so the figure measures what it optimises; that flatters MIND-driven
    registration, which is why the benchmarks also show images). The images are cropped to the
    mask's bounding box and processed in slabs, so a 1 mm volume needs well under 1 GB.
    """
    import torch

    from .engine.similarity import mind_ssc

    moved = np.asarray(moved, dtype=np.float32)
    fixed = np.asarray(fixed, dtype=np.float32)
    if moved.shape != fixed.shape or moved.ndim != 3:
        raise ValueError(f'images must be 3D of one shape, got {moved.shape} and {fixed.shape}')
    if mask is None:
        mask = np.ones(fixed.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != fixed.shape:
        raise ValueError(f'mask shape {mask.shape} differs from the images\' {fixed.shape}')
    if not mask.any():
        raise ValueError('the mask is empty')
    halo = _MIND_HALO * dilation // 2
    box = tuple(slice(max(int(i.min()) - halo, 0), int(i.max()) + halo + 1)
                for i in np.nonzero(mask))
    moved, fixed, mask = moved[box], fixed[box], mask[box]
    nz = moved.shape[2]
    step = max(1, _MIND_SLAB_VOXELS // (moved.shape[0] * moved.shape[1]))
    sums = np.zeros((6, 12))  # w, wa, wb, waa, wbb, wab per channel
    with torch.no_grad():
        for z0 in range(0, nz, step):
            z1 = min(z0 + step, nz)
            lo, hi = max(z0 - halo, 0), min(z1 + halo, nz)
            inner = slice(z0 - lo, z0 - lo + (z1 - z0))
            w = mask[:, :, z0:z1]
            if not w.any():
                continue
            descs = [mind_ssc(torch.from_numpy(np.ascontiguousarray(im[:, :, lo:hi]))[None, None],
                              dilation=dilation)[0][:, :, :, inner] for im in (moved, fixed)]
            sel = torch.from_numpy(w)
            a = descs[0][:, sel].double().numpy()
            b = descs[1][:, sel].double().numpy()
            sums += np.stack([np.full(12, a.shape[1], float), a.sum(1), b.sum(1),
                              (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)])
    n, sa, sb, saa, sbb, sab = sums
    cov = sab / n - (sa / n) * (sb / n)
    var = (saa / n - (sa / n) ** 2) * (sbb / n - (sb / n) ** 2)
    return float(np.mean(cov / np.sqrt(np.clip(var, 1e-24, None))))


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation of two arrays (inside ``mask``).

    >>> a = np.arange(27.0).reshape(3, 3, 3)
    >>> round(ncc(a, 2 * a + 1), 6)
    1.0
    """
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


# --- transform regularity ----------------------------------------------------------------------


def jacobian_determinant(field: np.ndarray, grid_affine: np.ndarray,
                         affine: np.ndarray | None = None) -> np.ndarray:
    """Determinant of the Jacobian of ``T(x) = A (x + u(x))`` on the field's grid.

    ``field`` is ``(X, Y, Z, 3)`` in RAS mm on the grid ``grid_affine`` (voxel to RAS);
    derivatives are central differences in voxels (one-sided at the edges), turned into mm
    through the grid's matrix. ``det(J) = det(A) det(I + du/dx)``. Values <= 0 mark folding.
    Computed in slabs of the first axis to bound memory.
    """
    field = np.asarray(field)
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f'field must be (X, Y, Z, 3), got {field.shape}')
    inv = np.linalg.inv(np.asarray(grid_affine, dtype=float)[:3, :3])
    out = np.empty(field.shape[:3], dtype=np.float32)
    nx = field.shape[0]
    step = max(1, _JACOBIAN_SLAB_VOXELS // max(1, field.shape[1] * field.shape[2]))
    for x0 in range(0, nx, step):
        x1 = min(x0 + step, nx)
        lo, hi = max(x0 - 1, 0), min(x1 + 1, nx)
        part = field[lo:hi].astype(np.float64)
        axes = (0, 1, 2) if part.shape[0] > 1 else (1, 2)
        grads = []
        for c in range(3):
            g = np.gradient(part[..., c], axis=axes)
            if part.shape[0] == 1:
                g = [np.zeros_like(part[..., c]), *g]
            grads.append(np.stack(g, axis=-1))
        jac = np.stack(grads, axis=-2) @ inv + np.eye(3)  # du/dRAS = du/dijk @ dijk/dRAS
        out[x0:x1] = np.linalg.det(jac)[x0 - lo:x0 - lo + (x1 - x0)]
    if affine is not None:
        out *= np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])
    return out


def transform_jacobian(transform, grid=None) -> tuple[np.ndarray, object]:
    """Jacobian determinant of a :class:`~synthmorph_app.io.transforms.Transform` on ``grid``.

    ``grid`` (a :class:`~synthmorph_app.io.images.Geometry`) defaults to the transform's
    reference (fixed) grid. Returns the determinant and the grid it lies on.
    """
    from .io.transforms import displacement_on_grid

    grid = grid or transform.reference or transform.field_geometry
    if grid is None:
        raise ValueError('the transform has no grid to evaluate its Jacobian on; give one')
    if transform.field is None:
        det = np.linalg.det(transform.affine[:3, :3])
        return np.full(grid.shape, det, dtype=np.float32), grid
    if grid == transform.field_geometry:
        return jacobian_determinant(transform.field, grid.affine, transform.affine), grid
    return jacobian_determinant(displacement_on_grid(transform, grid), grid.affine), grid


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """``logjac_sd`` (SD of log det J) and ``folding_pct`` (% of voxels with det J <= 0).

    The log is taken of the positive determinants only (folded voxels are counted apart).
    """
    det = np.asarray(det)
    values = det[np.asarray(mask, dtype=bool)] if mask is not None else det.ravel()
    if values.size == 0:
        raise ValueError('no voxel to evaluate the Jacobian on (empty mask)')
    positive = values[values > 0]
    return {
        'logjac_sd': float(np.std(np.log(positive))) if positive.size else float('nan'),
        'folding_pct': float(100.0 * np.mean(values <= 0)),
    }


# --- one registration, evaluated ---------------------------------------------------------------


@dataclass
class Evaluation:
    """Figures of one registration; ``None`` where the inputs did not allow one."""

    dice: float | None = None
    dice_labels: dict = dc_field(default_factory=dict)
    mind_ncc: float | None = None
    ncc: float | None = None
    logjac_sd: float | None = None
    folding_pct: float | None = None
    voxels: int | None = None
    mask: str | None = None

    def as_dict(self, per_label: bool = True) -> dict:
        out = asdict(self)
        out['dice_labels'] = {str(k): v for k, v in self.dice_labels.items()}
        if not per_label:
            out.pop('dice_labels')
        return out

    def table(self, per_label: bool = False, names: dict | None = None) -> str:
        """A plain-text table (metric, value) for a terminal."""
        rows = [('metric', 'value')]
        for key in ('dice', 'mind_ncc', 'ncc', 'logjac_sd', 'folding_pct'):
            value = getattr(self, key)
            if value is not None:
                rows.append((key, f'{value:.4f}'))
        if self.dice_labels:
            rows.append(('labels', str(len(self.dice_labels))))
        if self.mask:
            rows.append(('mask', f'{self.mask} ({self.voxels} voxels)'))
        if per_label:
            for label, value in self.dice_labels.items():
                name = (names or {}).get(label, '')
                rows.append((f'dice {label} {name}'.rstrip(), f'{value:.4f}'))
        width = max(len(r[0]) for r in rows)
        return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def evaluate(fixed: np.ndarray | None = None, moved: np.ndarray | None = None, *,
             fixed_labels: np.ndarray | None = None, moved_labels: np.ndarray | None = None,
             jacobian: np.ndarray | None = None, mask: np.ndarray | None = None,
             labels: Sequence[int] | None = None, largest: int | None = None,
             mask_name: str | None = None) -> Evaluation:
    """Evaluate one registration from arrays that already lie on the fixed grid.

    - Dice when both label maps are given (``labels``, or the ``largest`` N of the fixed map,
      or every label present in both);
    - MIND-NCC (and plain NCC) when both images are given, inside ``mask``;
    - Jacobian spread and folding when ``jacobian`` (the determinant) is given, inside ``mask``.

    ``mask`` defaults to the fixed labels > 0 when given, else the whole grid.
    """
    out = Evaluation()
    if mask is None and fixed_labels is not None:
        mask = np.asarray(fixed_labels) > 0
        mask_name = mask_name or 'fixed labels > 0'
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        out.voxels = int(mask.sum())
        out.mask = mask_name or 'mask'
    if fixed_labels is not None and moved_labels is not None:
        if largest:
            present = np.intersect1d(np.unique(np.rint(moved_labels)),
                                     np.unique(np.rint(fixed_labels)))
            labels = largest_labels(fixed_labels, largest, among=present)
        out.dice_labels = dice_per_label(moved_labels, fixed_labels, labels)
        out.dice = mean_dice(out.dice_labels)
    if fixed is not None and moved is not None:
        out.mind_ncc = mind_ncc(moved, fixed, mask)
        out.ncc = ncc(moved, fixed, mask)
    if jacobian is not None:
        stats = jacobian_stats(jacobian, mask)
        out.logjac_sd, out.folding_pct = stats['logjac_sd'], stats['folding_pct']
    return out


def evaluate_files(fixed: str, moving: str | None = None, transform: str | None = None, *,
                   fixed_labels: str | None = None, moving_labels: str | None = None,
                   mask: str | None = None, labels: Sequence[int] | None = None,
                   largest: int | None = None, field_convention: str = 'itk',
                   device: str = 'cpu') -> Evaluation:
    """:func:`evaluate` from files: resample the moving side onto the fixed grid first.

    With ``transform`` (any format ``register`` writes, fixed -> moving points) the moving image
    is resampled linearly and its labels by nearest neighbour; without it, they are resampled
    through their headers (world coordinates), which leaves arrays on the fixed grid untouched.
    The Jacobian figures need ``transform``. Input problems raise the package's errors naming
    the file.
    """
    from .engine.register import moved_image
    from .io.images import Geometry, load_image
    from .io.transforms import Transform, load_transform

    fixed_img = load_image(fixed, kind='fixed image')
    grid = Geometry.from_image(fixed_img)
    moving_img = load_image(moving, kind='moving image') if moving else None
    xfm = None
    if transform:
        source = Geometry.from_image(moving_img) if moving_img is not None else None
        xfm = load_transform(transform, reference=grid, moving=source,
                             field_convention=field_convention)
    identity = Transform(reference=grid)

    def onto_fixed(img, method):
        data = moved_image(img, xfm or identity, grid, mode=method, dtype=np.float32,
                           device=device)
        return np.asanyarray(data.dataobj)

    fixed_data = fixed_img.get_fdata(dtype=np.float32)
    moved_data = onto_fixed(moving_img, 'linear') if moving_img is not None else None
    flab = mlab = None
    if fixed_labels:
        flab = np.asanyarray(load_image(fixed_labels, kind='fixed label map').dataobj)
        if flab.shape != grid.shape:
            from .errors import InputImageError

            raise InputImageError(f'the fixed label map <{fixed_labels}> has shape {flab.shape}, '
                                  f'the fixed image {grid.shape}: they must share one grid')
    if moving_labels:
        mlab = onto_fixed(load_image(moving_labels, kind='moving label map'), 'nearest')
    mask_data = mask_name = None
    if mask:
        mask_img = load_image(mask, kind='mask')
        mask_data = onto_fixed(mask_img, 'nearest') > 0
        mask_name = str(mask)
    det = transform_jacobian(xfm, grid)[0] if xfm is not None else None
    return evaluate(fixed_data if moved_data is not None else None, moved_data,
                    fixed_labels=flab, moved_labels=mlab, jacobian=det, mask=mask_data,
                    labels=labels, largest=largest, mask_name=mask_name)


def to_json(result: Evaluation, per_label: bool = True) -> str:
    return json.dumps(result.as_dict(per_label), indent=2)
