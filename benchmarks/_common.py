"""Shared machinery of the benchmark scripts in ``benchmarks/`` (not part of the package).

How every script measures, so their figures compare:

- **One method, one fresh process.** Each registration runs in a child process started with
  ``spawn`` (:func:`in_child`), which reports its own peak resident memory (:func:`peak_mb`;
  this includes the Python baseline of the libraries that method imports) and times the registration itself (not imports, not writing results).
- **One representation.** A runner returns the result as a fixed-to-moving world transform
  ``T(x) = A (x + u(x))`` (:class:`synthmorph_app.io.transforms.Transform`: ``A`` a 4x4 RAS
  matrix, ``u`` a RAS-mm field on a grid), whatever the tool wrote: greedy's RAS matrix and LPS
  warp, ANTs' ITK ``.mat`` and LPS warp, FireANTs' sampling coordinates, ConvexAdam's voxel
  displacements after an affine.
- **One resampler, one metrics module.** The parent resamples moving labels (nearest neighbour)
  and images (linear) onto the fixed grid with :func:`synthmorph_app.engine.spatial.
  apply_transform` in one step through the composed transform, and scores with
  :mod:`synthmorph_app.evaluate` (Dice, MIND-NCC, log-Jacobian SD, % folding): the figures mean
  what ``synthmorph-app evaluate`` reports.

Threads: call :func:`pin_threads` before torch is imported; children inherit the environment
(``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``) and set torch's count again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get('SYNTHMORPH_SHARED_DATA', REPO.parent / 'shared' / 'data'))

#: greedy's settings in all scripts: affine (-ia-image-centers, 100x50x10), then deformable.
GREEDY_ITERATIONS = '100x50x10'
#: LPS <-> RAS flip of ITK coordinates.
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def add_register_options(parser, flag: str, example: str) -> None:
    """Add ``flag``: further ``register`` options as one quoted string, parsed into a list."""
    parser.add_argument(flag, type=shlex.split, default='', metavar='"OPTIONS"',
                        help=f'further `register` options, one quoted string (e.g. "{example}")')


def pin_threads(threads: int) -> None:
    """Pin every library to ``threads`` threads (before torch, ITK or numpy's BLAS start)."""
    for key in (
        'OMP_NUM_THREADS',
        'MKL_NUM_THREADS',
        'OPENBLAS_NUM_THREADS',
        'ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS',
    ):
        os.environ[key] = str(threads)
    if 'torch' in sys.modules:
        sys.modules['torch'].set_num_threads(threads)


def _torch_threads():
    import torch

    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    return torch


# --- child processes ---------------------------------------------------------------------------


def peak_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: on Linux that survives ``exec`` and so includes the parent's resident
    size at the fork that started a spawned child.
    """
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measured(func, args, kwargs):
    out = func(*args, **kwargs)
    out['peak_mb'] = peak_mb()
    return out


def in_child(func, *args, **kwargs) -> dict:
    """Run ``func(*args, **kwargs)`` (a module-level function returning a dict) in a fresh
    ``spawn`` process; add ``peak_mb``, the child's peak resident memory in MB."""
    import multiprocessing

    ctx = multiprocessing.get_context('spawn')
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_measured, func, args, kwargs).result()


@contextlib.contextmanager
def quiet():
    """Silence C++ tools (greedy, ANTs) and chatty Python ones that print to stdout/stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _transform_dict(affine, field=None, field_grid=None) -> dict:
    """What runners return: plain arrays, cheap to pickle."""
    return {
        'affine': np.asarray(affine, dtype=float),
        'field': None if field is None else np.asarray(field, dtype=np.float32),
        'field_shape': None if field_grid is None else tuple(field_grid.shape),
        'field_affine': None if field_grid is None else np.asarray(field_grid.affine),
    }


def as_transform(result: dict, fixed_grid, moving_grid, linear: bool = False):
    """The :class:`Transform` of a runner's result (only its affine part with ``linear``)."""
    from synthmorph_app.io.images import Geometry
    from synthmorph_app.io.transforms import Transform

    if linear or result.get('field') is None:
        return Transform(result['affine'], reference=fixed_grid, moving=moving_grid)
    grid = Geometry(result['field_shape'], result['field_affine'])
    return Transform(result['affine'], result['field'], grid, fixed_grid, moving_grid)


