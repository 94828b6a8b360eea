"""The BIDS-App: ``synthmorph-app BIDS_DIR OUTPUT_DIR {participant,group}`` and ``demo``.

Exit codes follow the BIDS-App execution spec: 0 success (or nothing left to do), 1 a failure
(the summary names each failed image and why, and each selected subject without an image of
the asked contrasts), 2 bad arguments, 16 the input is not valid BIDS,
18 no image matches the selection, 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..errors import SynthMorphError
from .parser import (
    CROSS_CONTRAST,
    HelpFormatter,
    _at_least,
    _unit_interval,
    add_refine_arguments,
)

LOGGER = logging.getLogger('synthmorph_app.cli.bids')

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INVALID_BIDS, EXIT_NOTHING = 0, 1, 2, 16, 18
#: Where the packaged demo dataset lives.
DEMO_DIR = Path(__file__).resolve().parents[1] / 'data' / 'demo'

EPILOG = """\
outputs (BIDS Derivatives, sMRIPrep/fMRIPrep names), per image and output space:
  sub-<label>/anat/sub-<label>_from-T1w_to-<tpl>_mode-image_xfm.h5   moves the image onto <tpl>
  sub-<label>/anat/sub-<label>_from-<tpl>_to-T1w_mode-image_xfm.h5   the inverse
  sub-<label>/anat/sub-<label>_space-<tpl>_res-<N>_T1w.nii.gz        the image on <tpl>'s grid
  (each with a JSON sidecar: Sources, template, mode, lambda, model sha256, version, command
  line, device, time, QC), sub-<label>.html (report), logs/CITATION.md (methods text).
  The .h5 files are ITK composite transforms that antsApplyTransforms, nitransforms and
  fMRIPrep read. With --output-lta, FreeSurfer LTA files too:
  sub-<label>/anat/sub-<label>_from-T1w_to-<tpl>_mode-image_xfm.lta   (affine, rigid)
  sub-<label>/anat/sub-<label>_from-T1w_to-<tpl>_mode-image_desc-linear_xfm.lta
      (joint, deform: the LINEAR PART ONLY, without the deformation) and their inverses.
  With sessions, files go to sub-<label>/ses-<label>/anat/ and carry ses-<label>.

lesion masks: a sub-<label>[_ses-<label>]_label-lesion_roi.nii.gz beside a T1w (non-zero in a
stroke, a resection cavity, a tumour; as fMRIPrep reads them) is used for that T1w and for the
images registered through it: the lesion is filled from the tissue around it and left out of
the similarity (cost-function masking); the sidecars name it (LesionMask), and the T1w's job
writes it on the template grid: sub-<label>_space-<tpl>_res-<N>_label-lesion_mask.nii.gz.

templates come from $TEMPLATEFLOW_HOME (nothing is downloaded); MNI152NLin6Asym:res-2 ships
with synthmorph-app.

examples:
  synthmorph-app demo out/                            # run on the packaged demo dataset
  synthmorph-app /data/bids /data/out participant --participant-label 01 02
  synthmorph-app /data/bids /data/out participant --contrasts T1w FLAIR \\
      --output-spaces MNI152NLin6Asym:res-2 MNI152NLin2009cAsym:res-1
  synthmorph-app /data/bids /data/out group           # qc.tsv and a QC page over subjects

