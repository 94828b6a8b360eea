"""The public registration API: register two nibabel images, get world-space transforms.

>>> from synthmorph_app.engine.register import register          # doctest: +SKIP
>>> result = register(moving_img, fixed_img, mode='joint')        # doctest: +SKIP
>>> fixed_to_moving = result.forward    # doctest: +SKIP
>>> moving_to_fixed = result.inverse    # doctest: +SKIP

``result.forward`` maps fixed RAS to moving RAS (it pulls the moving image onto the fixed
grid), ``result.inverse`` moving RAS to fixed RAS (it pulls the fixed image onto the moving
grid).

How a joint registration runs (as ``mri_synthmorph``'s, in world space throughout):

1. Each image is resampled into its own network grid (:func:`spatial.network_grid`: isotropic
   LIA, centred on its field of view) and normalised to [0, 1].
2. The affine (or rigid) network gives a voxel matrix between the two grids, turned into a RAS
   matrix ``A`` (fixed -> moving).
3. Both images go to a mid-space through the matrix square root ``H`` (``H @ H = A``): the
   fixed image through ``H^-1``, the moving through ``H``. The deformable network runs on both
   orders, ``v = (D(m, f) - D(f, m)) / 2``; the forward warp is ``exp(v)``, the inverse
   ``exp(-v)``, so forward and inverse are consistent by construction.
4. Optional test-time refinement (``refine > 0``) optimises ``v`` (and ``A`` first) from the
   network's prediction.
5. The result is stored as ``T(x) = A (x + w(x))``, the order of an ITK composite
   ``[affine, field]``, with the field ``w`` on the fixed image's grid when that grid is at
   most 4 times the network's (a 1 or 2 mm template), else on the mid-space network grid mapped into
   the fixed space by ``H^-1`` (network resolution, no resampling onto a 1 mm grid); the
   inverse's likewise on the moving side.

Nothing depends on how the inputs are stored on disk: every step works in RAS millimetres, on
each image's voxels reordered to LIA (:func:`spatial.lia_order`), so the same image stored LPS,
RAS or PIR gives the same result to the last digit; fields on an image's grid come back in its
own order.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from functools import partial

import nibabel as nb
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SynthMorphError
from ..io.images import Geometry
from ..io.transforms import Transform
from . import DEFAULT_REFINE, DEFAULT_REFINE_LEVELS, spatial
from .allocator import keep_freed_memory
from .intensity import (
    clean_intensities,
    clear_noisy_background,
    intensity_limits,
    normalize_intensity,
)

LOGGER = logging.getLogger('synthmorph_app.engine.register')

MODES = ('joint', 'deform', 'affine', 'rigid')
#: Default side of the network space in mm (``-e``): 256 mm holds any adult head.
DEFAULT_EXTENT = 256.0
#: Levels (mm) and Adam iterations of the affine refinement. The steps at 2 mm sharpen
#: same-subject cross-contrast alignment (sub-chris PDw -> T1w: MIND-NCC in the brain 0.494 ->
#: 0.516, greedy 0.512, ANTs 0.514). Twelve rather than six brought the same-person pair
#: sub-08 -> sub-09 from 0.768 to 0.772 Dice; 24 rather than 12 let the level converge
#: (session 40, benchmarks/README.md): images moved by known affines come back within 0.10 mm
#: instead of 0.13 (28 of 32 closer), `-m rigid` slabs of bert 0.04-0.16 mm instead of
#: 0.08-0.34, bert -> fsaverage 0.6715 -> 0.676 (ANTs Affine 0.672-0.677 over six seeds), for
#: 1-2 s more; across people the rest moves within 0.003 either way (the BIDS-App's
#: ``--mode affine`` job 0.530 -> 0.527). Joint mode stops at 4 mm and does not use it.
AFFINE_LEVELS = (8.0, 4.0, 2.0)
AFFINE_ITERATIONS = (60, 40, 24)
#: In joint mode the deformable step follows at 2 mm, so the affine stops at 4 mm: 2-3 s less
#: per 2 mm pair (benchmarks/README.md, "Session 3 changes", has what it changes).
JOINT_AFFINE_LEVELS = AFFINE_LEVELS[:2]
JOINT_AFFINE_ITERATIONS = AFFINE_ITERATIONS[:2]
#: An image whose field of view is thinner than this (mm) along one of its voxel axes is a
#: slab: at 8 mm it is a few voxels thick, too few to judge a pose across contrasts, so the
#: pose search runs at ``SLAB_SEARCH_MM`` and the affine levels start there (a 38 mm PDw slab
#: of sub-chris onto its T1w: 52 mm off -> 0.2 mm from where the whole PDw lands).
SLAB_MM = 90.0
SLAB_SEARCH_MM = 4.0
#: An image smaller than this (mm) along two axes is warned about: not a head, not a slab.
SMALL_FOV_MM = 60.0
#: An image larger than this (mm) along two axes is warned about too: no scan of a head is
#: (a body coil's field of view is about 500 mm); most likely its voxel sizes are wrong.
LARGE_FOV_MM = 600.0
#: An image whose field of view cuts its head (the head mask, cut to the top 140 mm, meets a
#: face of the image over more than this many cm^2) takes the slab's path too: a cut 50 mm
#: into the brain from below misled the 8 mm level into a pose shrunk by a quarter, which the
#: 4 mm search avoids (``benchmarks/README.md``, "Session 27: clipped fields of view").
CUT_HEAD_CM2 = 50.0
#: The refined velocity field is held at twice each level's image spacing (SynthMorph's
#: half-resolution SVF), except at the finest level, where its spacing is twice the finer
#: input's voxel size, between one and two times the level's spacing. A 1 mm pair thus gets a
#: 2 mm field at the 2 mm level, and a 2 mm pair keeps its 4 mm field and its time. bert ->
#: MNI152NLin6Asym: Dice 0.703 -> 0.711 (greedy 0.708), bert -> fsaverage 0.788 -> 0.784
#: (greedy 0.784), about 16 -> 24 s (greedy 171-444 s); 3 mm fields gave 0.707 and 0.788 in
#: 16 s (benchmarks/README.md, "Session 4").
FIELD_SPACING_PER_INPUT_VOXEL = 2.0

#: The deformable refinement's similarity counts only this far (mm) inside the moving image's
#: field of view.
FOV_ERODE_MM = 4.0
#: The refinement's margin around the fixed weight's box, over which the field tapers to zero
#: (``optimise_svf``'s ``margin_mm``); the refinement's images are made on that box only.
REFINE_MARGIN_MM = 16.0
#: Voxels of the image grid a registration's field is sampled onto at once (a slab of rows).
FIELD_CHUNK_VOXELS = 1 << 22
#: The fixed weight with which lambda's balance of similarity and smoothness was calibrated
#: (``--refine-weight``'s default). The deformable refinement's similarity is a weighted mean,
#: so a weight that covers more (the whole brain of a skull-stripped image under ``head``, a
#: brain mask with its cortex) pulled each voxel less against the smoothness, as if lambda were
#: higher; the similarity is scaled by the weight's sum over this one's
#: (``optimise_svf``'s ``similarity_scale``). Session 39 (benchmarks/README.md): with
#: ``--refine-weight head``, bert -> fsaverage 0.787 -> 0.791, -> MNI152NLin6Asym 0.707 ->
#: 0.706, -> the T2w template 0.692 either way; the BIDS-App's T1w job (the template's mask,
#: scale 1.09) 0.678 -> 0.680. The rough brain weight itself gets a scale of 1.
SIMILARITY_REFERENCE = 'brain'
#: The fixed weight of the deformable refinement under the default ``--refine-weight brain``
#: (no mask given): the head, cut to its top 140 mm (``masks.head_mask``), counted at the
#: rough brain weight's strength per voxel (``SIMILARITY_REFERENCE``). The affine stage keeps
#: the rough brain weight, where skull and scalp would pull the whole alignment; the
#: deformable stage is local, and on a skull-stripped image the head is the brain, cortex
#: included, which the rough weight counts at its floor. ``auto`` still judges the contrasts
#: on the rough brain weight (over the head, scalp fat is bright in a PDw and a T1w alike).
DEFORM_WEIGHT = 'head'


class RegistrationResult:
    """What :func:`register` returns.

    ``forward`` maps fixed RAS to moving RAS (it moves the moving image onto the fixed grid);
    ``inverse`` the other way. A deformable inverse is built on first access, on the moving
    image's grid, so a caller that does not need it does not pay for it.
    :meth:`mid_space` gives the transforms of both images into the halfway space.
    """

    def __init__(self, forward: Transform, inverse, timings=None, info=None, mid_space=None):
        self.forward = forward
        self._inverse = inverse
        self.timings = {} if timings is None else timings
        self.info = {} if info is None else info
        self._mid_space = mid_space

    def mid_space(self) -> tuple[Transform, Transform]:
        """``(to_moving, to_fixed)``: mid-space points to moving and to fixed points.

        Resampling the moving image through ``to_moving`` and the fixed image through
        ``to_fixed`` puts both halfway between them (``mri_synthmorph -M``): linearly through
        the matrix square root ``H`` of ``A`` (``H @ H = A``), and for deformable modes also
        through half the velocity field, ``exp(+v/2)`` and ``exp(-v/2)``. The mid-space grid is
        the fixed image's grid moved by ``H`` (same shape and voxel size).
        """
        if self._mid_space is None:
            raise ValueError('this registration result has no mid-space transforms')
        if callable(self._mid_space):
            self._mid_space = self._mid_space()
        return self._mid_space

    @property
    def inverse(self) -> Transform:
        if callable(self._inverse):
            start = time.perf_counter()
            self._inverse = self._inverse()
            self.timings['inverse'] = time.perf_counter() - start
        return self._inverse


class _Timer:
    def __init__(self):
        self.timings = {}

    @contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            LOGGER.info('%-12s %6.2f s', name, self.timings[name])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``'auto'`` picks CUDA when available; ``'cuda'`` without a GPU is a clear error."""
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SynthMorphError(
            'A CUDA device was requested (-g/--device cuda) but none is available.'
        )
    return device