def _itk_field_ras(path: str):
    """An ITK displacement image (LPS vectors on its grid) as (RAS field, Geometry)."""
    import nibabel as nb

    from synthmorph_app.io.images import Geometry

    img = nb.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(*img.shape[:3], 3) * np.array([-1.0, -1.0, 1.0], np.float32)
    return data, Geometry(tuple(img.shape[:3]), img.affine)


# --- runners (each in its own child) -----------------------------------------------------------


def run_none(moving: str, fixed: str) -> dict:
    """No registration: the identity in world space (each image's own header), the "before"
    row. Nothing runs, so no time or memory."""
    return {**_transform_dict(np.eye(4)), 'time': 0.0, 'peak_mb': None}


def run_register(moving: str, fixed: str, mode: str, threads: int = 1,
                 options: list[str] | tuple = ()) -> dict:
    """Ours through the public API, exactly as ``synthmorph-app register -m MODE -j N`` runs.

    ``options`` are further ``register`` arguments (e.g. ``['-r', '0.3']``); the others are
    the register parser's defaults (``--refine`` 15 unless
    ``$SYNTHMORPH_REFINE`` is set, ``--init network``, metric ``auto``, weight ``brain``, lambda
    0.5, the packaged models, masks only from ``-x``/``--moving-mask``); the keywords come from
    ``cli.run.run_registration``, as the command's (``--via`` included). The time covers
    that call (it reads the lazily loaded image data, as the command does).
    """
    torch = _torch_threads()
    from synthmorph_app.cli.parser import build_parser
    from synthmorph_app.cli.run import run_registration
    from synthmorph_app.io.images import load_image, load_masks

    args = build_parser().parse_args(
        ['register', '-m', mode, '-j', str(threads), *options, moving, fixed])
    torch.set_num_threads(args.threads)
    mimg = load_image(args.moving, kind='moving image')
    fimg = load_image(args.fixed, kind='fixed image')
    masks = load_masks(args.fixed_mask, args.moving_mask, fixed_lesion=args.fixed_lesion_mask,
                       moving_lesion=args.moving_lesion_mask)
    t0 = time.perf_counter()
    result = run_registration(args, mimg, fimg, masks=masks)
    elapsed = time.perf_counter() - t0
    fwd = result.forward
    out = _transform_dict(fwd.affine, fwd.field, fwd.field_geometry)
    out.update(time=elapsed, stages=dict(result.timings), refine=args.refine,
               info=json.loads(json.dumps(result.info, default=str)))
    return out


def run_greedy(moving: str, fixed: str, metric: str = 'NCC 2x2x2', threads: int = 1,
               deformable: bool = True, dof: int = 12, init: str = 'image-centers',
               moving_mask: str | None = None) -> dict:
    """``picsl_greedy``: ``dof``-DOF linear stage (12: affine, 6: rigid), then the deformable step.

    ``init`` starts the linear stage: ``'image-centers'`` (``-ia-image-centers``) or
    ``'moments'``: greedy's ``-moments 1`` (the centres of mass matched; this build rejects
    ``-ia-moments``), then a rigid stage from it, which starts the ``dof`` stage (from the
    centres of mass alone, greedy's 12-DOF NMI and MI diverge on FLAIR -> MNI).

    Both use ``-n 100x50x10 -m METRIC`` and greedy's default smoothing; ``moving_mask`` (a
    file) is passed as ``-mm`` to both stages (moving pixels outside it leave the metric).
    Returns the full transform, with ``affine_time`` the time of the affine stage.
    """
    from picsl_greedy import Greedy3D

    base = f'-threads {threads} -d 3 -i {fixed} {moving} -n {GREEDY_ITERATIONS} -m {metric}'
    if moving_mask:
        base += f' -mm {moving_mask}'
    with tempfile.TemporaryDirectory() as tmp, quiet():
        aff, warp = f'{tmp}/aff.mat', f'{tmp}/warp.nii.gz'
        t0 = time.perf_counter()
        g = Greedy3D()
        start = '-ia-image-centers'
        if init == 'moments':
            g.execute(f'-threads {threads} -d 3 -i {fixed} {moving} -moments 1 -o {tmp}/mom.mat')
            g.execute(f'{base} -a -dof 6 -ia {tmp}/mom.mat -o {tmp}/rigid.mat')
            start = f'-ia {tmp}/rigid.mat'
        elif init != 'image-centers':
            raise ValueError(f"init must be 'image-centers' or 'moments', got {init!r}")
        g.execute(f'{base} -a -dof {dof} {start} -o {aff}')
        t_aff = time.perf_counter() - t0
        if deformable:
            g.execute(f'{base} -it {aff} -o {warp}')
        elapsed = time.perf_counter() - t0
        affine = np.loadtxt(aff)  # RAS, fixed -> moving
        field, grid = _itk_field_ras(warp) if deformable else (None, None)
    out = _transform_dict(affine, field, grid)
    out.update(time=elapsed, affine_time=t_aff)
    return out