exit codes: 0 success, 1 some image failed, a selected subject has no image of the
asked contrasts, or a --participant-label is not in the dataset (see the summary), 2 bad
arguments (also an OUTPUT_DIR that holds another dataset: raw data, another pipeline's
derivatives), 16 invalid BIDS input, 18 nothing to process, 130 interrupted (Ctrl-C),
143 stopped by SIGTERM (a time limit; finished images are kept, a rerun completes the rest).
"""


_positive_int = _at_least(1)
_non_negative_int = _at_least(0)


def _memory_gb(text: str) -> float:
    units = {'k': 1e-6, 'm': 1e-3, 'g': 1.0, 't': 1e3}
    raw = text.strip().lower().rstrip('b')
    scale = units.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a memory size (e.g. 8GB)') from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f'memory must be positive, got {text!r}')
    return value


def _output_space(text: str) -> str:
    from ..utils.templates import parse_output_spaces

    try:
        parse_output_spaces([text])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f'<{path}> is not an existing directory')
    return path


def build_bids_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser (positionals ``bids_dir output_dir analysis_level``)."""
    parser = argparse.ArgumentParser(
        prog='synthmorph-app',
        description=(
            'SynthMorph BIDS-App: register every anatomical image of a BIDS dataset to '
            'TemplateFlow templates (any MRI contrast, with or without skull) and write BIDS '
            'derivatives that fMRIPrep-like pipelines reuse. The commands "demo", "register", '
            '"apply", "evaluate", "train" and "synth" are described by "synthmorph-app '
            'COMMAND --help".'
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument('bids_dir', type=Path, help='root of the input BIDS dataset')
    parser.add_argument('output_dir', type=Path,
                        help='where derivatives go: a folder of their own (created; safe '
                             'to share between runs on different participants; one that '
                             'holds another dataset is refused)')
    parser.add_argument('analysis_level', choices=('participant', 'group'),
                        help='participant: register images; group: collect QC into group/')
    parser.add_argument('--version', action='version', version=f'synthmorph-app {__version__}')

    g = parser.add_argument_group('selecting the input')
    g.add_argument('--participant-label', '--participant_label', nargs='+', metavar='LABEL',
                   help='subjects to process (with or without "sub-"; default: all)')
    g.add_argument('--session-label', nargs='+', metavar='LABEL',
                   help='sessions to process (default: all)')
    g.add_argument('--contrasts', nargs='+', default=['T1w'], metavar='SUFFIX',
                   help='anatomical contrasts to register: BIDS suffixes such as T1w T2w PDw '
                        'FLAIR, or "all" (default: T1w)')
    g.add_argument('--bids-filter-file', type=Path, metavar='FILE',
                   help='JSON of pybids filters per contrast, e.g. '
                        '{"t1w": {"session": "01", "acquisition": "mprage"}}')
    g.add_argument('--skip-bids-validation', action='store_true',
                   help='do not check that the input is valid BIDS')

    g = parser.add_argument_group('registration')
    g.add_argument('--output-spaces', nargs='+', type=_output_space, metavar='SPACE',
                   default=None,
                   help='templates in fMRIPrep syntax, e.g. MNI152NLin6Asym:res-2 '
                        'MNI152NLin2009cAsym:res-1 (default: MNI152NLin6Asym:res-2, packaged); '
                        "res is the index of one of the template's TemplateFlow resolutions; "
                        'without it the finest there is. Others must be in $TEMPLATEFLOW_HOME')
    g.add_argument('--mode', choices=('joint', 'affine', 'rigid', 'deform'), default='joint',
                   help='transformation model (default joint: affine then deformable)')
    g.add_argument('--lambda', dest='lam', type=_unit_interval, default=0.5, metavar='LAMBDA',
                   help='deformation regularisation in [0, 1]: 0 sharpest, 1 smoothest '
                        '(default 0.5)')
    add_refine_arguments(g)
    g.add_argument('--weights', nargs='+', metavar='FILE',
                   help='model weights (packaged name, .pt/.json or official SynthMorph .h5); '
                        'a name with affine/rigid/deform serves that model')
    g.add_argument('--extent', type=float, default=256.0, metavar='MM',
                   help='side of the network space in mm (default 256; 192 is faster)')
    g.add_argument('--passes', type=_positive_int, default=1, metavar='N',
                   help='runs of the deformable network, each on the image the runs before '
                        'moved (default 1; 2 helps with --refine 0, see register --help)')
    g.add_argument('--via-t1w', action=argparse.BooleanOptionalAction, default=True,
                   help='register each image of another contrast (T2w, PDw, FLAIR...) through '
                        'the T1w of its session: rigidly to that T1w, then by the T1w\'s own '
                        'registration to the (T1w) template, one composed transform, so all '
                        'of a person\'s images land where the T1w does. 12 FLAIRs onto '
                        'MNI152NLin6Asym: mean Dice 0.581 directly, 0.652 through the T1w '
                        '(benchmarks/README.md); the T1w\'s registration is computed once and '
                        'kept in the work directory for its own job and these. Images with no '
                        'T1w beside them, and '
                        'all of them with --no-via-t1w, are registered directly '
                        '(default: --via-t1w)')
    g.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                   help='where the networks and the refinement run (default auto: CUDA when '
                        'available; cuda where torch sees none stops the run before it starts)')
    g.add_argument('--no-figures', dest='figures', action='store_false',
                   help='skip the report figures (faster)')
    g.add_argument('--output-lta', action='store_true',
                   help='also write FreeSurfer LTA files next to the .h5 transforms. An LTA '
                        'holds one matrix: for --mode affine/rigid the whole transform; for '
                        'joint/deform only its linear part, named desc-linear (use the .h5 '
                        'for the full transform)')

    g = parser.add_argument_group('resources and execution')
    g.add_argument('-w', '--work-dir', type=Path, metavar='DIR',
                   help='intermediate files, kept: a rerun finds finished steps there '
                        '(default: a folder in the system temp dir, from which the files of '
                        'the images that finished are removed at the end of the run; those '
                        'of failed images stay for their crash reports)')
    g.add_argument('--nprocs', '--n-cpus', type=_positive_int, metavar='N',
                   help='processes run in parallel (default: the CPUs this process may run on: '
                        'a Slurm or container CPU allocation, else all)')
    g.add_argument('--omp-nthreads', type=_positive_int, metavar='N',
                   help='threads per registration (default: the CPUs shared among the '
                        'registrations to run, at most 8: one each when there are at least '
                        'as many registrations as CPUs, which then run side by side)')
    g.add_argument('--mem', '--mem-gb', dest='mem_gb', type=_memory_gb, metavar='SIZE',
                   help='memory limit for scheduling, e.g. 16GB')
    g.add_argument('--resume', action=argparse.BooleanOptionalAction, default=True,
                   help='skip images whose derivatives are complete and were made with the '
                        'same registration settings (mode, lambda, refinement, weights, '
                        'extent, passes, the route through the T1w: the sidecars record them '
                        'as RegistrationSettings, with the sha256 of the files read); an '
                        'image made with other ones, or replaced since, is registered again '
                        'and its derivatives replaced (default: --resume)')
    g.add_argument('--notrack', action='store_true',
                   help='accepted for compatibility: synthmorph-app never sends telemetry')
    g.add_argument('--dry-run', action='store_true',
                   help='print what would be processed, and stop')
    g.add_argument('-v', '--verbose', action='count', default=0,
                   help='more messages (-v progress, -vv debugging)')
    return parser


def build_demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='synthmorph-app demo',
        description='Run the whole BIDS-App on the small dataset that ships with '
                    'synthmorph-app (two subjects\' T1w) and print where the report is.',
    )
    parser.add_argument('output_dir', type=Path, help='where the derivatives go')
    parser.add_argument('-w', '--work-dir', type=Path, metavar='DIR')
    parser.add_argument('--nprocs', type=_positive_int, metavar='N')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument('--weights', nargs='+', metavar='FILE')
    parser.add_argument('-v', '--verbose', action='count', default=0)
    return parser