def register(
    moving: nb.spatialimages.SpatialImage,
    fixed: nb.spatialimages.SpatialImage,
    *,
    mode: str = 'joint',
    lam: float = 0.5,
    steps: int = 7,
    extent: float = DEFAULT_EXTENT,
    weights: dict | None = None,
    init: Transform | None = None,
    init_method: str = 'network',
    refine: int = DEFAULT_REFINE,
    refine_metric: str = 'auto',
    refine_levels: tuple | None = None,
    refine_weight: str = 'brain',
    fixed_mask: nb.spatialimages.SpatialImage | None = None,
    moving_mask: nb.spatialimages.SpatialImage | None = None,
    fixed_lesion_mask: nb.spatialimages.SpatialImage | None = None,
    moving_lesion_mask: nb.spatialimages.SpatialImage | None = None,
    cross_contrast: bool | None = None,
    passes: int = 1,
    device: str | torch.device | None = 'cpu',
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (3D nibabel images, any orientation and voxel size).

    Parameters
    ----------
    mode
        ``'joint'`` (affine then deformable), ``'deform'`` (deformable only: inputs must already
        be affinely aligned in world space), ``'affine'`` (12 DOF) or ``'rigid'`` (6 DOF).
    lam
        Regularisation weight in [0, 1] fed to the hypernetwork: 0 sharpest, 1 smoothest.
    steps
        Scaling-and-squaring steps integrating the velocity field (at least 5).
    extent
        Side of the cubic network space in mm, centred on each image's field of view.
    weights
        Model specifications by kind (``{'affine': 'default', 'deform': '/path/x.h5'}``); a
        missing kind takes the packaged default. See :func:`engine.weights.load_model`. A value
        may also be a ready ``(model, card)`` pair (a built ``torch.nn.Module`` and its card).
    init
        A linear Transform (fixed RAS -> moving RAS) that aligns the inputs roughly; the
        registration starts from it and the result includes it.
    init_method
        How the linear stage starts when ``refine`` is on: ``'network'`` (the affine network's
        prediction competes with a coarse pose search: centres of mass, principal axes,
        rotations and axis flips; the best by similarity wins), ``'moments'`` (the pose search
        only) or ``'identity'`` (from ``init``, or the identity, with no search). Without
        ``refine`` the network's prediction is used as it is.
    refine
        Test-time optimisation iterations at the finest level (default
        :data:`DEFAULT_REFINE`; 0: the networks only, as ``mri_synthmorph``). The affine
        is optimised first (linear modes and joint), then the velocity field from the network's
        prediction, with the same lambda (:mod:`.optimise`).
    refine_metric
        ``'auto'``, ``'lncc'`` or ``'mind'`` (:mod:`.similarity`).
    refine_levels
        Spacings (mm) of the deformable levels, coarse to fine (default
        :data:`DEFAULT_REFINE_LEVELS`). A level finer than the network's grid (2 mm) makes the
        refinement run on a finer mid-space grid of the same extent.
    refine_weight
        Where the similarity counts: ``'brain'`` (the affine stage weighs a rough brain weight
        of our own, so neck and face do not pull; the deformable stage the fixed image's head,
        :data:`DEFORM_WEIGHT`), ``'head'`` or ``'none'``. A weight that covers more than the
        rough brain weight counts each voxel as strongly (:data:`SIMILARITY_REFERENCE`).
    fixed_mask, moving_mask
        Brain masks (3D images in the world space of ``fixed``/``moving``, any grid), in place
        of ``refine_weight`` for that image (:func:`.masks.mask_weight`): the similarity counts
        fully in the brain and little over the rest of the head. The fixed mask weights both
        refinement stages, the moving mask the affine one (the deformable stage weighs the
        mid-space by the fixed image). A template's brain mask as ``fixed_mask`` raised mean
        Dice on whole-head T1w pairs (``benchmarks/README.md``). Used only with ``refine``.
    fixed_lesion_mask, moving_lesion_mask
        Lesion masks (3D images in the world space of ``fixed``/``moving``, any grid, non-zero
        in a stroke, a resection cavity, a tumour): the refinement leaves the lesion and a
        :data:`.masks.LESION_MARGIN_MM` rim out of the similarity (cost-function masking), in
        both stages; the moving one travels with the moving image as the field moves it. The
        field there follows its surroundings (the smoothness term). The networks and the
        refinement see each lesion filled from the tissue around it
        (:func:`.intensity.fill_lesion`), so its own contrast does not reach its surroundings
        through blurs and similarity windows. ``info['lesion_masks']`` names the sides.
    cross_contrast
        Whether the two images differ in MRI contrast: True makes the deformable refinement run
        at :func:`.optimise.cross_contrast_lambda` of ``lam`` (0.5 acts as 0.7), so that what
        only the contrasts make look different does not pull the field; False keeps ``lam``,
        and lets ``refine_metric='auto'`` keep LNCC unless the intensities run opposite ways
        (:func:`.similarity.auto_threshold`); None (auto) takes True where the refinement's
        similarity check picks MIND.
    passes
        How many times the deformable network runs (joint and deform modes): each further pass
        predicts a velocity between the moving image warped by the velocity so far and the
        fixed image, and adds it (first order of the composition). Two passes raised the
        networks-alone Dice (``refine=0``) on 11 of 12 cross-subject T1w pairs, 0.433 -> 0.463,
        for about 0.2 s more on one CPU thread; after the refinement they change nothing
        measurable (``benchmarks/README.md``, "Session 22").
    device
        ``'cpu'``, ``'cuda'`` or ``'auto'``.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f'the regularisation weight lambda must lie in [0, 1], got {lam}')
    if int(passes) != passes or passes < 1:
        raise ValueError(f'passes must be a whole number of at least 1, got {passes}')
    if steps < 5:
        raise ValueError(f'integrate with at least 5 steps, got {steps}')
    if init_method not in ('network', 'moments', 'identity'):
        raise ValueError(
            f"init_method must be 'network', 'moments' or 'identity', got {init_method!r}"
        )
    if refine < 0:
        raise ValueError(f'refine must be 0 or more iterations, got {refine}')
    if cross_contrast not in (None, True, False):
        raise ValueError(f'cross_contrast must be None, True or False, got {cross_contrast!r}')
    if init is not None and not init.is_linear:
        raise ValueError('the initial transform must be linear (affine or rigid)')
    device = resolve_device(device)
    keep_freed_memory()  # the optimisers' large per-step tensors: no page faults each step
    weights = dict(weights or {})
    timer = _Timer()
    # the grids of the results: the images' own; the work runs on their voxels in LIA order
    fixed_out, moving_out = Geometry.from_image(fixed), Geometry.from_image(moving)
    info = {'mode': mode, 'lambda': float(lam), 'device': str(device), 'models': {}}
    for image, grid, side in ((moving, moving_out, 'moving'), (fixed, fixed_out, 'fixed')):
        fov = _fov_mm(grid)
        size = ' x '.join(f'{v:.0f}' for v in fov)
        if np.sort(fov)[1] < SMALL_FOV_MM:
            LOGGER.warning(
                '%s covers only %s mm: less than a head along two axes, so there is little '
                'anatomy to align and the result may be far off (a slab needs two axes of a '
                'head, and -m rigid; or are the voxel sizes in its header too small?)',
                _named(image, f'the {side} image'), size,
            )
        elif np.sort(fov)[1] > LARGE_FOV_MM:
            LOGGER.warning(
                '%s covers %s mm: more than any head along two axes. Are the voxel sizes in '
                'its header right (%s mm)? The networks see %.0f mm around its centre, so the '
                'result may be far off', _named(image, f'the {side} image'), size,
                ' x '.join(f'{v:.3g}' for v in grid.voxel_sizes), extent,
            )

    with torch.inference_mode():
        with timer('preprocess'):
            fixed_t, fixed_geom = _read_volume(fixed, fixed_out, device, 'fixed', info)
            moving_t, moving_geom = _read_volume(moving, moving_out, device, 'moving', info)
            # lesions filled from the tissue around them, and left out of the similarity
            fixed_keep, fixed_t = _lesion_keep(fixed_lesion_mask, fixed_t, fixed_geom, 'fixed')
            moving_keep, moving_t = _lesion_keep(moving_lesion_mask, moving_t, moving_geom,
                                                 'moving')
            lesions = [side for side, keep in (('fixed', fixed_keep), ('moving', moving_keep))
                       if keep is not None]
            if lesions:
                info['lesion_masks'] = lesions

        affine = np.eye(4) if init is None else init.affine.copy()
        start = affine.copy()
        use_network = mode in ('joint', 'affine', 'rigid') and not (
            refine and init_method != 'network'
        )
        if use_network:
            kind = 'rigid' if mode == 'rigid' else 'affine'
            with timer('load models'):
                model, card = _get_model(weights.get(kind), kind, device)
            info['models'][kind] = _model_info(card)
            use_network = not _skip_untrained(card, kind, refine, info)
        if use_network:
            vox, shape = _network_space(card, extent)
            with timer('preprocess'):
                fgrid = spatial.network_grid(fixed_geom, vox, shape)
                mgrid = spatial.network_grid(moving_geom, vox, shape)
                if init is not None:  # start from init: moving sampled through it, same grid
                    mgrid = fgrid
                f_net = normalize_intensity(spatial.resample_linear(fixed_t, fixed_geom, fgrid))
                m_net = normalize_intensity(
                    spatial.resample_linear(moving_t, moving_geom, mgrid, matrix=affine)
                )
            with timer('networks'):
                mat_vox = model(m_net, f_net)[0].double().cpu().numpy()
            found = mgrid.affine @ mat_vox @ np.linalg.inv(fgrid.affine)
            affine = affine @ found

        if refine:
            from . import masks

            with timer('refine'):
                # each image's head is searched once, for its weight and the cut-head check
                fixed_head = masks.Head(fixed_t, fixed_geom)
                moving_head = masks.Head(moving_t, moving_geom)
                fixed_w = masks.similarity_weight(
                    fixed_t, fixed_geom, refine_weight, mask=fixed_mask,
                    what=_named(fixed_mask, 'fixed mask'), head=fixed_head)
                moving_w = masks.similarity_weight(
                    moving_t, moving_geom, refine_weight, mask=moving_mask,
                    what=_named(moving_mask, 'moving mask'), head=moving_head)
                # the sum of the weight lambda was calibrated with, against the deformable
                # stage's (SIMILARITY_REFERENCE); under the default, that stage weighs the head
                default = refine_weight == SIMILARITY_REFERENCE and fixed_mask is None
                head_stage = default and mode in ('joint', 'deform')
                reference_sum = float((fixed_w if default else masks.similarity_weight(
                    fixed_t, fixed_geom, SIMILARITY_REFERENCE, head=fixed_head)).sum())
                similarity_scale = _similarity_scale(float(fixed_w.sum()), reference_sum)
                if fixed_keep is not None:
                    fixed_w = fixed_w * fixed_keep
                if moving_keep is not None:
                    moving_w = moving_w * moving_keep
            if mode in ('joint', 'affine', 'rigid'):
                affine = _refine_affine(
                    timer, moving_t, moving_geom, fixed_t, fixed_geom, fixed_w, moving_w,
                    rigid=mode == 'rigid', init_method=init_method, start=start,
                    network=affine if use_network else None, metric=refine_metric,
                    joint=mode == 'joint', cross_contrast=cross_contrast,
                    heads=(moving_head, fixed_head),
                )
            info['refine'] = {'iterations': int(refine), 'metric': refine_metric,
                              'init': init_method, 'weight': refine_weight,
                              'masks': [side for side, m in (('fixed', fixed_mask),
                                                             ('moving', moving_mask))
                                        if m is not None],
                              'cross_contrast': cross_contrast}
            judge_w = judge_geom = None
            if head_stage:
                with timer('refine'):
                    # the rough weight, on the coarse grid it was made on, is now only where
                    # 'auto' judges the contrasts; the head's weight is made once it is let go
                    # (one full-size weight at a time: at 0.4 mm each is 276 MB)
                    if refine_metric == 'auto':
                        judge_w, judge_geom = _strided(fixed_w, fixed_geom, fixed_head.stride)
                    fixed_w = None
                    fixed_w = masks.similarity_weight(fixed_t, fixed_geom, DEFORM_WEIGHT,
                                                      head=fixed_head)
                    similarity_scale = _similarity_scale(float(fixed_w.sum()), reference_sum)
                    if fixed_keep is not None:
                        fixed_w = fixed_w * fixed_keep
            info['refine']['similarity_scale'] = similarity_scale

        if mode in ('affine', 'rigid'):
            forward = Transform(affine=affine, reference=fixed_out, moving=moving_out)
            return RegistrationResult(forward, forward.linear_inverse(), timer.timings, info,
                                      mid_space=lambda: _linear_mid_space(affine, fixed_out))

        with timer('load models'):
            model, card = _get_model(weights.get('deform'), 'deform', device)
        info['models']['deform'] = _model_info(card)
        vox, shape = _network_space(card, extent)
        with timer('preprocess'):
            # mid-space point z: fixed point to_fixed @ z, moving point to_moving @ z
            to_moving, to_fixed = spatial.mid_space_split(affine)
            from_fixed, from_moving = np.linalg.inv(to_fixed), np.linalg.inv(to_moving)
            centre = from_fixed[:3, :3] @ spatial.fov_center(fixed_geom) + from_fixed[:3, 3]
            mid = spatial.network_grid(fixed_geom, vox, shape, center=centre)
            f_raw = spatial.resample_linear(fixed_t, fixed_geom, mid, matrix=to_fixed)
            m_raw = spatial.resample_linear(moving_t, moving_geom, mid, matrix=to_moving)
            # kept for the refinement's grid, which scales its part of the images alike
            limits = intensity_limits(f_raw), intensity_limits(m_raw)
            f_mid = normalize_intensity(f_raw, limits=limits[0])
            m_mid = normalize_intensity(m_raw, limits=limits[1])
            del f_raw, m_raw
        velocity = init_velocity = None
        if not _skip_untrained(card, 'deform', refine, info):
            with timer('networks'):
                velocity = _symmetric_velocity(model, m_mid, f_mid, float(lam))
                velocity_to_mid = _half_to_full(model, velocity.shape[2:], mid.shape)
                for _ in range(int(passes) - 1):
                    disp = _integrate(velocity, steps, velocity_to_mid, mid.shape)
                    moved = normalize_intensity(spatial.warp_voxel(m_mid, disp))
                    velocity = velocity + _symmetric_velocity(model, moved, f_mid, float(lam))
            info['models']['deform']['passes'] = int(passes)

        if refine:
            from .optimise import optimise_svf

            with timer('refine'):
                levels = tuple(refine_levels or DEFAULT_REFINE_LEVELS)
                iterations = _level_iterations(levels, refine)
                net_grid = mid
                if min(levels) < 0.99 * vox:
                    # a level finer than the network's grid: refine on a finer mid-space grid
                    # of the same extent, and keep the result there
                    finer = float(min(levels))
                    mid = spatial.network_grid(
                        fixed_geom, finer, [math.ceil(n * vox / finer) for n in shape],
                        center=centre,
                    )
                # the part of mid the refinement works on (the fixed weight's box and the
                # field's margin): images, weights and the start made there only
                lo, hi = _weight_box(fixed_w, fixed_geom, mid, to_fixed, REFINE_MARGIN_MM)
                work = Geometry(tuple(int(n) for n in hi - lo),
                                mid.affine @ _shift(lo))
                if mid is net_grid:
                    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
                    f_work, m_work = f_mid[(..., *box)], m_mid[(..., *box)]
                else:
                    f_work = normalize_intensity(
                        spatial.resample_linear(fixed_t, fixed_geom, work, matrix=to_fixed),
                        limits=limits[0],
                    )
                    m_work = normalize_intensity(
                        spatial.resample_linear(moving_t, moving_geom, work, matrix=to_moving),
                        limits=limits[1],
                    )
                if velocity is not None:
                    to_work = np.linalg.inv(work.affine) @ net_grid.affine @ velocity_to_mid
                    init_velocity = spatial.upsample_field(velocity, to_work, work.shape)
                used = {}
                work_w = spatial.resample_linear(fixed_w, fixed_geom, work, matrix=to_fixed)
                work_w = work_w * _moving_fov(moving_t, moving_geom, work, to_moving)
                work_judge = None  # the weight 'auto' judges the contrasts on
                if judge_w is not None:
                    work_judge = spatial.resample_linear(judge_w, judge_geom, work,
                                                         matrix=to_fixed)
                work_keep = None
                if moving_keep is not None:  # warped with the moving image at every step
                    work_keep = spatial.resample_linear(moving_keep, moving_geom, work,
                                                        matrix=to_moving)
                with torch.inference_mode(False):
                    # the velocity on its box (about 60 % of the 256 mm cube for a head):
                    # integrated there below, same result as on the whole grid
                    velocity, velocity_to_work = optimise_svf(
                        m_work.clone(), f_work.clone(), work,
                        init_velocity=None if init_velocity is None else init_velocity.clone(),
                        lam=lam, steps=steps, metric=refine_metric, levels=levels,
                        iterations=iterations, weight=work_w.clone(),
                        moving_weight=None if work_keep is None else work_keep.clone(),
                        velocity_factor=_velocity_factors(levels, fixed_geom, moving_geom),
                        crop=True, cross_contrast=cross_contrast, report=used,
                        similarity_scale=similarity_scale, metric_weight=work_judge,
                        margin_mm=REFINE_MARGIN_MM, verbose=LOGGER.isEnabledFor(logging.INFO),
                    )
                velocity_to_mid = _shift(lo) @ velocity_to_work
                used['levels'] = [float(lev) for lev in levels]
                info['refine']['deformable'] = used
                velocity = velocity.detach()

        with timer('resample'):
            disp = spatial.integrate_svf(velocity, steps)
            field, field_grid = _mid_field(disp, mid, from_fixed, to_fixed, fixed_geom,
                                           stored=fixed_out, disp_to_mid=velocity_to_mid)

    forward = Transform(
        affine=affine, field=field, field_geometry=field_grid,
        reference=fixed_out, moving=moving_out,
    )

    def make_inverse() -> Transform:
        with torch.inference_mode():
            disp_inv = spatial.integrate_svf(-velocity, steps)
            field, field_grid = _mid_field(disp_inv, mid, from_moving, to_moving, moving_geom,
                                           stored=moving_out, disp_to_mid=velocity_to_mid)
        return Transform(
            affine=np.linalg.inv(affine), field=field, field_geometry=field_grid,
            reference=moving_out, moving=fixed_out,
        )

    def make_mid_space() -> tuple[Transform, Transform]:
        to_moving, to_fixed = _linear_mid_space(affine, fixed_out)
        with torch.inference_mode():
            for xfm, sign in ((to_moving, 0.5), (to_fixed, -0.5)):
                disp = _integrate(sign * velocity, steps, velocity_to_mid, mid.shape)
                world = spatial.field_voxel_to_world(disp, mid.affine)[0]
                xfm.field = world.permute(1, 2, 3, 0).cpu().numpy().astype(np.float32)
                xfm.field_geometry = mid
        return to_moving, to_fixed

    return RegistrationResult(forward, make_inverse, timer.timings, info,
                              mid_space=make_mid_space)