def run_ants(moving: str, fixed: str, transform: str = 'SyN', threads: int = 1,
             moving_mask: str | None = None, seed: int = 42, **kwargs) -> dict:
    """antspyx ``registration(fixed, moving, transform, **kwargs)`` (its defaults otherwise:
    ``mattes`` MI for the affine and SyN stages), deterministic: ``seed`` fixes the random
    sampling of its affine metric (20 % of the voxels). ``moving_mask`` (a file) is read and
    passed as antspyx's ``moving_mask`` for every stage (``mask_all_stages``)."""
    os.environ['ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS'] = str(threads)
    import ants

    from synthmorph_app.io.transforms import load_transform

    ants.config.set_ants_deterministic(True, seed)
    fimg, mimg = ants.image_read(str(fixed)), ants.image_read(str(moving))
    if moving_mask:
        kwargs.update(moving_mask=ants.image_read(str(moving_mask)), mask_all_stages=True)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        t0 = time.perf_counter()
        reg = ants.registration(fimg, mimg, transform, outprefix=f'{tmp}/x_', **kwargs)
        elapsed = time.perf_counter() - t0
        files = reg['fwdtransforms']
        affine = load_transform(files[-1]).affine
        field = grid = None
        if len(files) > 1:
            field, grid = _itk_field_ras(files[0])
    out = _transform_dict(affine, field, grid)
    out.update(time=elapsed)
    return out