def main_demo(argv: list[str]) -> int:
    """``synthmorph-app demo OUT_DIR``: the packaged dataset through the participant level."""
    args = build_demo_parser().parse_args(argv)
    bids_argv = [str(DEMO_DIR), str(args.output_dir), 'participant', '--device', args.device]
    if args.work_dir:
        bids_argv += ['-w', str(args.work_dir)]
    if args.nprocs:
        bids_argv += ['--nprocs', str(args.nprocs)]
    if args.weights:
        bids_argv += ['--weights', *args.weights]
    bids_argv += ['-v'] * args.verbose
    print(f'synthmorph-app demo: registering the packaged dataset <{DEMO_DIR}> to '
          'MNI152NLin6Asym (2 mm); this takes a minute or two on a laptop CPU.')
    return main_bids(bids_argv)


def main_bids(argv: list[str] | None = None) -> int:
    """Parse the BIDS-App arguments and run."""
    args = build_bids_parser().parse_args(argv)
    args.command_line = shlex.join(['synthmorph-app', *(sys.argv[1:] if argv is None
                                                          else argv)])
    return run_bids(args)


def _setup_logging(verbose: int, log_file: Path | None = None) -> None:
    level = {0: 25, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.addLevelName(25, 'IMPORTANT')
    root = logging.getLogger('synthmorph_app')
    root.setLevel(min(level, logging.INFO))
    fmt = logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s', '%H:%M:%S')
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, '_smapp', False)
               for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._smapp = True
        handler.setLevel(level)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.INFO)
        fh.setFormatter(fmt)
        root.addHandler(fh)
        logging.getLogger('py.warnings').addHandler(fh)
    logging.captureWarnings(True)


