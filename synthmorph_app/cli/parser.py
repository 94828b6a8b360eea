"""Argument parsers of ``synthmorph-app register`` and ``synthmorph-app apply``.

The options follow FreeSurfer's ``mri_synthmorph`` so that its users feel at home.
"""

from __future__ import annotations

import argparse
import os
import textwrap

from .. import __version__
from ..engine import DEFAULT_REFINE

TRANSFORM_FORMATS = """\
transform files (the format follows the name; every file maps points of the FIXED space to the
MOVING space, i.e. it pulls the moving image onto the fixed grid, like ANTs/ITK and
mri_synthmorph; -T files are the same with the roles swapped):
  .lta          FreeSurfer LTA (RAS-to-RAS; src = moving, dst = fixed as FreeSurfer expects);
                linear only
  .txt, .mat    ITK affine as ANTs writes it (antsApplyTransforms -t file); linear only.
                Read also: ITK rigid/similarity types, and an FSL FLIRT .mat (text; read
                only, with the grids of both its images: apply -r REF, register -i)
  .h5           ITK composite transform [affine, displacement field] as fMRIPrep stores
                *_xfm.h5 (antsApplyTransforms, nitransforms, fMRIPrep read it)
  .nii.gz, .nii, .mgz
                dense displacement field on the fixed grid, affine included; vectors in
                ITK/ANTs convention (LPS, 5D) by default, or in mri_synthmorph's convention
                (RAS mm) with --field-convention synthmorph
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as a terminal shows them best: a paragraph of plain lines is
    wrapped to the width; one with indented lines (examples, a table of formats) is kept as
    written."""

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for para in text.split('\n\n'):
            lines = para.splitlines()
            if lines and not any(line[:1] in (' ', '\t', '-', '*', '#') for line in lines):
                paragraphs.append(textwrap.fill(' '.join(line.strip() for line in lines), width,
                                                initial_indent=indent, subsequent_indent=indent))
            else:
                paragraphs.append(''.join(indent + line
                                          for line in para.splitlines(keepends=True)))
        return '\n\n'.join(paragraphs)


class _AppendStep(argparse.Action):
    """``--before``/``--before-inverse``: one ordered list of ``(file, invert)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        steps = list(getattr(namespace, self.dest) or [])
        steps.append((values, option_string == '--before-inverse'))
        setattr(namespace, self.dest, steps)


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'lambda must lie in [0, 1], got {value}')
    return value


def _at_least(minimum: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value

    return check


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {value}')
    return value


def default_refine() -> int:
    """``$SYNTHMORPH_REFINE`` when set (e.g. 0 on a cluster that trusts the networks), else 15."""
    value = os.environ.get('SYNTHMORPH_REFINE', '')
    try:
        return max(0, int(value)) if value.strip() else DEFAULT_REFINE
    except ValueError:
        return DEFAULT_REFINE


INIT_METHODS = ('network', 'moments', 'identity')
#: ``--cross-contrast`` choices and the ``cross_contrast`` of ``engine.register.register``.
CROSS_CONTRAST = {'auto': None, 'yes': True, 'no': False}
INIT_HELP = ('how the affine starts: network (with --refine, its prediction competes with a '
             'coarse pose search over rotations and axis flips; the best by similarity wins), '
             'moments (the search only), identity (no search)')


def add_refine_arguments(p, init_files: bool = False) -> None:
    """Options of test-time refinement, shared by ``register`` and the BIDS-App.

    ``init_files``: the caller's own ``-i/--init`` also takes a transform file.
    """
    p.add_argument('--refine', type=_at_least(0), default=default_refine(), metavar='N',
                   help='test-time optimisation after the networks: N iterations at the finest '
                        'level (more at coarser ones), affine first, then the velocity field, '
                        'with the same lambda; 0: networks only (default %(default)s, or '
                        '$SYNTHMORPH_REFINE)')
    p.add_argument('--refine-metric', choices=('auto', 'lncc', 'mind'), default='auto',
                   help='similarity of the refinement: local NCC for the same contrast, NCC of '
                        'MIND descriptors across contrasts; auto compares the two images (in the '
                        'deformable modes the BIDS-App gives a T1w local NCC and other contrasts '
                        'MIND: the templates are T1w) (default auto)')
    p.add_argument('--refine-levels', type=_levels, metavar='MM,MM,..',
                   help='spacings (mm) of the deformable refinement levels, coarse to fine '
                        '(default 8,4,2,1.5; 8,4,2 takes about two thirds of the time, '
                        'a little less accurate)')
    if not init_files:
        p.add_argument('--init', dest='init_method', default='network',
                       choices=INIT_METHODS, help=INIT_HELP + ' (default network)')
    p.add_argument('--cross-contrast', choices=tuple(CROSS_CONTRAST), default='auto',
                   help='whether moving and fixed differ in MRI contrast. yes makes the '
                        'deformable refinement smoother (lambda 0.5 acts as 0.7), so that what '
                        'only the contrasts make look different (FLAIR lesions, another '
                        'grey-white contrast) does not pull the field. auto: yes where the '
                        'similarity check picks MIND (PDw, T2w to T1w); the BIDS-App decides '
                        'by the suffix (the templates are T1w). no also lets --refine-metric '
                        'auto keep local NCC unless the intensities run opposite ways (an '
                        "infant's T1w gets MIND). Default auto")
    p.add_argument('--refine-weight', choices=('brain', 'head', 'none'), default='brain',
                   help='where the refinement similarity counts: brain (the affine stage '
                        'weighs a rough brain weight of our own, so neck and face do not pull '
                        "the whole alignment; the deformable stage the fixed image's head, "
                        'which for a skull-stripped image is the brain with its cortex; the '
                        "BIDS-App weighs the template by the template's own brain mask "
                        'instead), head or none (default brain). A weight that covers more '
                        'than the rough brain weight counts each voxel as strongly, so lambda '
                        'means the same (benchmarks/README.md, "Session 39")')


def _levels(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of mm') from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f'levels must be positive mm, got {text!r}')
    return values


def add_register_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'register',
        help='register a moving image to a fixed image',
        description=(
            'Register MOVING to FIXED with SynthMorph networks (any MRI contrast, any '
            'resolution, with or without skull). Joint mode runs an affine network, then a '
            'deformable one whose smoothness you choose with -r, symmetric by construction.'
        ),
        epilog=TRANSFORM_FORMATS + """