def run_fireants(moving: str, fixed: str, threads: int = 1, affine: str = 'greedy') -> dict:
    """FireANTs 1.5 on the CPU: greedy deformable (CC) after an affine.

    ``affine`` is ``'greedy'`` (greedy's affine, NCC, as :func:`run_greedy`; default),
    ``'ants'`` (antspyx ``Affine``) or ``'own'``: FireANTs' ``MomentsRegistration(scale=1)`` and
    ``AffineRegistration([8, 4, 2, 1], [200, 100, 50, 20], cc, Adam lr 3e-3)`` (its README's
    settings), which fail on our whole-head pairs with neck (Dice after affine 0.04-0.08 on
    01->02 and 03->04; 0.10 with MI; its ``moments=2`` picked a 180-degree flip). Deformable:
    ``GreedyRegistration([4, 2, 1], [200, 100, 50], cc 5, smooth_grad_sigma 1,
    smooth_warp_sigma 0.5, Adam lr 0.5)``. The transform is read back from the sampling
    coordinates FireANTs uses (``get_warped_coordinates``), so nothing is lost in a file format.
    The time includes the affine.
    """
    torch = _torch_threads()
    import nibabel as nb

    with quiet():  # FireANTs prints about its optional fused CUDA ops on import
        from fireants.io.image import BatchedImages, Image
        from fireants.registration.affine import AffineRegistration
        from fireants.registration.greedy import GreedyRegistration
        from fireants.registration.moments import MomentsRegistration

    from synthmorph_app.io.images import Geometry

    t0 = time.perf_counter()
    if affine == 'greedy':
        init = run_greedy(moving, fixed, 'NCC 2x2x2', threads, deformable=False)['affine']
    elif affine == 'ants':
        init = run_ants(moving, fixed, 'Affine', threads)['affine']
    with quiet():
        fimg = Image.load_file(str(fixed), device='cpu')
        mimg = Image.load_file(str(moving), device='cpu')
        fb, mb = BatchedImages([fimg]), BatchedImages([mimg])
        if affine == 'own':
            moments = MomentsRegistration(1, fb, mb, progress_bar=False)
            moments.optimize()
            aff = AffineRegistration([8, 4, 2, 1], [200, 100, 50, 20], fb, mb, loss_type='cc',
                                     optimizer='Adam', optimizer_lr=3e-3,
                                     init_rigid=moments.get_affine_init(), progress_bar=False)
            aff.optimize()
            lps_affine = aff.get_affine_matrix().detach()
        else:
            lps_affine = torch.as_tensor(LPS @ init @ LPS, dtype=torch.float32)[None]
        t_aff = time.perf_counter() - t0
        reg = GreedyRegistration([4, 2, 1], [200, 100, 50], fb, mb, cc_kernel_size=5,
                                 deformation_type='compositive', smooth_grad_sigma=1.0,
                                 smooth_warp_sigma=0.5, optimizer='Adam', optimizer_lr=0.5,
                                 init_affine=lps_affine, progress_bar=False)
        reg.optimize()
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            coords = reg.get_warped_coordinates(fb, mb)[0]  # (Z, Y, X, 3) torch coords (x, y, z)
            ones = torch.ones_like(coords[..., :1])
            phys = torch.cat([coords, ones], -1) @ mb.get_torch2phy()[0].T  # LPS mm
            phys = phys[..., :3].permute(2, 1, 0, 3).double().numpy()  # (X, Y, Z, 3), nibabel
    affine = LPS @ lps_affine[0].double().numpy() @ LPS  # RAS, fixed -> moving
    fgeo = Geometry.from_image(nb.load(str(fixed)))
    moving_ras = phys * np.array([-1.0, -1.0, 1.0])
    # T(x) = A (x + u(x))  =>  u(x) = A^-1 m(x) - x
    inv = np.linalg.inv(affine)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in fgeo.shape], indexing='ij'), -1)
    fixed_ras = ijk @ fgeo.affine[:3, :3].T + fgeo.affine[:3, 3]
    field = moving_ras @ inv[:3, :3].T + inv[:3, 3] - fixed_ras
    out = _transform_dict(affine, field, fgeo)
    out.update(time=elapsed, affine_time=t_aff)
    return out


def run_convexadam(moving: str, fixed: str, threads: int = 1, affine: str = 'ants') -> dict:
    """ConvexAdam (MIND-SSC variant, ``convex_adam_pt`` defaults) after an affine.

    ``affine`` is ``'ants'`` (antspyx ``Affine``, its defaults: MI) or ``'greedy'`` (greedy's
    affine with NMI). The moving image is resampled onto the fixed grid through it (trilinear),
    ConvexAdam returns voxel displacements ``d`` on that grid (moved(x) = moving(x + d(x)), as
    its ``apply_convex``), so ``T(x) = A (x + R d(x))`` with ``R`` the fixed grid's matrix. The
    time includes the affine.
    """
    torch = _torch_threads()
    import nibabel as nb
    from convexAdam.convex_adam_MIND import convex_adam_pt

    from synthmorph_app.engine import spatial
    from synthmorph_app.io.images import Geometry

    t0 = time.perf_counter()
    if affine == 'ants':
        lin = run_ants(moving, fixed, 'Affine', threads)
    else:
        lin = run_greedy(moving, fixed, 'NMI', threads, deformable=False)
    t_aff = time.perf_counter() - t0
    fimg, mimg = nb.load(str(fixed)), nb.load(str(moving))
    fgeo, mgeo = Geometry.from_image(fimg), Geometry.from_image(mimg)
    fdata = np.asarray(fimg.dataobj, dtype=np.float32)
    mdata = spatial.volume_tensor(np.asarray(mimg.dataobj, dtype=np.float32))
    with torch.no_grad():
        moved = spatial.resample_linear(mdata, mgeo, fgeo, lin['affine'])[0, 0]
    with quiet():
        disp = convex_adam_pt(torch.from_numpy(fdata), moved, device=torch.device('cpu'))
    elapsed = time.perf_counter() - t0
    field = disp @ fgeo.affine[:3, :3].T
    out = _transform_dict(lin['affine'], field, fgeo)
    out.update(time=elapsed, affine_time=t_aff)
    return out


