"""``synthmorph-app evaluate``: the paper's metrics of one registration, as a table and JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import SynthMorphError
from .parser import HelpFormatter


def _labels(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(',', ' ').split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected integers like 2,3,4, got {text!r}') from None
    if not values:
        raise argparse.ArgumentTypeError('give at least one label')
    return values


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    from .parser import _at_least

    p = subparsers.add_parser(
        'evaluate',
        help='measure a registration: Dice, MIND-NCC, log-Jacobian spread, folding',
        description=(
            'Evaluate one registration with the metrics of the SynthMorph paper: Dice of label '
            'maps (per label and mean), NCC of MIND descriptors between the moved and the fixed '
            'image (contrast-independent: fair for FLAIR to T1w), the standard deviation of the '
            'log Jacobian determinant of the transform and the % of voxels where it is <= 0 '
            '(folding). Everything is measured on the fixed image\'s grid: the moving image and '
            'labels are resampled through the transform (-t; labels by nearest neighbour), or '
            'through their headers when no transform is given (e.g. an image already moved by '
            'register -o). Image figures and Jacobian figures are taken inside --mask, else '
            'inside the fixed labels > 0, else over the whole grid.'
        ),
        epilog="""
examples:
  # a transform written by register, with label maps of both images
  synthmorph-app evaluate -f fixed.nii.gz -m moving.nii.gz -t fwd.h5 \\
      --fixed-labels fixed_aseg.nii.gz --moving-labels moving_aseg.nii.gz --largest 30
  # an already moved FLAIR against its T1w, inside a brain mask, JSON for a script
  synthmorph-app evaluate -f t1w.nii.gz -m flair_moved.nii.gz --mask brain.nii.gz -j out.json
""",
        formatter_class=HelpFormatter,
    )
    p.add_argument('-f', '--fixed', required=True, metavar='IMAGE',
                   help='fixed image: defines the grid of every figure')
    p.add_argument('-m', '--moving', metavar='IMAGE',
                   help='moving image (or an image already moved onto the fixed grid)')
    p.add_argument('-t', '--trans', metavar='FILE',
                   help='transform, fixed -> moving points (any format register writes)')
    p.add_argument('--fixed-labels', metavar='IMAGE', help='label map on the fixed grid')
    p.add_argument('--moving-labels', metavar='IMAGE', help='label map of the moving image')
    p.add_argument('--mask', metavar='IMAGE', help='where image and Jacobian figures count')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--labels', type=_labels, metavar='L,L,..',
                       help='labels to score (default: every label > 0 present in both maps)')
    which.add_argument('--largest', type=_at_least(1), metavar='N',
                       help='score the N largest labels of the fixed map present in both')
    p.add_argument('--per-label', action='store_true', help='print the Dice of each label')
    p.add_argument('-j', '--json', metavar='FILE', help='also write the figures as JSON')
    p.add_argument('--field-convention', choices=('itk', 'synthmorph'), default='itk',
                   help='vector convention of a displacement-field transform (default itk)')
    p.add_argument('-g', '--gpu', action='store_true', help='resample on the CUDA GPU')
    return p


def run_evaluate(args) -> int:
    from ..evaluate import evaluate_files, to_json
    from ..utils.bids import write_text_atomic

    if args.moving_labels and not args.fixed_labels:
        raise SynthMorphError('--moving-labels needs --fixed-labels (Dice compares two maps)')
    if not (args.moving or args.moving_labels or args.trans):
        raise SynthMorphError('nothing to evaluate: give -m/--moving, --moving-labels or -t')
    result = evaluate_files(
        args.fixed, args.moving, args.trans, fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels, mask=args.mask, labels=args.labels,
        largest=args.largest, field_convention=args.field_convention,
        device='cuda' if args.gpu else 'cpu',
    )
    print(result.table(per_label=args.per_label))
    if args.json:
        write_text_atomic(Path(args.json), to_json(result) + '\n')
    sys.stdout.flush()
    return 0