examples:
  synthmorph-app register -o moved.nii.gz -t fwd.h5 -T inv.h5 t2w.nii.gz mni.nii.gz
  synthmorph-app register -m affine -t aff.lta moving.mgz fixed.mgz
  synthmorph-app register -m rigid -H -o moved_header.nii.gz moving.nii.gz fixed.nii.gz
  synthmorph-app register -o moved.nii.gz -t fwd.h5 -x mni_brain_mask.nii.gz t1w.nii.gz mni.nii.gz
  synthmorph-app register --via t1w.nii.gz -o flair_mni.nii.gz -t fwd.h5 flair.nii.gz mni.nii.gz
""",
        formatter_class=HelpFormatter,
    )
    p.add_argument('moving', help='moving image (NIfTI or MGZ, 3D)')
    p.add_argument('fixed', help='fixed image (NIfTI or MGZ, 3D)')
    p.add_argument('-m', '--model', dest='mode', default='joint',
                   choices=('joint', 'deform', 'affine', 'rigid'),
                   help='transformation model (default: joint = affine then deformable; '
                        'deform assumes affinely aligned inputs)')
    p.add_argument('-o', '--out-moving', metavar='FILE',
                   help='write the moving image moved onto the fixed grid')
    p.add_argument('-O', '--out-fixed', metavar='FILE',
                   help='write the fixed image moved onto the moving grid (inverse)')
    p.add_argument('-t', '--trans', metavar='FILE',
                   help='write the forward transform (fixed -> moving points; moves MOVING '
                        'onto FIXED); format by extension, see below')
    p.add_argument('-T', '--inverse', metavar='FILE',
                   help='write the inverse transform (moves FIXED onto MOVING)')
    p.add_argument('-H', '--header-only', action='store_true',
                   help='affine/rigid only: move -o/-O images by editing their header, '
                        'without resampling')
    p.add_argument('-i', '--init', metavar='METHOD|FILE', default='network',
                   help=INIT_HELP + '; or an initial linear transform file (.lta/.txt/.mat/.h5) '
                        'to start from (default network)')
    p.add_argument('-M', '--mid-space', action='store_true',
                   help='write -o/-O images in the mid-space halfway between the inputs (the matrix '
                        'square root of the affine, and half the warp in deformable modes)')
    p.add_argument('-j', '--threads', type=_at_least(1), metavar='N',
                   help='CPU threads (default: all cores torch sees)')
    p.add_argument('-g', '--gpu', action='store_true', help='run on the CUDA GPU')
    p.add_argument('-r', '--lambda', dest='lam', type=_unit_interval, default=0.5,
                   metavar='LAMBDA',
                   help='regularisation weight in [0, 1]: 0 sharpest, 1 smoothest (default 0.5)')
    p.add_argument('-n', '--steps', type=_at_least(5), default=7,
                   help='integration steps of the velocity field (default 7, at least 5)')
    p.add_argument('-e', '--extent', type=_positive_float, default=256.0, metavar='MM',
                   help='side of the cubic network space in mm, centred on each image '
                        '(default 256; 192 is faster for skull-stripped brains)')
    p.add_argument('--passes', type=_at_least(1), default=1, metavar='N',
                   help='joint/deform: run the deformable network N times, each pass on the '
                        'image the passes before moved (default 1). With --refine 0, 2 passes '
                        'raised mean Dice on 12 cross-subject T1w pairs from 0.433 to 0.463 '
                        'for about 0.2 s more; the refinement makes them unnecessary')
    p.add_argument('-w', '--weights', action='append', metavar='FILE',
                   help='model weights: a packaged name, our .pt/.json, or an official '
                        'SynthMorph Keras .h5 (synthmorph.affine.2.h5, synthmorph.rigid.1.h5, '
                        'synthmorph.deform.3.h5); repeat for several models. A file whose '
                        'name says affine/rigid/deform serves that model; otherwise the order '
                        'is affine (or rigid), then deform. Default: $SYNTHMORPH_WEIGHTS_DIR '
                        'or the packaged models.')
    add_refine_arguments(p, init_files=True)
    p.add_argument('-x', '--fixed-mask', metavar='FILE',
                   help='brain mask of the fixed image (same world space, any grid; e.g. a '
                        "template's desc-brain_mask, or a label map such as aseg: non-zero "
                        'is brain): the refinement similarity counts fully in it and at 0.1 '
                        'over the rest of the head, in place of --refine-weight (12 '
                        'whole-head T1w pairs: mean Dice 0.676 against 0.668; '
                        'benchmarks/README.md). The BIDS-App uses the template\'s own mask')
    p.add_argument('--moving-mask', metavar='FILE',
                   help='brain mask of the moving image, likewise (it weights the affine '
                        'refinement; the deformable one weighs by the fixed image)')
    p.add_argument('--moving-lesion-mask', metavar='FILE',
                   help='lesion mask of the moving image (a stroke, a resection cavity, a '
                        'tumour; same world space, any grid, non-zero in the lesion): the '
                        'lesion is filled from the tissue around it for the networks and the '
                        'refinement, and the refinement leaves it and a 2 mm rim out of its '
                        'similarity (cost-function masking, as ANTs -x), so the healthy brain '
                        'around it is not pulled into it; the field there follows its '
                        'surroundings (12 stroke-like cavities of 3-112 ml: the brain within '
                        '15 mm moved 3.7 mm without the mask, 1.5 mm with it; '
                        'benchmarks/README.md). The '
                        'BIDS-App takes it from sub-<label>_label-lesion_roi.nii.gz')
    p.add_argument('--fixed-lesion-mask', metavar='FILE',
                   help='lesion mask of the fixed image, likewise')
    p.add_argument('--via', metavar='FILE',
                   help='another image of the same person in the T1w-like contrast of FIXED '
                        '(e.g. the T1w of the session of a FLAIR): MOVING is aligned to it '
                        'rigidly, it is registered to FIXED with the options above, and the '
                        'transforms written are the two composed, so every contrast lands '
                        'where the T1w does (12 FLAIRs onto the MNI template: mean Dice 0.581 '
                        'directly, 0.652 through their T1w; benchmarks/README.md)')
    p.add_argument('--field-convention', choices=('itk', 'synthmorph'), default='itk',
                   help='vector convention of displacement-field files (default itk: LPS, as '
                        'ANTs reads; synthmorph: RAS mm, as mri_synthmorph apply reads)')
    p.add_argument('-v', '--verbose', action='store_true', help='print progress and timings')
    return p


def add_apply_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'apply',
        help='apply a transform to images',
        description='Resample images through a transform written by register (or by ANTs, '
                    'FreeSurfer, fMRIPrep). Each IMAGE is resampled onto the grid the '
                    'transform defines (its fixed image) and written to OUT. An IMAGE may be a '
                    '4D series (fMRI, tissue probability maps): each frame is resampled as a 3D '
                    'image would be (as antsApplyTransforms -e 3), and the repetition time is '
                    'kept (diffusion gradient directions are not rotated).',
        epilog=TRANSFORM_FORMATS + """