# --- evaluation (parent) -----------------------------------------------------------------------


def start_mirror(out) -> Path:
    """A fresh mirror folder ``out`` of the shared data for a benchmark to run on altered
    images (``SYNTHMORPH_SHARED_DATA=out``): the templates, FreeSurfer subjects and label maps
    are linked, and so is everything in ``bids/`` but the subjects, which the caller writes.
    Returns the mirror's ``bids`` folder."""
    import shutil

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    (out / 'bids').mkdir(parents=True)
    for name in ('templateflow', 'freesurfer', 'label_maps'):
        os.symlink(DATA / name, out / name)
    for item in (DATA / 'bids').iterdir():
        if not item.name.startswith('sub-'):
            os.symlink(item, out / 'bids' / item.name)
    return out / 'bids'


def dlmuse_labels(sub: str) -> Path:
    """The DLMUSE label map of ``bids/sub-<sub>`` (on its T1w's grid)."""
    return (DATA / 'bids' / 'derivatives' / 'dlmuse' / f'sub-{sub}' / 'anat'
            / f'sub-{sub}_space-T1w_desc-dlmuse_dseg.nii.gz')


def mirror_t1w(out, alter) -> None:
    """A mirror of the shared data (:func:`start_mirror`) in which every T1w of ``bids/`` that
    has DLMUSE labels is replaced by ``alter(image, labels)`` (two nibabel images; it returns
    the new image and a line to print); every other file of the subjects is linked."""
    import nibabel as nb

    mirror = start_mirror(out)
    for subject in sorted(p for p in (DATA / 'bids').glob('sub-*') if p.is_dir()):
        src, dst = subject / 'anat', mirror / subject.name / 'anat'
        dst.mkdir(parents=True)
        label_file = dlmuse_labels(subject.name[4:])
        for image in sorted(src.iterdir()):
            if not image.name.endswith('_T1w.nii.gz') or not label_file.exists():
                os.symlink(image, dst / image.name)
                continue
            new, line = alter(nb.load(str(image)), nb.load(str(label_file)))
            nb.save(new, str(dst / image.name))
            print(f'{image.name}: {line}', flush=True)


def superior_axis(image) -> int:
    """The voxel axis of a nibabel image that runs nearest to superior (world S)."""
    return int(np.argmax(np.abs(image.affine[2, :3]) / image.header.get_zooms()[:3]))


def load(path) -> tuple[np.ndarray, object]:
    """Array (float32) and Geometry of an image file."""
    from synthmorph_app.io.images import Geometry, load_image

    img = load_image(path)
    return np.asarray(img.dataobj, dtype=np.float32), Geometry.from_image(img)


def moved(data: np.ndarray, source, xfm, target, mode: str = 'linear') -> np.ndarray:
    """``data`` (on ``source``) resampled onto ``target`` through ``xfm`` (one resampling)."""
    import torch

    from synthmorph_app.engine import spatial

    with torch.inference_mode():
        vol = spatial.volume_tensor(np.asarray(data, dtype=np.float32))
        return spatial.apply_transform(vol, source, xfm, target, mode=mode)[0, 0].numpy()


