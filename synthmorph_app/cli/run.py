"""``synthmorph-app``: the command-line entry point.

``main(argv)`` returns an exit code: 0 success, 1 a failure the user can fix (one clear line
naming the file), 2 bad arguments (argparse).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from ..errors import SynthMorphError

LOGGER = logging.getLogger('synthmorph_app.cli')

if os.environ.get('SYNTHMORPH_NIPYPE_LEVEL'):
    import multiprocessing

    # (while a spawned process imports the main module it is named, not yet bootstrapped)
    if multiprocessing.current_process().name != 'MainProcess':
        # A MultiProc worker of a BIDS run started by ``spawn`` (macOS and Windows), which
        # imports the command's main module, this one, first: the run's Nipype log level, as
        # the fork server's workers get it (``workers``), instead of an INFO line per node.
        from . import workers  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the output went into a reader that stopped early (``--dry-run | head``): stop
        # quietly, as other command-line tools do, without a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] == 'demo':  # the BIDS-App on the packaged dataset
        from .bids import main_demo

        return main_demo(words[1:])
    commands = ('register', 'apply', 'train', 'synth', 'evaluate')
    if words and not words[0].startswith('-') and words[0] not in commands:
        from .bids import main_bids  # BIDS-App: BIDS_DIR OUTPUT_DIR participant|group

        return main_bids(words)
    from .parser import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, 'verbose', False) else logging.WARNING,
        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
        datefmt='%H:%M:%S',
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    try:
        if args.command == 'register':
            return run_register(args)
        if args.command == 'apply':
            return run_apply(args)
        if args.command == 'evaluate':
            from .evaluate import run_evaluate

            return run_evaluate(args)
        if args.command in ('train', 'synth'):
            from .train import run_synth, run_train

            return run_train(args) if args.command == 'train' else run_synth(args)
    except SynthMorphError as err:
        print(f'synthmorph-app {args.command}: error: {err}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'synthmorph-app {args.command}: interrupted; no output was completed.',
              file=sys.stderr)
        return 130
    parser.error(f'unknown command {args.command!r}')  # pragma: no cover
    return 2


def _set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _device(gpu: bool) -> str:
    return 'cuda' if gpu else 'cpu'


def assign_weights(files: list[str] | None, mode: str) -> dict:
    """Map ``-w`` arguments to model kinds, as ``mri_synthmorph`` does.

    A file whose name contains ``affine``, ``rigid`` or ``deform`` serves that kind; the others
    are taken in order: the linear model (affine, or rigid in rigid mode) first, then deform.
    """
    linear = 'rigid' if mode == 'rigid' else 'affine'
    out: dict = {}
    rest = []
    for spec in files or []:
        name = Path(spec).name.lower()
        for kind in ('affine', 'rigid', 'deform'):
            if kind in name:
                out[kind] = spec
                break
        else:
            rest.append(spec)
    order = [k for k in ((linear, 'deform') if mode == 'joint' else
                         (linear,) if mode in ('affine', 'rigid') else ('deform',))
             if k not in out]
    if len(rest) > len(order):
        raise SynthMorphError(
            f'too many -w/--weights files for mode {mode}: {", ".join(rest)} '
            '(name them after their model, e.g. *affine*.h5 and *deform*.h5)'
        )
    out.update(zip(order, rest))
    return out


class _Outputs:
    """Collects written files; on failure removes them, so nothing half-done remains."""

    def __init__(self):
        self.written: list[Path] = []

    def add(self, path):
        self.written.append(Path(path))

    def rollback(self):
        for path in self.written:
            path.unlink(missing_ok=True)


def register_keywords(args) -> dict:
    """The keywords of ``engine.register.register`` that parsed ``register`` arguments set
    (all but the images, masks, ``init`` transform file and device): one list for the command
    and the benchmarks, which time the same call."""
    from .parser import CROSS_CONTRAST, INIT_METHODS

    return {
        'mode': args.mode, 'lam': args.lam, 'steps': args.steps, 'extent': args.extent,
        'weights': assign_weights(args.weights, args.mode), 'refine': args.refine,
        'init_method': args.init if args.init in INIT_METHODS else 'network',
        'refine_metric': args.refine_metric, 'refine_levels': args.refine_levels,
        'refine_weight': args.refine_weight,
        'cross_contrast': CROSS_CONTRAST[args.cross_contrast], 'passes': args.passes,
    }


def run_registration(args, moving, fixed, *, masks: dict, init=None, device: str = 'cpu'):
    """``engine.register.register`` (or ``register_via`` with ``--via``) as the parsed
    ``register`` arguments ask; the command and the benchmarks' timed call share it."""
    from ..engine.register import register, register_via
    from ..io.images import load_image

    keywords = register_keywords(args)
    if getattr(args, 'via', None):
        if init is not None:
            raise SynthMorphError('an initial transform file (-i) cannot be combined with --via')
        via = load_image(args.via, kind='via image')
        return register_via(moving, via, fixed, device=device, **masks, **keywords)
    return register(moving, fixed, init=init, device=device, **masks, **keywords)