def run_bids(args: argparse.Namespace) -> int:
    """Run the BIDS-App on parsed arguments; returns the exit code."""
    os.environ.setdefault('NIPYPE_NO_ET', '1')
    start = time.time()
    bids_dir = Path(args.bids_dir).expanduser().absolute()
    out_dir = Path(args.output_dir).expanduser().absolute()
    if out_dir == bids_dir or bids_dir in out_dir.parents and out_dir.parent == bids_dir:
        print(f'synthmorph-app: error: the output directory <{out_dir}> must not be the input '
              'dataset itself; use e.g. <BIDS_DIR>/derivatives/synthmorph', file=sys.stderr)
        return EXIT_USAGE
    from ..utils.bids import foreign_dataset

    other = foreign_dataset(out_dir)
    if other:  # its description (and .bidsignore) would be replaced by ours
        print(f'synthmorph-app: error: the output directory <{out_dir}> holds {other}. '
              'synthmorph-app writes a derivatives dataset of its own, with its own '
              'dataset_description.json: give it a folder of its own, e.g. '
              f'<{out_dir.parent / "synthmorph"}>', file=sys.stderr)
        return EXIT_USAGE
    run_id = time.strftime('%Y%m%d-%H%M%S') + f'_{uuid.uuid4().hex[:8]}'
    work_dir = Path(args.work_dir).expanduser().absolute() if args.work_dir else \
        Path(tempfile.gettempdir()) / f'synthmorph-app-work-{os.getuid()}'
    command_line = getattr(args, 'command_line', '') or 'synthmorph-app'
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f'synthmorph-app: error: cannot create a folder: {err}', file=sys.stderr)
        return EXIT_FAILURE
    _setup_logging(args.verbose, out_dir / 'logs' / f'synthmorph-app_{run_id}.log')

    from ..utils.templates import setup_templateflow_home

    tf_home = setup_templateflow_home(work_dir)
    restore = _stop_on_sigterm()
    try:
        if args.analysis_level == 'group':
            return _run_group(out_dir)
        return _run_participant(args, bids_dir, out_dir, work_dir, run_id, command_line,
                                tf_home, start)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated)
        how = 'stopped by SIGTERM (a time limit?)' if terminated else 'interrupted'
        print(f'synthmorph-app: {how}; finished images are kept, a rerun completes the '
              'others.', file=sys.stderr)
        return 143 if terminated else 130
    finally:
        restore()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``docker stop``), raised where Ctrl-C would be."""


#: set when SIGTERM came: an exception raised by a signal handler can be swallowed (it lands in
#: a garbage-collection callback, say), so the run also checks this before and after its
#: workflow
_TERMINATED: list[int] = []


def _check_terminated() -> None:
    if _TERMINATED:
        raise Terminated()


def _stop_on_sigterm():
    """Make SIGTERM stop the run as Ctrl-C does (the summary is printed, the exit code says
    so) instead of ending the process on the spot; return what puts the process back as it
    was (nothing to do where signals cannot be set: not the main thread)."""
    main = os.getpid()

    def stop(signum, frame):
        import multiprocessing

        if os.getpid() != main:  # a Nipype worker (forked with this handler): end quietly
            os._exit(128 + signum)
        _TERMINATED.append(signum)
        # the workers stop too (a batch system signals them all; `kill PID` only this one,
        # which would otherwise wait for their registrations to end); the pool's complaints
        # about them (BrokenProcessPool tracebacks) would only bury the message
        logging.getLogger('concurrent.futures').setLevel(logging.CRITICAL)
        for child in multiprocessing.active_children():
            child.terminate()
        raise Terminated()

    default_hook = sys.unraisablehook

    def quiet(unraisable):  # raised inside a garbage-collection callback: _TERMINATED serves
        if not isinstance(unraisable.exc_value, Terminated):
            default_hook(unraisable)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        return lambda: None
    sys.unraisablehook = quiet

    def restore():
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = default_hook

    return restore


def _run_group(out_dir: Path) -> int:
    from ..reports.group import write_group_report

    try:
        tsv, html = write_group_report(out_dir)
    except SynthMorphError as err:
        print(f'synthmorph-app group: error: {err}', file=sys.stderr)
        return EXIT_NOTHING
    print(f'synthmorph-app group: QC table <{tsv}>, report <{html}>')
    header, *lines = tsv.read_text().splitlines()
    rows = [dict(zip(header.split('\t'), line.split('\t'))) for line in lines]
    outliers = [r['image'] for r in rows if r.get('outlier')]
    warned = [r['image'] for r in rows if r.get('warnings') not in (None, '', '0', 'n/a')]
    print(f'  {len(rows)} registration(s); {len(outliers)} outlier(s)'
          + (f': {", ".join(outliers)}' if outliers else '')
          + f'; {len(warned)} with warnings' + (f': {", ".join(warned)}' if warned else ''))
    return EXIT_OK


def _run_participant(args, bids_dir, out_dir, work_dir, run_id, command_line, tf_home,
                     start) -> int:
    from ..interfaces.derivatives import forward_sidecar, is_complete, settings_changes
    from ..utils.bids import (
        BIDSError,
        NothingToDoError,
        collect_data,
        image_lesion,
        load_bids_filters,
        session_t1w,
        validate_dataset,
        write_dataset_description,
        write_json_atomic,
    )
    from ..utils.templates import (
        DEFAULT_SPACE,
        get_template,
        parse_output_spaces,
        space_label,
        template_of,
    )

    try:
        if not args.skip_bids_validation:
            validate_dataset(bids_dir, args.participant_label)
        elif not bids_dir.is_dir():
            raise BIDSError(f'The BIDS dataset <{bids_dir}> does not exist.')
    except BIDSError as err:
        print(f'synthmorph-app: invalid BIDS input: {err}', file=sys.stderr)
        return EXIT_INVALID_BIDS
    try:
        spaces = parse_output_spaces(args.output_spaces or [DEFAULT_SPACE])
        for name, spec in spaces:  # fail early, before any work, on a missing template
            get_template(name, spec)
        filters = load_bids_filters(args.bids_filter_file)
        selection = collect_data(bids_dir, participant_labels=args.participant_label,
                                 session_labels=args.session_label, contrasts=args.contrasts,
                                 bids_filters=filters)
    except NothingToDoError as err:
        print(f'synthmorph-app: nothing to process: {err}', file=sys.stderr)
        return EXIT_NOTHING
    except BIDSError as err:  # pybids could not index the dataset
        print(f'synthmorph-app: invalid BIDS input: {err}', file=sys.stderr)
        return EXIT_INVALID_BIDS
    except SynthMorphError as err:
        print(f'synthmorph-app: error: {err}', file=sys.stderr)
        return EXIT_FAILURE

    subjects = selection.images
    missing = {sub: _missing_reason(sub, names, args.contrasts, selection.sessions,
                                    selection.filtered)
               for sub, names in selection.missing.items()}
    for sub in selection.unknown:  # asked for by label, not in the dataset
        missing[sub] = (f'sub-{sub}: not in <{bids_dir}> (its participants: '
                        f'{", ".join(selection.subjects)}); check --participant-label.')
    for reason in missing.values():
        print(f'synthmorph-app: {reason}', file=sys.stderr)
    weights = None
    if args.weights:
        from .run import assign_weights

        try:
            weights = assign_weights(args.weights, args.mode)
        except SynthMorphError as err:
            print(f'synthmorph-app: error: {err}', file=sys.stderr)
            return EXIT_FAILURE
        # the registrations run in folders of their own: a file named relative to here is
        # given by its absolute path (a packaged model's name stays a name)
        weights = {kind: str(Path(spec).absolute()) if Path(spec).is_file() else spec
                   for kind, spec in weights.items()}
    settings = _registration_settings(args, weights)
    labels = [space_label(n, s) for n, s in spaces]
    lta_mode = args.mode if args.output_lta else None
    plan: dict[str, list[tuple[str, list[str]]]] = {}
    done: list[str] = []
    redone: dict[str, str] = {}  # image -> the settings that changed since its derivatives
    clashes = _name_clashes(subjects)  # images that would write the same derivatives
    for sub, images in subjects.items():
        for image in images:
            # each space's sidecar read once: the settings it records decide with the files
            records = [forward_sidecar(out_dir, image, n, s) for n, s in spaces]
            signature = _signature(settings, image, args, records[0])
            lesion = image_lesion(image) is not None
            todo = []
            for lab, (n, s), record in zip(labels, spaces, records):
                changes = settings_changes(record.get('RegistrationSettings'), signature)
                if args.resume and str(image) not in clashes and not changes and is_complete(
                        out_dir, image, n, s, lta_mode=lta_mode, lesion=lesion):
                    continue
                todo.append(lab)
                if args.resume and changes:
                    redone[str(image)] = _changes_shown(changes)
            # resolutions of one template share its transform files: all are made again
            # from one registration when one of them is
            again = {template_of(lab) for lab in todo}
            todo = [lab for lab in labels if template_of(lab) in again]
            if todo:
                plan.setdefault(sub, []).append((str(image), todo))
            else:
                done.append(str(image))
    n_todo = sum(len(v) for v in plan.values())
    print(f'synthmorph-app {__version__}: {n_todo} image(s) to register to '
          f'{", ".join(labels)}; {len(done)} already finished (skipped).')
    if redone:
        print(f'synthmorph-app: {len(redone)} image(s) were registered before with other '
              'settings or from files that changed since: they are registered again and their '
              'derivatives replaced (marked "other settings" or "changed" below; --no-resume '
              'redoes everything)')
    lesions = []
    unreadable: dict[str, str] = {}  # jobs that cannot start: {image: why}
    for sub, images in plan.items():
        for image, todo in images:
            via = session_t1w(image) if args.via_t1w else None
            through = f' (through {via.name})' if via else ''
            lesion = image_lesion(image, via)
            if lesion:
                through += f' (lesion mask {lesion.name})'
                lesions.append(str(lesion))
            reason = clashes.get(image) or _unreadable(image, via, lesion)
            if reason:
                unreadable[image] = reason
                through += (' (NAME CLASH: fails, see below)' if image in clashes
                            else ' (NOT READABLE: fails, see below)')
            if image in redone:
                through += f' ({redone[image]})'
            print(f'  sub-{sub}: {Path(image).name} -> {", ".join(todo)}{through}')
    no_cuda = args.device == 'cuda' and _resolve_device('auto') != 'cuda'
    if args.dry_run:
        for image, reason in unreadable.items():
            print(f'synthmorph-app: <{image}> will fail: {reason}', file=sys.stderr)
        if no_cuda:
            print('synthmorph-app: warning: --device cuda, and this machine has no CUDA device: '
                  'the run must go where one is', file=sys.stderr)
        return EXIT_FAILURE if selection.unknown else EXIT_OK
    if no_cuda:
        # every registration would fail on its own, with a crash file each: say it once
        print('synthmorph-app: error: --device cuda was asked for, but torch sees no CUDA '
              'device here (no GPU, no driver, or a CPU build of torch): run where one is, or '
              'leave --device at auto (the GPU where there is one, else the CPUs)',
              file=sys.stderr)
        return EXIT_FAILURE
    # files named but absent (an unfetched DataLad file) fail here, by name; the rest run
    plan = {sub: kept for sub, images in plan.items()
            if (kept := [job for job in images if job[0] not in unreadable])}

    device = _resolve_device(args.device)
    nprocs = args.nprocs or usable_cpus()
    n_jobs = sum(len(todo) for images in plan.values() for _, todo in images)
    omp = args.omp_nthreads or threads_per_registration(nprocs, n_jobs)
    write_dataset_description(out_dir, bids_dir)
    config = {
        'version': __version__, 'run_id': run_id, 'command_line': command_line,
        'bids_dir': str(bids_dir), 'output_dir': str(out_dir), 'work_dir': str(work_dir),
        'templateflow_home': str(tf_home), 'participant_label': args.participant_label,
        'session_label': args.session_label, 'contrasts': args.contrasts,
        'bids_filters': filters, 'output_spaces': labels, 'mode': args.mode,
        'lambda': args.lam, 'refine': args.refine, 'weights': weights, 'extent': args.extent,
        'passes': args.passes, 'via_t1w': args.via_t1w,
        'device': device, 'nprocs': nprocs, 'omp_nthreads': omp, 'mem_gb': args.mem_gb,
        'resume': args.resume, 'figures': args.figures, 'output_lta': args.output_lta,
        'lesion_masks': sorted(set(lesions)),
    }
    write_json_atomic(out_dir / 'logs' / f'config_{run_id}.json', config)

    _check_terminated()
    failures: dict[str, str] = dict(unreadable)
    if plan:
        print(f'synthmorph-app: {_where(device, nprocs, omp, n_jobs)}')
        failures |= _execute(plan, args, out_dir, bids_dir, work_dir, run_id, command_line,
                            settings, device, nprocs, omp)
    if plan and not args.work_dir:
        _remove_finished_work(plan, failures, work_dir)
    _write_citation(out_dir, labels, args, settings, lesions=bool(lesions))
    from ..reports.subject import write_subject_report

    reports = []
    for sub in subjects:
        sub_failures = {f: r for f, r in failures.items()
                        if Path(f).name.startswith(f'sub-{sub}_')}
        reports.append(write_subject_report(out_dir, sub, failures=sub_failures))

    from ..reports.subject import collect_subject

    finished = [item for sub in subjects for item in collect_subject(out_dir, sub)]
    untrained = sorted({card.get('name', kind) for item in finished
                        for kind, card in item['meta'].get('Models', {}).items()
                        if card.get('trained') is False})
    if untrained:
        print(f'WARNING: the models {", ".join(untrained)} have UNTRAINED random weights: '
              'these registrations are NOT meaningful. Give trained weights with --weights.',
              file=sys.stderr)
    print(f'synthmorph-app: finished in {time.time() - start:.0f} s; derivatives in <{out_dir}>')
    for report in reports:
        print(f'  report: {report}')
    # this run's registrations that logged warnings (a field of view smaller than a head...)
    planned = {Path(image).name for images in plan.values() for image, _ in images}
    warned = sorted({item['source'] for item in finished
                     if item['source'] in planned and item['meta'].get('Warnings')})
    if warned:
        print(f'synthmorph-app: {len(warned)} image(s) registered with warnings (see their '
              f'reports, or "Warnings" in the sidecars): {", ".join(warned)}')
    if failures:
        print(f'synthmorph-app: {len(failures)} image(s) FAILED (the others are complete):',
              file=sys.stderr)
        for image, reason in sorted(failures.items()):
            print(f'  <{image}>: {reason}', file=sys.stderr)
    if missing:
        print(f'synthmorph-app: {len(missing)} subject(s) NOT PROCESSED:',
              file=sys.stderr)
        for reason in missing.values():
            print(f'  {reason}', file=sys.stderr)
    return EXIT_FAILURE if failures or missing else EXIT_OK


def _remove_finished_work(plan: dict, failures: dict, work_dir: Path) -> None:
    """Remove the intermediate files of the images that finished from the default work
    folder, so a temp folder does not grow by tens of MB per image over runs (the
    derivatives hold what they are for). Failed images keep theirs."""
    import shutil

    from ..workflows.base import image_work_dir

    for sub, images in plan.items():
        for image, _ in images:
            if image not in failures:
                folder = image_work_dir(work_dir, sub, image)
                shutil.rmtree(folder, ignore_errors=True)
                try:  # the subject's folder, once its last image is gone
                    folder.parent.rmdir()
                except OSError:
                    pass


def _name_clashes(subjects: dict) -> dict[str, str]:
    """``{image: why}`` for selected images whose derivatives would have the same names as
    another's (``sub-01_T1w.nii`` beside ``sub-01_T1w.nii.gz``, or names that differ only in
    entities a derivative name sets, such as ``desc``): which of them the files came from could
    not be told, so none is registered."""
    from ..utils.bids import image_id, parse_entities

    groups: dict[str, list[Path]] = {}
    for images in subjects.values():
        for image in images:
            groups.setdefault(image_id(parse_entities(image)), []).append(Path(image))
    out = {}
    for group in groups.values():
        for image in group if len(group) > 1 else ():
            others = ', '.join(f'<{p}>' for p in group if p != image)
            out[str(image)] = (
                f'<{image}> and {others} would write the same derivatives (their names differ '
                'only in the extension or in entities a derivative name sets: space, res, '
                'label, desc); none of them is registered. Remove, rename or .bidsignore all '
                'but one, or select one with --bids-filter-file.')
    return out


def _unreadable(image, via, lesion) -> str | None:
    """Why a job cannot start: its image, the T1w it goes through or its lesion mask is
    absent (:func:`.io.images.missing_file_reason`); None where all are there."""
    from ..io.images import missing_file_reason

    for path, what in ((image, 'image'), (via, 'T1w it is registered through'),
                       (lesion, 'lesion mask')):
        reason = path and missing_file_reason(path, f'{what} <{path}>')
        if reason:
            return reason + (' (Or register this image alone: --no-via-t1w.)'
                             if path is via else '')
    return None


def _missing_reason(sub: str, names: list[str], contrasts: list[str] | None,
                    sessions: list[str] | None = None, filtered: bool = False) -> str:
    """The message for a selected subject without an image of the asked contrasts.

    ``names`` are the subject's anatomical images in the selected ``sessions`` (labels without
    ``ses-``; all sessions when empty); ``filtered`` says a BIDS filter file narrowed the query
    of an asked contrast.
    """
    contrasts = contrasts or ['T1w']
    asked = 'anatomical' if 'all' in contrasts else '/'.join(contrasts)
    where = ' in the selected session(s) ' + ', '.join(sessions) if sessions else ''
    hint = 'choose contrasts with --contrasts' + (' or check --bids-filter-file' if filtered else '')
    has = (f'its anatomical images{where}: {", ".join(names)}; {hint}'
           if names else f'it has no anatomical image{where}, anat/*.nii[.gz]')
    return f'sub-{sub}: no {asked} image selected, not processed ({has}).'


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the system has one.

    A Slurm job or a container pinned to some cores still sees all the node's CPUs in
    ``os.cpu_count()``; threads beyond its allocation would compete for the same cores.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def threads_per_registration(nprocs: int, n_jobs: int) -> int:
    """Default threads of each registration: ``nprocs`` shared among ``n_jobs``, 1 to 8.

    More threads speed one registration up little (a whole-head T1w onto MNI on 2 idle cores:
    19.4 s with 1 thread, 20.6 s with 2), while registrations side by side use every core: the
    two demo subjects on 2 cores took 36 s with one thread each against 59 s one after the
    other with two (benchmarks/README.md, "A busy core").
    """
    return max(1, min(8, nprocs // max(1, n_jobs)))


#: How Nipype's MultiProc starts its workers when they use the GPU. Forked from a process in
#: which torch has touched CUDA (``torch.cuda.is_available()``, which ``--device auto`` asks,
#: is enough), a worker cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess":
#: every registration of a ``--device cuda`` run failed so on an H200, session 34). Workers
#: from a fork server, a fresh process, can (:func:`_prepare_worker_start`).
CUDA_MP_CONTEXT = 'forkserver'


def _prepare_worker_start(nipype_level: str) -> None:
    """Have a fork server, where one starts the workers, import :mod:`synthmorph_app.cli.
    workers` first: our nodes, and the Nipype logging level the run asked for, which its
    workers would not inherit (a GPU run's workers; every run's on Python 3.14 and later)."""
    import multiprocessing

    os.environ['SYNTHMORPH_NIPYPE_LEVEL'] = nipype_level
    multiprocessing.get_context('forkserver').set_forkserver_preload(
        ['synthmorph_app.cli.workers'])


class _OneGpuSlot(logging.Filter):
    """Drop Nipype's "Nodes demand more GPU than allowed (1)": a GPU node's ``n_procs`` are
    its CPU threads, which MultiProc also counts as GPU slots; with ``n_gpu_procs=1`` the
    registrations take the GPU one at a time, as meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith('Nodes demand more GPU than allowed')