def score(result: dict, moving, fixed, *, moving_labels=None, fixed_labels=None, labels=None,
          mind_mask=None, jac_masks: dict | None = None, sd_mask: str | None = None,
          linear: bool = False, per_label: bool = False) -> dict:
    """Figures of one result: Dice (``labels``), MIND-NCC in ``mind_mask``, log-Jacobian SD in
    ``jac_masks[sd_mask]`` and % folding in each of ``jac_masks``.

    ``moving``/``fixed`` are ``(array, Geometry)`` pairs; ``linear`` scores the affine part only;
    ``per_label`` adds ``dice_labels`` (label -> Dice).
    """
    from synthmorph_app import evaluate

    (mdata, mgrid), (fdata, fgrid) = moving, fixed
    xfm = as_transform(result, fgrid, mgrid, linear=linear)
    row = {}
    if moving_labels is not None and fixed_labels is not None:
        mlab = moved(moving_labels, mgrid, xfm, fgrid, mode='nearest')
        scores = evaluate.dice_per_label(mlab, fixed_labels, labels)
        row['dice'] = evaluate.mean_dice(scores)
        if per_label:
            row['dice_labels'] = {str(k): v for k, v in scores.items()}
    if mind_mask is not None:
        row['mind_ncc'] = evaluate.mind_ncc(moved(mdata, mgrid, xfm, fgrid), fdata, mind_mask)
    if jac_masks and not xfm.is_linear:
        det, _ = evaluate.transform_jacobian(xfm, fgrid)
        for name, mask in jac_masks.items():
            stats = evaluate.jacobian_stats(det, mask)
            row[f'fold_{name}'] = stats['folding_pct']
            if name == sd_mask:
                row['sd_logj'] = stats['logjac_sd']
    return row


# --- output ------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '-'
    if isinstance(value, float):
        return f'{value:.{digits}f}'
    return str(value)


#: Columns of the benchmarks' tables: key -> (header, digits).
COLUMN_SPECS = {
    'pair': ('pair', 0),
    'method': ('method', 0),
    'pairs': ('pairs', 0),
    'dice_aff': ('Dice after affine', 3),
    'dice': ('Dice', 3),
    'worst_dice': ('worst pair', 3),
    'mind_ncc': ('MIND-NCC', 3),
    'mind_brain': ('MIND-NCC brain', 3),
    'mind_head': ('MIND-NCC head', 3),
    'sd_logj': ('SD log J', 3),
    'fold_brain': ('fold % brain', 3),
    'fold_head': ('fold % head', 3),
    'fold_grid': ('fold % grid', 3),
    'time': ('time (s)', 1),
    'time_ratio': ('time / greedy', 2),
    'peak_mb': ('peak MB', 0),
}
#: Short names of the figures in the progress lines (:func:`print_row`).
_SHORT = {'dice_aff': 'Dice aff', 'mind_ncc': 'MIND', 'mind_brain': 'MIND brain',
          'mind_head': 'MIND head', 'sd_logj': 'SDlogJ', 'fold_brain': 'fold brain',
          'fold_head': 'fold head', 'fold_grid': 'fold grid'}


def columns(*keys: str, **headers: str) -> list[tuple[str, str, int]]:
    """``(key, header, digits)`` of :data:`COLUMN_SPECS` for :func:`markdown`; ``headers``
    renames some (``columns('method', 'dice', dice='mean Dice')``)."""
    return [(k, headers.get(k, COLUMN_SPECS[k][0]), COLUMN_SPECS[k][1]) for k in keys]


def result_row(pair: str, method: str, result: dict, **extra) -> dict:
    """The start of a table row for one method's ``result`` (a runner's dict)."""
    return {'pair': pair, 'method': method, 'time': result['time'],
            'peak_mb': result['peak_mb'], 'stages': result.get('stages'), **extra}


def print_row(row: dict, keys, width: int = 12) -> None:
    """One progress line of a scored row: pair, method, the figures ``keys``, time, memory and
    the stages of ours (``RegistrationResult.timings``)."""
    figures = ' '.join(f'{_SHORT.get(k, k.capitalize())} {fmt(row.get(k))}' for k in keys)
    stages = ''
    if row.get('stages'):
        stages = ' (' + ', '.join(f'{k} {v:.1f}' for k, v in row['stages'].items()) + ')'
    print(f'{row["pair"]} {row["method"]:{width}} {figures} {fmt(row["time"], 1)} s '
          f'{fmt(row["peak_mb"], 0)} MB{stages}', flush=True)