def run_register(args) -> int:

    from ..io.images import Geometry, load_image, load_masks, save_image
    from ..io.transforms import load_transform, save_transform
    from .parser import INIT_METHODS

    _set_threads(args.threads)
    start = time.perf_counter()
    if args.header_only and args.mode not in ('affine', 'rigid'):
        raise SynthMorphError('-H/--header-only needs a linear mode: use -m affine or -m rigid')
    if args.via and args.mid_space:
        raise SynthMorphError('-M/--mid-space has no meaning with --via (two registrations '
                              'composed): leave one of them out')
    if args.via and args.moving_lesion_mask:
        raise SynthMorphError('--moving-lesion-mask cannot be combined with --via: it would '
                              'have to be carried onto the via image. Register the via image '
                              '(the T1w the lesion was drawn on) with --moving-lesion-mask, '
                              'or MOVING without --via')
    if not any((args.out_moving, args.out_fixed, args.trans, args.inverse)):
        LOGGER.warning('no output requested (-o, -O, -t, -T): registering without writing')
    # Check every output name before the long work starts.
    for path in (args.out_moving, args.out_fixed):
        _check_image_name(path)
    for path in (args.trans, args.inverse):
        _check_transform_name(path, linear=args.mode in ('affine', 'rigid'))

    moving = load_image(args.moving, kind='moving image')
    fixed = load_image(args.fixed, kind='fixed image')
    masks = load_masks(args.fixed_mask, args.moving_mask, fixed_lesion=args.fixed_lesion_mask,
                       moving_lesion=args.moving_lesion_mask)
    if (args.fixed_mask or args.moving_mask) and not args.refine:
        LOGGER.warning('--fixed-mask/--moving-mask weight the refinement only: with --refine 0 '
                       'they change nothing')
    init = None
    if args.init not in INIT_METHODS:
        from ..io.transforms import transform_suffix

        if transform_suffix(args.init) is None and not Path(args.init).exists():
            raise SynthMorphError(
                f'-i/--init {args.init!r} is neither a method ({", ".join(INIT_METHODS)}) '
                'nor a transform file (.lta, .txt, .mat, .h5)'
            )
        init = load_transform(
            args.init, reference=Geometry.from_image(fixed), moving=Geometry.from_image(moving)
        )
        if not init.is_linear:
            raise SynthMorphError(f'the initial transform <{args.init}> must be linear')
    LOGGER.info('loaded inputs in %.2f s', time.perf_counter() - start)

    from ..engine.register import header_moved_image, moved_image

    result = run_registration(args, moving, fixed, masks=masks, init=init,
                              device=_device(args.gpu))
    _warn_untrained(result.info)
    outputs = _Outputs()
    write_start = time.perf_counter()
    try:
        if args.trans:
            outputs.add(save_transform(result.forward, args.trans,
                                       field_convention=args.field_convention))
        if args.inverse:
            outputs.add(save_transform(result.inverse, args.inverse,
                                       field_convention=args.field_convention))
        if args.mid_space:
            to_moving, to_fixed = result.mid_space()
        else:  # the deformable inverse is built only when -O asks for it
            to_moving, to_fixed = result.forward, None
        if args.out_moving:
            img = (header_moved_image(moving, to_moving) if args.header_only
                   else moved_image(moving, to_moving, device=_device(args.gpu)))
            outputs.add(save_image(img, args.out_moving))
        if args.out_fixed:
            to_fixed = to_fixed or result.inverse
            img = (header_moved_image(fixed, to_fixed) if args.header_only
                   else moved_image(fixed, to_fixed, device=_device(args.gpu)))
            outputs.add(save_image(img, args.out_fixed))
    except BaseException:
        outputs.rollback()
        raise
    result.timings['write'] = time.perf_counter() - write_start
    LOGGER.info('timings: %s', ', '.join(f'{k} {v:.2f} s' for k, v in result.timings.items()))
    LOGGER.info('done in %.2f s', time.perf_counter() - start)
    print(_summary(args, result.info, time.perf_counter() - start, outputs.written), flush=True)
    return 0


def _summary(args, info: dict, seconds: float, written: list) -> str:
    """The line ``register`` ends with: what was registered, how, in how long, and the files
    written (it ended silently after a minute of work)."""
    how = [args.mode]
    if args.mode in ('joint', 'deform'):
        how.append(f'lambda {args.lam:g}')
    refine = (info.get('refine') or {}).get('iterations', args.refine)
    how.append(f'{refine} refinement iterations' if refine else 'networks only')
    if args.via:
        how.append(f'through {Path(args.via).name}')
    files = ', '.join(str(p) for p in written) or 'nothing (no output asked for)'
    return (f'synthmorph-app register: {Path(args.moving).name} -> {Path(args.fixed).name} '
            f'({", ".join(how)}) in {seconds:.1f} s; wrote {files}')