ONE_GPU_SLOT = _OneGpuSlot()


def _where(device: str, nprocs: int, omp: int, n_jobs: int) -> str:
    """Where the registrations run, as the run says before it starts."""
    if device == 'cuda':
        return ('registering on the GPU, one image at a time (on many CPUs, many images may '
                'finish sooner with --device cpu: README, "Performance")')
    at_once = max(1, min(n_jobs, nprocs // max(1, omp)))
    return (f'registering on {nprocs} CPU(s), {at_once} image(s) at a time with {omp} '
            f'thread(s) each')


def _resolve_device(device: str) -> str:
    if device == 'auto':
        try:
            import torch

            return 'cuda' if torch.cuda.is_available() else 'cpu'
        except ImportError:  # pragma: no cover
            return 'cpu'
    return device


def _registration_settings(args, weights):
    """The run's :class:`RegistrationSettings` (CPU, one thread, no cache: ``_execute``
    sets those, which do not change what is computed)."""
    from ..workflows.settings import RegistrationSettings

    return RegistrationSettings(
        mode=args.mode, lam=args.lam, extent=args.extent, passes=args.passes,
        refine=args.refine,
        refine_options={'init_method': args.init_method, 'refine_metric': args.refine_metric,
                        'refine_levels': args.refine_levels,
                        'refine_weight': args.refine_weight,
                        'cross_contrast': CROSS_CONTRAST[args.cross_contrast]},
        weights=weights or {}, via_t1w=args.via_t1w,
    )


def _signature(settings, image, args, record: dict) -> dict:
    """The registration signature of ``image`` in this run, to compare with ``record``, a
    forward sidecar of its derivatives (:func:`.interfaces.derivatives.forward_sidecar`). The
    checksums of the files it reads are in it only where the record has some (a first run
    over a large dataset reads no image to plan), and a file recorded unchanged since (size,
    modification time) is not read again."""
    from ..utils.bids import input_checksums, session_t1w

    via = bool(args.via_t1w and session_t1w(image) is not None)
    recorded = record.get('RegistrationSettings')
    if not isinstance(recorded, dict) or 'inputs' not in recorded:
        return settings.signature(via=via)
    known = record.get('InputFiles') if isinstance(record.get('InputFiles'), dict) else None
    return settings.signature(via=via, inputs=input_checksums(image, via, known))


def _changes_shown(changes: dict) -> str:
    """What changed since an image's derivatives were made, as the plan marks it:
    ``(other settings: mode "affine" -> "joint")``, ``(changed: sub-01_T1w.nii.gz)``."""
    shown = []
    settings = {k: v for k, v in changes.items() if k != 'inputs'}
    if settings:
        shown.append('other settings: ' + ', '.join(
            f'{k} {_shown(old)} -> {_shown(new)}' for k, (old, new) in settings.items()))
    if 'inputs' in changes:  # file name -> checksum
        old, new = changes['inputs']
        names = [n for n in new if old.get(n) != new[n]] + [n for n in old if n not in new]
        shown.append('changed: ' + ', '.join(names))
    return ' ('.join(shown)


def _shown(value) -> str:
    """A setting as the plan prints it."""
    return 'default' if value is None else json.dumps(value)


def _execute(plan, args, out_dir, bids_dir, work_dir, run_id, command_line, settings, device,
             nprocs, omp) -> dict[str, str]:
    """Build and run the Nipype workflow; return ``{image: reason}`` for failed images."""
    from nipype import config as ncfg

    from ..interfaces.derivatives import forward_sidecar, is_complete
    from ..utils.bids import image_lesion
    from ..utils.logs import set_nipype_level
    from ..utils.templates import parse_output_spaces
    from ..workflows.base import image_wf_name, init_synthmorph_wf
    from ..workflows.settings import OutputSettings

    crash_dir = work_dir / 'crash' / run_id
    ncfg.update_config({
        'execution': {
            'crashdump_dir': str(crash_dir), 'crashfile_format': 'txt',
            'stop_on_first_crash': False, 'remove_unnecessary_outputs': False,
            'poll_sleep_duration': float(os.environ.get('SYNTHMORPH_POLL_SLEEP', '0.2')),
            'hash_method': 'content', 'create_report': False, 'write_provenance': False,
        },
        'monitoring': {'enabled': False},
    })
    ncfg.enable_resource_monitor = False
    nlevel = 'INFO' if args.verbose >= 2 else 'WARNING'
    set_nipype_level(nlevel)
    logging.getLogger('nipype.workflow').addFilter(ONE_GPU_SLOT)
    settings = replace(
        settings, device=device, omp_nthreads=omp,
        # the T1w's registration serves its own job and those that go through it
        cache_dir=str(work_dir / 'registrations')
        if args.via_t1w and _other_contrasts(args) or _shared_templates(plan) else '',
    )
    outputs = OutputSettings(figures=args.figures, command_line=command_line,
                             output_lta=args.output_lta)
    workflow = init_synthmorph_wf(plan=plan, out_dir=str(out_dir), bids_dir=str(bids_dir),
                                  settings=settings, outputs=outputs)
    workflow.base_dir = str(work_dir)
    if nprocs > 1:
        plugin_args = {'n_procs': nprocs, 'raise_insufficient': False,
                       'maxtasksperchild': 1}
        if args.mem_gb:
            plugin_args['memory_gb'] = args.mem_gb
        _prepare_worker_start(nlevel)
        if device == 'cuda':
            plugin_args.update(n_gpu_procs=1, mp_context=CUDA_MP_CONTEXT)
        plugin = 'MultiProc'
    else:
        plugin, plugin_args = 'Linear', {}
    plugin_args['status_callback'] = _progress(plan)
    LOGGER.info('running %s with %s (%s)', workflow.name, plugin, plugin_args)
    _check_terminated()
    try:
        workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as err:  # nipype: "Workflow did not execute cleanly"
        LOGGER.warning('some nodes failed: %s', str(err).splitlines()[0])
    finally:
        gc.unfreeze()  # what the progress callback froze is collectable again
    _check_terminated()  # its workers ended by SIGTERM, not by failing
    reasons = _crash_reasons(crash_dir)
    failures = {}
    for images in plan.values():
        for image, todo in images:
            spaces = parse_output_spaces(todo)
            lta_mode = args.mode if args.output_lta else None
            lesion = image_lesion(image) is not None
            signature = _signature(settings, image, args,
                                   forward_sidecar(out_dir, image, *spaces[0]))
            if all(is_complete(out_dir, image, n, s, lta_mode=lta_mode, lesion=lesion,
                               settings=signature)
                   for n, s in spaces):
                continue
            failures[image] = reasons.get(
                image_wf_name(image), f'did not finish; see the log in <{out_dir / "logs"}>')
    return failures


def _progress(plan: dict):
    """A Nipype ``status_callback`` that prints a line as each registration ends and as each
    image's derivatives are written for a template: ``[k/N] <image> -> <template>: ...``
    (a long run over many subjects is otherwise silent until its summary)."""
    from ..workflows.base import image_wf_name

    names = {image_wf_name(image): Path(image).name
             for images in plan.values() for image, _ in images}
    # the template iterable's parameterization, as Nipype names it, for each space label
    spaces = {'_template_' + label.replace(':', ''): label
              for images in plan.values() for _, todo in images for label in todo}
    total = sum(len(todo) for images in plan.values() for _, todo in images)
    counts = {'registered': 0, 'written': 0}
    started: dict[tuple, float] = {}
    run_start: list[float] = []

    def callback(node, status):
        _check_terminated()  # a SIGTERM swallowed where it landed stops at the next node
        run_start[:] = run_start or [time.time()]
        # Nipype's MultiProc runs gc.collect() before each node it runs itself; over the
        # thousands of objects of a large workflow that took 0.2 s a node, most of the time
        # before the first registration of a 40-subject run. What exists now is kept out of
        # those collections (reference counting still frees it).
        gc.freeze()
        what = {'registration': 'registered', 'ds_registration': 'written'}.get(node.name)
        image = next((names[p] for p in node.fullname.split('.') if p in names), None)
        if image is None or what is None:
            return
        params = tuple(getattr(node, 'parameterization', None) or ())
        key = (node.fullname, params)
        if status == 'start':
            started[key] = time.time()
            return
        began = started.pop(key, None)  # Nipype reports a node found in its cache as ended only
        space = next((spaces[p] for p in params if p in spaces), None)
        job = f'{image} -> {space}' if space else image
        if status == 'end':
            counts[what] += 1
            if what == 'written':
                detail = 'written'
            elif began is None:
                detail = 'registered (reused from the work directory)'
            else:
                detail = f'registered in {time.time() - began:.0f} s'
            if what == 'registered' and counts[what] < total:
                detail += _time_left((time.time() - run_start[0]) / counts[what]
                                     * (total - counts[what]))
            print(f'  [{counts[what]}/{total}] {job}: {detail}', flush=True)
        elif status == 'exception' and what == 'registered':
            print(f'  {job}: registration FAILED (the summary at the end says why)', flush=True)

    return callback


def _time_left(seconds: float) -> str:
    """``'; about 12 min left'``: the rest of a run at the pace so far.

    >>> _time_left(40), _time_left(700), _time_left(9000)
    ('; under a minute left', '; about 12 min left', '; about 2.5 h left')
    """
    if seconds < 60:
        return '; under a minute left'
    if seconds < 90 * 60:
        return f'; about {seconds / 60:.0f} min left'
    return f'; about {seconds / 3600:.1f} h left'


def _crash_reasons(crash_dir: Path) -> dict[str, str]:
    """``{image workflow name: last error line}`` from Nipype's text crash files."""
    out: dict[str, str] = {}
    if not crash_dir.is_dir():
        return out
    for crash in sorted(crash_dir.glob('crash-*.txt')):
        text = crash.read_text(errors='replace')
        node = next((line.split(':', 1)[1].strip() for line in text.splitlines()
                     if line.startswith('Node:')), '')
        wf = next((part for part in node.split('.') if part.startswith('anat_')), None)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if 'Error:' in ln or 'Exception:' in ln]
        reason = errors[-1] if errors else (lines[-1] if lines else 'unknown error')
        reason = reason.split('Error: ', 1)[-1] if 'Error: ' in reason else reason
        if wf and wf not in out:
            out[wf] = f'{reason} (crash file <{crash}>)'
    return out


def _shared_templates(plan: dict) -> bool:
    """Whether some image goes to several resolutions of one template (they share one
    registration, which the cache then computes once)."""
    from ..utils.templates import template_of

    return any(len({template_of(lab) for lab in todo}) < len(todo)
               for images in plan.values() for _, todo in images)


def _other_contrasts(args) -> bool:
    """Whether contrasts other than T1w are asked for."""
    return any(c != 'T1w' for c in (args.contrasts or ['T1w']))


def _write_citation(out_dir: Path, labels: list[str], args, settings,
                    lesions: bool = False) -> None:
    """``logs/CITATION.md`` (methods boilerplate) and ``logs/CITATION.bib``, atomically, for
    the run's :class:`RegistrationSettings` ``settings``; ``lesions``: some image of this run
    had a lesion mask."""
    from ..reports.boilerplate import citation_markdown
    from ..utils.bids import write_text_atomic

    text, bib = citation_markdown(labels, mode=settings.mode, lam=settings.lam,
                                  via_t1w=args.via_t1w and _other_contrasts(args),
                                  lesions=lesions, refine=settings.refine,
                                  refine_options=settings.refine_options)
    write_text_atomic(out_dir / 'logs' / 'CITATION.md', text)
    write_text_atomic(out_dir / 'logs' / 'CITATION.bib', bib)


def config_of(out_dir: Path) -> list[dict]:
    """The configs of all runs logged in ``out_dir`` (oldest first)."""
    return [json.loads(p.read_text()) for p in sorted((out_dir / 'logs').glob('config_*.json'))]