def add_time_ratios(rows: list[dict], greedy: str = 'greedy-syn') -> None:
    """Set each row's ``time_ratio``: its time over that of the row of method ``greedy`` (the
    same pair, run side by side), or None without one."""
    ref = next((r['time'] for r in rows if r['method'] == greedy), None)
    for row in rows:
        row['time_ratio'] = row['time'] / ref if ref else None


def markdown(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """A Markdown table of ``rows``: ``columns`` are (key, header, digits)."""
    lines = ['| ' + ' | '.join(h for _, h, _ in columns) + ' |',
             '|' + '|'.join('---' for _ in columns) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(fmt(row.get(k), d) for k, _, d in columns) + ' |')
    return '\n'.join(lines)


def summarise(rows: list[dict], keys: list[str], by: str = 'method') -> list[dict]:
    """Mean of ``keys`` per ``by`` value (in order of appearance), plus the worst ``dice``."""
    out = []
    for name in dict.fromkeys(r[by] for r in rows):
        sel = [r for r in rows if r[by] == name]
        row = {by: name, 'pairs': len(sel)}
        for key in keys:
            vals = [r[key] for r in sel if r.get(key) is not None and not _isnan(r[key])]
            row[key] = float(np.mean(vals)) if vals else None
        dices = [r['dice'] for r in sel if r.get('dice') is not None]
        if dices:
            row['worst_dice'] = float(min(dices))
        mind = [r['mind_ncc'] for r in sel if r.get('mind_ncc') is not None]
        if mind:
            row['worst_mind_ncc'] = float(min(mind))
        out.append(row)
    return out


def plot_dice_and_spread(summary: list[dict], path, xlabel: str, dice_label: str,
                         title: str, fontsize: int | None = None) -> None:
    """Mean Dice (left axis) and SD of the log Jacobian (right axis) against ``lambda``, for
    rows of :func:`summarise` ``(by='lambda')``; a PNG at ``path``."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lams = [r['lambda'] for r in summary]
    fig, left = plt.subplots(figsize=(5, 3.2), dpi=120)
    left.plot(lams, [r['dice'] for r in summary], 'o-', color='tab:blue')
    left.set_xlabel(xlabel)
    left.set_ylabel(dice_label, color='tab:blue')
    right = left.twinx()
    right.plot(lams, [r['sd_logj'] for r in summary], 's--', color='tab:red')
    right.set_ylabel('SD of log Jacobian (brain)', color='tab:red')
    left.set_title(title, fontsize=fontsize)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _isnan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_json(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + '\n')


def write_results(path, script: str, argv, rows: list[dict], **extra) -> None:
    """Write a benchmark's figures to ``path``: the ``script`` name, its arguments (``argv``,
    or ``sys.argv[1:]`` when None), the machine (:func:`environment`), the ``rows`` and any
    ``extra`` fields (a summary, say)."""
    write_json(path, {'script': script, 'argv': sys.argv[1:] if argv is None else argv,
                      'environment': environment(), 'rows': rows, **extra})


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def environment() -> dict:
    """Versions and machine facts for the JSON."""
    import platform
    from importlib import metadata

    versions = {}
    for pkg in ('synthmorph-app', 'torch', 'antspyx', 'picsl_greedy', 'fireants', 'convexadam'):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    import subprocess

    def git(*words):
        try:
            return subprocess.run(['git', *words], cwd=REPO, capture_output=True, text=True,
                                  timeout=30, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        'git_commit': git('rev-parse', '--short', 'HEAD'),
        'git_dirty_engine': bool(git('status', '--porcelain', '--', 'synthmorph_app')),
        'versions': versions,
        'python': platform.python_version(),
        'cpus': os.cpu_count(),
        'load_average': os.getloadavg(),
        'threads': os.environ.get('OMP_NUM_THREADS'),
        'refine_env': os.environ.get('SYNTHMORPH_REFINE'),
        'date': time.strftime('%Y-%m-%d %H:%M'),
    }