examples:
  synthmorph-app apply fwd.h5 moving.nii.gz moved.nii.gz
  synthmorph-app apply -m nearest fwd.h5 aseg.mgz aseg_moved.mgz
  synthmorph-app apply --before sub-01_from-boldref_to-T1w_mode-image_xfm.txt \\
      sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.h5 bold.nii.gz bold_mni.nii.gz
""",
        formatter_class=HelpFormatter,
    )
    p.add_argument('trans', help='transform file (fixed -> moving, see below)')
    p.add_argument('pairs', nargs='+', metavar='IMAGE OUT',
                   help='input image (3D, or a 4D series) and output path; repeat for more '
                        'images')
    p.add_argument('-m', '--method', default='linear', choices=('linear', 'nearest', 'labels'),
                   help='interpolation (default linear; labels: per-label linear, for '
                        'segmentations)')
    p.add_argument('-t', '--type', dest='dtype', metavar='DTYPE',
                   help='output data type (e.g. float32, uint8; default: that of the input)')
    p.add_argument('-f', '--fill', type=float, default=0.0,
                   help='value of voxels that map outside the input (default 0)')
    p.add_argument('-r', '--reference', metavar='IMAGE',
                   help='output grid; needed for transforms that carry no grid (.txt/.mat; '
                        'TRANS inverted by -I) and for an FSL FLIRT matrix (its -ref image)')
    p.add_argument('-I', '--invert', action='store_true',
                   help='use the inverse of TRANS (linear transforms only; a deformable one '
                        'has its inverse file: register -T, or the BIDS-App\'s '
                        'from-<template>_to-T1w), as antsApplyTransforms -t [TRANS,1]. E.g. a '
                        'template atlas into BOLD space: -m labels -r BOLDREF --before '
                        'sub-X_from-MNI152NLin6Asym_to-T1w_mode-image_xfm.h5 -I '
                        'sub-X_task-Y_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt')
    p.add_argument('--before', action=_AppendStep, metavar='FILE', default=[],
                   help='a transform each IMAGE goes through before TRANS: from the IMAGE\'s '
                        'space to the space TRANS moves (fixed -> moving points like TRANS), '
                        "e.g. fMRIPrep's sub-X_from-boldref_to-T1w_mode-image_xfm.txt before "
                        'a T1w -> MNI TRANS, so a BOLD series reaches MNI in one resampling. '
                        "Repeat for longer chains, the IMAGE's own first. The same chain in "
                        'antsApplyTransforms: -t TRANS, then the --before files last to first')
    p.add_argument('--before-inverse', action=_AppendStep, metavar='FILE', dest='before',
                   help='as --before, with the inverse of FILE (linear only), in its place '
                        'in the chain (antsApplyTransforms -t [FILE,1])')
    p.add_argument('--field-convention', choices=('itk', 'synthmorph'), default='itk',
                   help='vector convention of a displacement-field transform (default itk)')
    p.add_argument('-g', '--gpu', action='store_true', help='run on the CUDA GPU')
    p.add_argument('-v', '--verbose', action='store_true', help='print progress')
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='synthmorph-app',
        description=(
            'SynthMorph registration in PyTorch: any-contrast affine, rigid, deformable and\n'
            'joint registration of brain MRI, from the command line.'
        ),
        usage=(
            'synthmorph-app BIDS_DIR OUTPUT_DIR {participant,group} [options]\n'
            '       synthmorph-app demo OUTPUT_DIR\n'
            '       synthmorph-app [-h] [--version] COMMAND ...'
        ),
        epilog=(
            'The BIDS-App:\n'
            '  synthmorph-app BIDS_DIR OUTPUT_DIR participant   register every subject\'s\n'
            '      anatomical images to MNI152NLin6Asym and write BIDS derivatives\n'
            '      (its options: synthmorph-app BIDS_DIR OUTPUT_DIR participant --help)\n'
            '  synthmorph-app BIDS_DIR OUTPUT_DIR group         collect QC into group/\n'
            '  synthmorph-app demo OUTPUT_DIR                   the BIDS-App on the small\n'
            '      dataset that ships with the package\n\n'
            'Run "synthmorph-app COMMAND --help" for the options of each command.'
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument('--version', action='version', version=f'synthmorph-app {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True,
                                prog='synthmorph-app')
    add_register_parser(sub)
    add_apply_parser(sub)
    from .train import add_synth_parser, add_train_parser

    add_train_parser(sub)
    add_synth_parser(sub)
    from .evaluate import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def default_weights_dir() -> str | None:
    return os.environ.get('SYNTHMORPH_WEIGHTS_DIR')