def register_via(
    moving: nb.spatialimages.SpatialImage,
    via: nb.spatialimages.SpatialImage,
    fixed: nb.spatialimages.SpatialImage,
    *,
    second: RegistrationResult | None = None,
    **options,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` through ``via``, another image of the same person.

    ``moving`` is aligned rigidly to ``via`` (e.g. a FLAIR to the T1w of the same session),
    and ``via`` is registered to ``fixed`` with ``options`` (the keywords of :func:`register`);
    the result is their composition, fixed -> via -> moving, as one transform: the field of
    the second registration with the rigid matrix joined to its affine. So every contrast of
    a person lands where the T1w does, and the deformable step sees two images of one
    contrast (12 FLAIRs onto the whole-head MNI152NLin6Asym: mean Dice 0.581 directly, 0.652
    through their T1w, every subject higher; ``benchmarks/README.md``, "Session 23"). The
    rigid stage uses the refinement's iterations, weight, metric (``'auto'`` picks MIND across
    contrasts), device, extent and rigid model of ``options``, and ``moving_mask`` and
    ``moving_lesion_mask`` if given.

    ``second``: the registration of ``via`` to ``fixed`` where it is already at hand (e.g. from
    :mod:`.cache`, or computed with a lesion mask drawn on ``via``); otherwise it is computed
    here with ``options`` less the moving image's masks.

    ``info['via']`` holds the rigid stage's info and matrix; its timings carry the prefix
    ``via ``. The result has no mid-space transforms.
    """
    rigid_keys = ('refine', 'refine_weight', 'extent', 'weights', 'device', 'init_method')
    moving_side = ('moving_mask', 'moving_lesion_mask')
    first = register(moving, via, mode='rigid',
                     **{k: options[k] for k in (*rigid_keys, *moving_side) if k in options})
    if second is None:
        second = register(via, fixed,
                          **{k: v for k, v in options.items() if k not in moving_side})
    matrix = first.forward.affine  # via points -> moving points
    moving_geom = Geometry.from_image(moving)
    forward = second.forward.then_linear(matrix, moving=moving_geom)
    timings = {f'via {k}': v for k, v in first.timings.items()}
    timings.update(second.timings)
    info = dict(second.info)
    info['via'] = {**first.info, 'matrix': np.round(matrix, 6).tolist()}

    def make_inverse() -> Transform:
        return second.inverse.after_linear(np.linalg.inv(matrix), reference=moving_geom)

    return RegistrationResult(forward, make_inverse, timings, info)


def _named(image, kind: str) -> str:
    """``kind <file>`` for error messages, where ``image`` knows its file."""
    if image is None:
        return kind
    name = (getattr(image, 'extra', None) or {}).get('source') or image.get_filename()
    return f'{kind} <{name}>' if name else kind


#: A lesion mask covering more than this share of the head is most likely something else (a
#: brain mask given in the wrong place): warned about. The largest strokes cover about 15 %.
LESION_WARN_SHARE = 0.3


def _lesion_keep(mask, volume: torch.Tensor, geometry: Geometry, side: str):
    """``(keep, volume)``: :func:`.masks.lesion_keep` of a lesion mask on the image's grid (a
    tensor like ``volume``) and the image with the lesion filled (:func:`.intensity.
    fill_lesion`); ``(None, volume)`` without a mask."""
    if mask is None:
        return None, volume
    from . import masks
    from .intensity import fill_lesion

    what = _named(mask, f'{side} lesion mask')
    keep = masks.lesion_keep(mask, geometry, what=what)
    data = volume[0, 0].detach().cpu().numpy()
    filled = fill_lesion(data, keep, geometry.voxel_sizes)
    lesion = keep < 0.5
    LOGGER.info('%s: %.1f ml left out of the similarity and filled from the tissue around it',
                what, float(lesion.sum()) * float(np.prod(geometry.voxel_sizes)) / 1000)
    head = masks.head_mask(data, geometry)
    share = float((lesion & head).sum()) / max(float(head.sum()), 1.0)
    if share > LESION_WARN_SHARE:
        LOGGER.warning('%s covers %.0f %% of the head: a lesion mask marks the lesion only (a '
                       'brain mask weights the similarity instead: --moving-mask / -x, '
                       'moving_mask / fixed_mask)', what, 100 * share)
    as_tensor = partial(torch.as_tensor, device=volume.device, dtype=volume.dtype)
    return as_tensor(keep)[None, None], as_tensor(filled)[None, None]


def _shift(offset) -> np.ndarray:
    """The 4x4 voxel matrix adding ``offset`` (a box's corner) to voxel indices."""
    out = np.eye(4)
    out[:3, 3] = np.asarray(offset, dtype=float)
    return out


def _weight_box(weight, geometry: Geometry, grid: Geometry, matrix, margin_mm: float,
                threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A voxel box ``(lo, hi)`` of ``grid`` that holds every voxel where ``weight`` (on
    ``geometry``, resampled through ``matrix`` as :func:`.spatial.resample_linear` does)
    exceeds ``threshold``, with ``margin_mm`` and a voxel more on each side, within the grid.

    Linear interpolation exceeds the threshold only next to a voxel that does, so the box of
    those voxels, one voxel wider, mapped corner by corner, holds them all: the refinement's
    own box (:func:`.optimise.optimise_svf`, the same margin) then lies inside, away from the
    sides it cuts. The whole grid where no voxel exceeds the threshold (by default the
    refinement's, :data:`.optimise.ROI_THRESHOLD`).
    """
    from .optimise import ROI_THRESHOLD

    threshold = ROI_THRESHOLD if threshold is None else threshold
    shape = np.asarray(grid.shape)
    idx = torch.nonzero(weight[0, 0] > threshold)
    if idx.numel() == 0:
        return np.zeros(3, int), shape.copy()
    first = idx.min(0).values.cpu().numpy() - 1.0
    last = idx.max(0).values.cpu().numpy() + 1.0
    corners = np.array([[(first, last)[k >> a & 1][a] for a in range(3)] + [1.0]
                        for k in range(8)])
    to_grid = np.linalg.inv(grid.affine) @ np.linalg.inv(matrix) @ geometry.affine
    ijk = corners @ to_grid.T
    pad = np.ceil(margin_mm / np.asarray(grid.voxel_sizes)).astype(int) + 1
    lo = np.maximum(np.floor(ijk[:, :3].min(0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(ijk[:, :3].max(0)).astype(int) + 1 + pad, shape)
    if np.any(hi <= lo):  # the weight lies outside the grid
        return np.zeros(3, int), shape.copy()
    return lo, hi


def _moving_fov(moving_t, moving_geom, grid, matrix, erode_mm: float = FOV_ERODE_MM):
    """1 where ``grid`` (through ``matrix``) sees the moving image's field of view, at least
    ``erode_mm`` inside its edge; 0 elsewhere."""
    ones = torch.ones_like(moving_t[:, :1])
    inside = spatial.resample_linear(ones, moving_geom, grid, matrix=matrix)
    inside = (inside > 0.999).to(moving_t.dtype)
    # erosion by a box, one axis at a time (the same result as one 3D min filter, and 4-5
    # times faster on the 1.5 mm level's 171^3 mid-space grid: 0.3 s against 1.3 s)
    out = -inside
    for axis, v in enumerate(grid.voxel_sizes):
        r = max(1, round(erode_mm / float(v)))
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = 2 * r + 1, r
        out = F.max_pool3d(out, kernel, stride=1, padding=pad)
    return -out


def _linear_mid_space(affine: np.ndarray, fixed_geom: Geometry) -> tuple[Transform, Transform]:
    """Linear mid-space transforms ``(M, F)`` (:func:`.spatial.mid_space_split`: as a rule
    ``(H, H^-1)``, ``H`` the square root of ``A``) on the fixed grid moved by ``F^-1``.

    With ``z = F^-1 x`` for fixed points ``x``: the moving point ``A x = M z``, the fixed point
    ``F z``, so both images meet halfway.
    """
    to_moving, to_fixed = spatial.mid_space_split(affine)
    mid = Geometry(fixed_geom.shape, np.linalg.inv(to_fixed) @ fixed_geom.affine)
    return Transform(affine=to_moving, reference=mid), Transform(affine=to_fixed, reference=mid)


def _refine_affine(timer, moving_t, moving_geom, fixed_t, fixed_geom, fixed_w, moving_w, *,
                   rigid, init_method, start, network, metric, joint=False,
                   cross_contrast=None, heads=(None, None)) -> np.ndarray:
    """The linear stage of test-time refinement: a robust start, then multi-scale Adam.

    ``heads``: the :class:`.masks.Head` of the moving and the fixed image, when at hand."""
    from .optimise import optimise_affine, robust_affine_init

    verbose = LOGGER.isEnabledFor(logging.INFO)
    with timer('refine'), torch.inference_mode(False):
        weights = {'fixed_weight': fixed_w, 'moving_weight': moving_w}
        levels = JOINT_AFFINE_LEVELS if joint else AFFINE_LEVELS
        iterations = JOINT_AFFINE_ITERATIONS if joint else AFFINE_ITERATIONS
        search = {}
        slab = _is_slab(moving_geom) or _is_slab(fixed_geom)
        cut = not slab and (_cut_head(moving_t, moving_geom, heads[0])
                            or _cut_head(fixed_t, fixed_geom, heads[1]))
        if slab or cut:
            search = {'voxel': SLAB_SEARCH_MM}
            keep = [i for i, level in enumerate(levels) if level <= SLAB_SEARCH_MM]
            # the finer levels, the first with the coarsest level's iterations
            levels = tuple(levels[i] for i in keep)
            iterations = (iterations[0],) + tuple(iterations[i] for i in keep[1:])
            LOGGER.info('%s: pose search and affine from %g mm',
                        f'a slab (field of view under {SLAB_MM:g} mm)' if slab else
                        'a field of view that cuts the head', SLAB_SEARCH_MM)
        if init_method == 'identity':
            begin = start
        else:
            candidates = [start] + ([network] if network is not None else [])
            begin = robust_affine_init(
                moving_t, moving_geom, fixed_t, fixed_geom, rigid=rigid, candidates=candidates,
                metric=metric, verbose=verbose, cross_contrast=cross_contrast, **search,
                **weights,
            )
        return optimise_affine(
            moving_t, moving_geom, fixed_t, fixed_geom, init=begin, rigid=rigid, metric=metric,
            verbose=verbose, levels=levels, iterations=iterations,
            cross_contrast=cross_contrast, **weights,
        )


def _similarity_scale(weight_sum: float, reference_sum: float) -> float:
    """How many times the sum of the fixed image's rough brain weight
    (:data:`SIMILARITY_REFERENCE`) the deformable refinement's weight sums to (1 where the
    image has no head to weigh)."""
    return weight_sum / reference_sum if reference_sum > 0 else 1.0


def _strided(weight: torch.Tensor, grid: Geometry, stride) -> tuple[torch.Tensor, Geometry]:
    """``weight`` (1, 1, X, Y, Z) on ``grid`` at every ``stride``-th voxel, and that grid."""
    s = [int(v) for v in stride]
    small = weight[..., :: s[0], :: s[1], :: s[2]].contiguous()
    return small, Geometry(tuple(small.shape[2:]), grid.affine @ np.diag([*s, 1.0]))


def _cut_head(volume: torch.Tensor, grid: Geometry, found=None) -> bool:
    """Whether the field of view cuts the head within its top 140 mm (:func:`.masks.
    head_mask`; ``found``: the image's :class:`.masks.Head` when at hand) over more than
    ``CUT_HEAD_CM2`` on one face of the image."""
    from . import masks

    head = masks.head_mask(volume, grid, head=found)
    vox = grid.voxel_sizes
    for axis in range(3):
        face_cm2 = float(np.prod([vox[a] for a in range(3) if a != axis])) / 100
        for end in (0, -1):
            if np.take(head, end, axis=axis).sum() * face_cm2 > CUT_HEAD_CM2:
                return True
    return False


def _fov_mm(grid: Geometry) -> np.ndarray:
    """The field of view of ``grid`` along each voxel axis, in mm."""
    return np.asarray(grid.shape) * grid.voxel_sizes


def _is_slab(grid: Geometry) -> bool:
    """Whether the field of view is thinner than ``SLAB_MM`` along one voxel axis."""
    return bool(np.min(_fov_mm(grid)) < SLAB_MM)


def _level_iterations(levels, finest: int) -> tuple:
    """Iterations per level: ``finest`` at the last, more at coarser (cheaper) levels."""
    n = len(levels)
    return tuple(int(finest * (1 + (n - 1 - i))) for i in range(n))


def _velocity_factors(levels, *geometries: Geometry) -> tuple:
    """Field spacing per level as a multiple of the level's (``FIELD_SPACING_PER_INPUT_VOXEL``).

    The input voxel size is the finer image's (geometric mean of its voxel sides, so a
    0.9 x 0.9 x 2.4 mm slab counts as about 1.25 mm).
    """
    from .optimise import VELOCITY_FACTOR

    voxel = min(float(np.prod(g.voxel_sizes)) ** (1 / 3) for g in geometries)
    finest = min(levels)
    factors = [VELOCITY_FACTOR] * len(levels)
    factors[list(levels).index(finest)] = float(
        np.clip(FIELD_SPACING_PER_INPUT_VOXEL * voxel / finest, 1.0, VELOCITY_FACTOR)
    )
    return tuple(factors)


def _integrate(velocity, steps, velocity_to_mid, shape) -> torch.Tensor:
    """exp(velocity) on the velocity's own grid, then resampled to ``shape`` (voxel units).

    The networks predict at half resolution; integrating there (as ``mri_synthmorph`` does) is
    8x cheaper than at full resolution and the upsampled result is as smooth. A refined
    velocity lives on its box of the grid (``velocity_to_mid`` a shift): integrated there and
    extended by its (zero) border.
    """
    disp = spatial.integrate_svf(velocity, steps)
    if velocity_to_mid is None:
        return disp
    return spatial.upsample_field(disp, velocity_to_mid, shape)


def _read_volume(image, geometry: Geometry, device, side: str, info: dict):
    """An image's intensities as the engine works on them (:func:`.intensity.
    clean_intensities`, :func:`.intensity.clear_noisy_background`), its voxels in LIA order
    (:func:`.spatial.lia_order`), and their grid. A cleared background is logged and noted in
    ``info['noise_background_cleared'][side]`` (the share of the voxels)."""
    data, grid = spatial.lia_order(np.asarray(image.dataobj, dtype=np.float32), geometry)
    data = clean_intensities(data)
    cleared = clear_noisy_background(data, grid.voxel_sizes)
    if cleared is not data:
        share = float(np.mean((cleared == 0) & (data != 0)))
        info.setdefault('noise_background_cleared', {})[side] = round(share, 3)
        LOGGER.info('%s: a background of noise (as in MP2RAGE UNI images) was set to 0 '
                    '(%.0f %% of the voxels)', _named(image, f'{side} image'), 100 * share)
    return spatial.volume_tensor(cleared, device), grid


def _mid_field(disp, mid, to_mid, lin, image, stored=None,
               disp_to_mid=None) -> tuple[np.ndarray, Geometry]:
    """A mid-space voxel displacement as a RAS field ``(X, Y, Z, 3)`` and its grid.

    The forward transform is ``A (x + F u(F^-1 x))`` (``to_mid`` = ``F^-1``, ``lin`` = ``F``,
    the fixed side of :func:`.spatial.mid_space_split`, as a rule ``H^-1``); the inverse takes
    the moving side ``M`` in its place. When the image's own grid is at most 4 times the
    network grid's size, the field is sampled there (what ANTs writes, and readers agree on it
    everywhere on that grid, e.g. a template's); otherwise it stays on the mid-space grid
    mapped by ``lin``, with its vectors mapped by the same matrix: network resolution, no
    resampling onto a large (1 mm) image grid. ``image`` is the LIA-ordered grid the engine
    works on; a field on it is returned in the order of ``stored``, the image's own grid.

    ``disp_to_mid`` (4x4): ``disp`` lives on another grid (the velocity's), this matrix from its
    voxels to ``mid``'s. A box of ``mid`` (a shift: the refined field) is sampled onto the
    image's grid directly, extended by its border values: the same values as through the
    whole mid-space grid (:func:`.spatial.upsample_field`), without making that field (0.4 s
    at 1.5 mm, one CPU thread). A coarser grid (the network's half resolution) goes through
    ``mid`` as before: the two interpolations keep its forward and inverse closer together.
    """
    to_mid_vox = np.eye(4) if disp_to_mid is None else np.asarray(disp_to_mid, dtype=float)
    box = np.allclose(to_mid_vox[:3, :3], np.eye(3)) and np.allclose(
        to_mid_vox[:3, 3], np.round(to_mid_vox[:3, 3]))
    if disp_to_mid is not None and (not box or np.prod(image.shape) > 4 * np.prod(mid.shape)):
        disp = spatial.upsample_field(disp, to_mid_vox, mid.shape)
        to_mid_vox = np.eye(4)
    # the displacement's own voxels, in RAS mm
    world = spatial.field_voxel_to_world(disp, mid.affine @ to_mid_vox)
    lin_t = spatial.as_tensor(lin[:3, :3], disp.device)
    if np.prod(image.shape) > 4 * np.prod(mid.shape):
        out = torch.einsum('ij,j...->...i', lin_t, world[0]).cpu().numpy()
        return out, Geometry(mid.shape, lin @ mid.affine)
    # onto the image's grid in slabs of its first axis: a 256^3 grid's coordinates and their
    # copies peaked 0.9 GB above the field itself in one piece
    disp_grid = Geometry(tuple(disp.shape[2:]), mid.affine @ to_mid_vox)
    out = np.empty((*image.shape, 3), dtype=np.float32)
    rows = max(1, FIELD_CHUNK_VOXELS // int(np.prod(image.shape[1:])))
    for start in range(0, image.shape[0], rows):
        stop = min(start + rows, image.shape[0])
        part = spatial.resample_linear(world, disp_grid, spatial.row_slab(image, start, stop),
                                       matrix=to_mid, padding='border')[0]
        out[start:stop] = torch.einsum('ij,j...->...i', lin_t, part).cpu().numpy()
    if stored is not None:
        return spatial.original_order(out, image, stored), stored
    return out, image


def _half_to_full(model, coarse_shape, fine_shape) -> np.ndarray:
    """Voxel matrix from the network's half-resolution output grid to ``mid``."""
    if hasattr(model, 'half_to_full'):
        return np.asarray(model.half_to_full(), dtype=float)
    scale = [(f - 1) / max(c - 1, 1) for c, f in zip(coarse_shape, fine_shape)]
    return np.diag([*scale, 1.0])  # corners aligned, as spatial.resize_field


def _symmetric_velocity(model, moving, fixed, lam: float) -> torch.Tensor:
    """``(D(m, f) - D(f, m)) / 2``: antisymmetric in the inputs' order by construction."""
    from .networks import HyperUNet, symmetric_velocity

    if isinstance(model, HyperUNet):
        return symmetric_velocity(model, moving, fixed, lam)
    lam_t = torch.full((moving.shape[0], 1), lam, device=moving.device)
    return (model(moving, fixed, lam_t) - model(fixed, moving, lam_t)) / 2


def _get_model(spec, kind: str, device: torch.device):
    """A ``(model, card)`` pair: given ready, or loaded with :func:`weights.load_model`."""
    if isinstance(spec, tuple):
        model, card = spec
        return model.to(device).eval(), card
    from .weights import load_model

    model, card = load_model(spec or 'default', kind, device=device)
    return model.eval(), card


def _network_space(card: dict, extent: float) -> tuple[float, tuple[int, int, int]]:
    """Voxel size and shape of a model's network space for a cube of ``extent`` mm.

    The voxel size comes from the model card (``space.voxel_size``, default 2 mm); the shape is
    rounded up to a multiple of the model's size divisor (``space.divisor``, default 16).
    """
    space = card.get('space', {})
    vox = float(space.get('voxel_size', 2.0))
    div = int(space.get('divisor', 16))
    n = int(np.ceil(float(extent) / vox / div) * div)
    return vox, (n, n, n)


def _skip_untrained(card: dict, kind: str, refine: int, info: dict) -> bool:
    """Whether to leave out an untrained (random) network because the refinement replaces it.

    Random weights predict nothing useful: with ``refine`` on, the affine search and the
    optimiser start without them (a zero velocity), which is faster and never worse. The
    model stays in ``info['models']`` marked ``used: False``.
    """
    skip = bool(refine) and card.get('trained') is False
    info['models'][kind]['used'] = not skip
    if skip:
        LOGGER.info('the %s model %s is untrained: left out, the refinement starts without it',
                    kind, card.get('name', '?'))
    return skip


def _model_info(card: dict) -> dict:
    return {
        key: card.get(key)
        for key in ('name', 'arch', 'trained', 'sha256', 'path')
        if card.get(key) is not None
    }


#: Output voxels of a 4D series that :func:`moved_image` resamples at once (frames of a group
#: go through as channels; 128 MB of float32).
FRAME_VOXELS = 1 << 25


def moved_image(
    image: nb.spatialimages.SpatialImage,
    xfm: Transform,
    reference: Geometry | None = None,
    *,
    mode: str = 'linear',
    fill: float = 0.0,
    dtype=None,
    device: str | torch.device | None = 'cpu',
) -> nb.Nifti1Image:
    """Resample ``image`` (on the moving side of ``xfm``) onto ``reference``.

    ``reference`` defaults to the transform's reference grid, then its field grid, then the
    image's own grid. ``mode`` is ``'linear'``, ``'nearest'`` or ``'labels'``. A 4D image (a
    series of frames) gives a 4D image, each frame resampled as a 3D image would be, that keeps
    the frames' spacing (the repetition time) and time units.
    """
    reference = reference or xfm.reference or xfm.field_geometry or Geometry.from_image(image)
    device = resolve_device(device)
    source = Geometry.from_image(image)
    stored = np.asanyarray(image.dataobj)
    series = stored.ndim == 4
    frames = stored if series else stored[..., None]
    dtype = np.dtype(dtype) if dtype is not None else stored.dtype
    out = np.empty((*reference.shape, frames.shape[3]), dtype=dtype)
    # frames go through as channels, a few at a time: the output of each group stays near
    # FRAME_VOXELS floats, whatever the length of the series
    group = max(1, FRAME_VOXELS // int(np.prod(reference.shape)))
    for start in range(0, frames.shape[3], group):
        stop = min(start + group, frames.shape[3])
        volume = np.moveaxis(np.asarray(frames[..., start:stop], dtype=np.float32), -1, 0)
        with torch.inference_mode():
            part = spatial.apply_transform(
                spatial.as_tensor(volume, device)[None], source, xfm, reference,
                mode=mode, fill=fill,
            )[0].cpu().numpy()
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            part = np.clip(np.rint(part), info.min, info.max)
        out[..., start:stop] = np.moveaxis(part, 0, -1)
    img = nb.Nifti1Image(out if series else out[..., 0], reference.affine)
    img.header.set_xyzt_units('mm')
    if series:
        zooms = image.header.get_zooms()
        img.header.set_zooms((*reference.voxel_sizes, zooms[3] if len(zooms) > 3 else 1.0))
        time_unit = image.header.get_xyzt_units()[1] if isinstance(image, nb.Nifti1Image) \
            else 'unknown'
        img.header.set_xyzt_units('mm', time_unit)
    return img


def header_moved_image(image: nb.spatialimages.SpatialImage, xfm: Transform) -> nb.Nifti1Image:
    """Move ``image`` by editing its header only (linear transforms, ``-H``): no resampling."""
    if not xfm.is_linear:
        raise ValueError('a header-only update needs a linear transform (affine or rigid)')
    affine = np.linalg.inv(xfm.affine) @ image.affine
    return nb.Nifti1Image(np.asanyarray(image.dataobj), affine)