def run_apply(args) -> int:
    from ..engine.register import moved_image
    from ..io.images import Geometry, load_image, save_image
    from ..io.transforms import is_fsl_matrix, load_chain

    if len(args.pairs) % 2:
        raise SynthMorphError(
            'apply needs pairs of IMAGE OUT; got an odd number of paths: '
            + ' '.join(args.pairs)
        )
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    for _, out in pairs:
        _check_image_name(out)
    reference = None
    if args.reference:
        reference = Geometry.from_image(
            load_image(args.reference, kind='reference image', frames=True))
    for path, _ in args.before:
        if is_fsl_matrix(path):
            raise SynthMorphError(
                f'<{path}> is an FSL FLIRT matrix, whose meaning needs the grids of the two '
                'images FLIRT used: in a chain (--before) convert it first, e.g. '
                'c3d_affine_tool -ref REF -src IN FILE -fsl2ras -oitk FILE.txt')
    # an FSL matrix depends on the grid of the image it moves: read for each image below
    fsl = is_fsl_matrix(args.trans)
    if fsl and reference is None:
        raise SynthMorphError(
            f'<{args.trans}> is an FSL FLIRT matrix: give its reference image (FLIRT\'s -ref) '
            'with -r/--reference')
    if fsl and args.before:
        raise SynthMorphError(
            f'<{args.trans}> is an FSL FLIRT matrix, whose meaning needs the grid of the image '
            'FLIRT moved, which a chain (--before) does not give: convert it first, e.g. '
            'c3d_affine_tool -ref REF -src IN FILE -fsl2ras -oitk FILE.txt')
    if fsl and args.invert:
        raise SynthMorphError(
            f'<{args.trans}> is an FSL FLIRT matrix, not inverted here: invert it with FSL '
            '(convert_xfm -omat inverse.mat -inverse FILE) and apply that, with -r set to '
            "FLIRT's -in image")

    def transform_for(moving):
        xfm = load_chain(args.trans, before=args.before, invert=args.invert,
                         reference=reference, moving=moving,
                         field_convention=args.field_convention)
        if reference is None and xfm.reference is None and xfm.field_geometry is None:
            raise SynthMorphError(f'the transform <{args.trans}> carries no output grid: give '
                                  'one with -r/--reference')
        return xfm

    if args.before:
        LOGGER.info('each image goes through %s, then %s%s',
                    ', then '.join(f'{p}{" (inverted)" * inv}' for p, inv in args.before),
                    args.trans, ' (inverted)' * args.invert)
    xfm = None if fsl else transform_for(None)
    import numpy as np

    dtype = None
    if args.dtype:
        try:
            dtype = np.dtype(args.dtype)
        except TypeError:
            raise SynthMorphError(f'unknown data type {args.dtype!r} for -t/--type') from None
    outputs = _Outputs()
    try:
        for image, out in pairs:
            LOGGER.info('resampling %s -> %s', image, out)
            img = load_image(image, kind='input image', frames=True)
            moved = moved_image(img, xfm or transform_for(Geometry.from_image(img)), reference,
                                mode=args.method, fill=args.fill, dtype=dtype,
                                device=_device(args.gpu))
            outputs.add(save_image(moved, out))
            frames = f', {img.shape[3]} frames' if len(img.shape) > 3 else ''
            print(f'synthmorph-app apply: {Path(image).name} -> {out} ({args.method}{frames})',
                  flush=True)
    except BaseException:
        outputs.rollback()
        raise
    return 0


def _check_image_name(path):
    from ..io.images import IMAGE_SUFFIXES, image_suffix

    if path and image_suffix(path) is None:
        raise SynthMorphError(
            f'cannot write the image <{path}>: use one of {", ".join(IMAGE_SUFFIXES)}'
        )


def _check_transform_name(path, linear: bool):
    from ..io.transforms import LINEAR_SUFFIXES, TRANSFORM_SUFFIXES, transform_suffix

    if not path:
        return
    suffix = transform_suffix(path)
    if suffix is None:
        raise SynthMorphError(
            f'cannot write the transform <{path}>: use one of {", ".join(TRANSFORM_SUFFIXES)}'
        )
    if not linear and suffix in LINEAR_SUFFIXES:
        raise SynthMorphError(
            f'<{path}> holds linear transforms only; a deformable result needs .h5 or a '
            'displacement field (.nii.gz, .mgz)'
        )


def _warn_untrained(info: dict) -> None:
    for kind, card in info.get('models', {}).items():
        if card.get('trained') is False and card.get('used', True):
            print(
                f'WARNING: the {kind} model ({card.get("name", "?")}) has UNTRAINED random '
                'weights: its registrations are NOT meaningful. Give trained weights with '
                '-w/--weights (e.g. FreeSurfer 8 models/synthmorph.*.h5).',
                file=sys.stderr,
            )
