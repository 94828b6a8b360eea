"""The command line: help that teaches, every output format, clear errors, nothing half-written."""

import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.cli.run import assign_weights, main

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


def _blobs(shape=(40, 44, 36), affine=None, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.random((5, 5, 5))
    from scipy.ndimage import zoom

    data = zoom(coarse, [s / 5 for s in shape], order=1)[: shape[0], : shape[1], : shape[2]]
    data[:3] = 0
    aff = np.diag([2.5, 2.5, 2.5, 1.0]) if affine is None else affine
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)
    return nb.Nifti1Image((data * 100).astype(np.float32), aff)


@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('pair')
    moving, fixed = tmp / 'moving.nii.gz', tmp / 'fixed.nii.gz'
    nb.save(_blobs(seed=1, affine=np.diag([-2.4, -2.4, 2.6, 1.0])), str(moving))
    nb.save(_blobs(seed=2), str(fixed))
    return moving, fixed


def test_help_texts(capsys):
    for argv in (['--help'], ['register', '--help'], ['apply', '--help']):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 0
    out = capsys.readouterr().out
    assert 'fixed -> moving' in out and '.lta' in out and 'mri_synthmorph' in out
    # the top-level page teaches the BIDS-App and the demo, which are not subcommands
    assert 'BIDS_DIR OUTPUT_DIR participant' in out and 'demo OUTPUT_DIR' in out
    # each command's page names its own usage (it began with the whole top-level usage)
    for command in ('register', 'apply', 'train', 'synth', 'evaluate'):
        with pytest.raises(SystemExit):
            main([command, '--help'])
        page = capsys.readouterr().out
        assert page.startswith(f'usage: synthmorph-app {command} [-h]'), page[:300]


def test_help_pages_fit_a_terminal(monkeypatch, capsys):
    """Descriptions are wrapped to the terminal (they came out as one line of 200-400
    characters); examples stay as written, each under 100 characters; a literal per cent sign
    reads as one."""
    monkeypatch.setenv('COLUMNS', '80')
    for argv in (['--help'], ['register', '--help'], ['apply', '--help'], ['train', '--help'],
                 ['synth', '--help'], ['evaluate', '--help'], ['demo', '--help'],
                 ['bids', 'out', 'participant', '--help']):
        with pytest.raises(SystemExit):
            main(argv)
        page = capsys.readouterr().out
        long = [line for line in page.splitlines() if len(line) >= 100]
        assert not long, (argv, long)
        assert '%%' not in page
        # a description's paragraph: wrapped (unindented lines of prose are at most 80 wide)
        prose = [line for line in page.split('\n\n')[1].splitlines()]
        assert all(len(line) <= 80 for line in prose), (argv, prose)
    with pytest.raises(SystemExit):
        main(['apply', '--help'])
    page = capsys.readouterr().out
    # an example continued on the next line keeps its backslash
    assert 'image_xfm.txt \\\n      sub-01_from-T1w' in page


def test_output_into_a_reader_that_stops_early_is_no_traceback(tmp_path):
    """``synthmorph-app ... --dry-run | head -1``: the reader goes away, the app stops
    quietly (it ended in a BrokenPipeError traceback)."""
    from synthmorph_app.cli.bids import DEMO_DIR

    proc = subprocess.Popen([sys.executable, '-m', 'synthmorph_app', str(DEMO_DIR),
                             str(tmp_path / 'out'), 'participant', '--dry-run', '-w',
                             str(tmp_path / 'work')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the app has written anything
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 1
    assert 'Traceback' not in err and 'BrokenPipeError' not in err, err[-2000:]


def test_refine_options_parse_in_both_apps():
    """``register`` and the BIDS-App share the refinement options; the BIDS-App's own
    ``--contrasts`` (which suffixes) and ``--cross-contrast`` live side by side."""
    from synthmorph_app.cli.bids import build_bids_parser
    from synthmorph_app.cli.parser import CROSS_CONTRAST, build_parser

    args = build_parser().parse_args(['register', '--cross-contrast', 'yes', 'm.nii', 'f.nii'])
    assert CROSS_CONTRAST[args.cross_contrast] is True
    args = build_bids_parser().parse_args(['bids', 'out', 'participant', '--contrasts', 'FLAIR',
                                           '--cross-contrast', 'no'])
    assert args.contrasts == ['FLAIR'] and CROSS_CONTRAST[args.cross_contrast] is False
    assert build_bids_parser().parse_args(['bids', 'out', 'participant']).cross_contrast == 'auto'


def test_register_writes_every_format_and_apply_matches(pair, tmp_path, capsys):
    moving, fixed = pair
    outs = {n: tmp_path / n for n in ('moved.nii.gz', 'inv.nii.gz', 'fwd.h5', 'inv.h5',
                                      'fwd_field.nii.gz', 'fwd.mgz')}
    code = main(['register', '-m', 'joint', '-e', '128', '-o', str(outs['moved.nii.gz']),
                 '-O', str(outs['inv.nii.gz']), '-t', str(outs['fwd.h5']),
                 '-T', str(outs['inv.h5']), str(moving), str(fixed)])
    assert code == 0
    from synthmorph_app.engine.weights import load_model

    untrained = [k for k in ('affine', 'deform') if not load_model('default', k)[1]['trained']]
    captured = capsys.readouterr()
    err = captured.err
    assert ('UNTRAINED' in err) == bool(untrained)  # loud exactly when a default is untrained
    # one line says what was done, how, and what was written (it ended without a word)
    took = captured.out.split(' in ')[1].split(' s;')[0]
    summary = ('synthmorph-app register: moving.nii.gz -> fixed.nii.gz (joint, lambda 0.5, '
               f'networks only) in {took} s; wrote {outs["fwd.h5"]}, {outs["inv.h5"]}, '
               f'{outs["moved.nii.gz"]}, {outs["inv.nii.gz"]}')
    assert captured.out.splitlines() == [summary]
    for name in ('moved.nii.gz', 'inv.nii.gz', 'fwd.h5', 'inv.h5'):
        assert outs[name].exists(), name
    moved = nb.load(str(outs['moved.nii.gz']))
    assert moved.shape == nb.load(str(fixed)).shape
    assert np.all(np.isfinite(moved.get_fdata()))
    # apply with the written transform reproduces the moved image
    again = tmp_path / 'again.nii.gz'
    assert main(['apply', str(outs['fwd.h5']), str(moving), str(again)]) == 0
    assert np.allclose(nb.load(str(again)).get_fdata(), moved.get_fdata(), atol=1e-3)
    # displacement fields in both conventions, and a linear mode in LTA/ITK text/MAT
    for conv, name in (('itk', 'fwd_field.nii.gz'), ('synthmorph', 'fwd.mgz')):
        assert main(['register', '-e', '128', '--field-convention', conv, '-t',
                     str(outs[name]), str(moving), str(fixed)]) == 0
        field = np.asanyarray(nb.load(str(outs[name])).dataobj)
        assert np.all(np.isfinite(field))
    for name in ('aff.lta', 'aff.txt', 'aff.mat'):
        assert main(['register', '-m', 'affine', '-e', '128', '-t', str(tmp_path / name),
                     str(moving), str(fixed)]) == 0
        assert (tmp_path / name).stat().st_size > 0


def test_header_only_and_mid_space(pair, tmp_path):
    moving, fixed = pair
    out = tmp_path / 'hdr.nii.gz'
    assert main(['register', '-m', 'rigid', '-H', '-e', '128', '-o', str(out),
                 str(moving), str(fixed)]) == 0
    img = nb.load(str(out))
    assert np.array_equal(img.get_fdata(), nb.load(str(moving)).get_fdata())
    mid = tmp_path / 'mid.nii.gz'
    assert main(['register', '-m', 'affine', '-M', '-e', '128', '-o', str(mid),
                 str(moving), str(fixed)]) == 0
    assert mid.exists()
    mids = [tmp_path / 'mid_m.nii.gz', tmp_path / 'mid_f.nii.gz']
    assert main(['register', '-M', '-e', '128', '-o', str(mids[0]), '-O', str(mids[1]),
                 '--refine', '0', '--passes', '2',  # joint: deformable halves
                 str(moving), str(fixed)]) == 0
    a, b = (nb.load(str(m)) for m in mids)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine)


def test_apply_moves_a_4d_series_frame_by_frame(pair, tmp_path, capsys):
    """``apply`` takes a 4D series (fMRI, tissue probability maps) as
    antsApplyTransforms -e 3 does: each frame lands where the same 3D image lands, the
    repetition time and its unit stay, through the CLI and the Nipype interface; MGZ too."""
    from synthmorph_app.engine import register as engine
    from synthmorph_app.interfaces.synthmorph import apply_file
    from synthmorph_app.io.images import Geometry, load_image
    from synthmorph_app.io.transforms import Transform, load_transform, save_transform

    moving, fixed = pair
    grid = Geometry.from_image(nb.load(str(fixed)))
    field = np.zeros((*grid.shape, 3), np.float32)
    field[..., 0] = np.linspace(-3, 3, grid.shape[2])[None, None]  # a shear in mm
    rotation = np.eye(4)
    rotation[:3, :3] = [[0.98, -0.2, 0], [0.2, 0.98, 0], [0, 0, 1]]
    rotation[:3, 3] = [4, -2, 1]
    xfm_path = tmp_path / 'fwd.h5'
    save_transform(Transform(rotation, field, grid, reference=grid), xfm_path)
    img = nb.load(str(moving))
    base = img.get_fdata(dtype=np.float32)
    frames = np.stack([base, 0.5 * base, base[::-1], base ** 1.5], axis=-1)
    series = nb.Nifti1Image(frames, img.affine)
    series.header.set_zooms((*img.header.get_zooms(), 2.5))
    series.header.set_xyzt_units('mm', 'sec')
    series_path, frame_path = tmp_path / 'bold.nii.gz', tmp_path / 'frame.nii.gz'
    nb.save(series, str(series_path))
    nb.save(nb.Nifti1Image(frames[..., 2], img.affine), str(frame_path))
    outs = [tmp_path / n for n in ('bold_moved.nii.gz', 'frame_moved.nii.gz', 'bold_moved.mgz')]
    assert main(['apply', str(xfm_path), str(series_path), str(outs[0]),
                 str(frame_path), str(outs[1]), str(series_path), str(outs[2])]) == 0
    assert capsys.readouterr().out.splitlines() == [  # a line as each output is written
        f'synthmorph-app apply: bold.nii.gz -> {outs[0]} (linear, 4 frames)',
        f'synthmorph-app apply: frame.nii.gz -> {outs[1]} (linear)',
        f'synthmorph-app apply: bold.nii.gz -> {outs[2]} (linear, 4 frames)']
    moved, single, mgz = (nb.load(str(o)) for o in outs)
    assert moved.shape == (*grid.shape, 4) and np.allclose(moved.affine, grid.affine)
    assert moved.header.get_zooms()[3] == pytest.approx(2.5)
    assert moved.header.get_xyzt_units() == ('mm', 'sec')
    data = moved.get_fdata()
    assert np.array_equal(data[..., 2], single.get_fdata())
    assert np.allclose(data[..., 1], 0.5 * data[..., 0], atol=1e-4)
    assert data[..., 0].std() > 1 and not np.allclose(data[..., 0], data[..., 2])
    assert np.allclose(mgz.get_fdata(), data, atol=1e-4)
    assert mgz.header['tr'] == pytest.approx(2500)  # MGH keeps the TR in ms
    assert load_image(outs[2], frames=True).header.get_zooms()[3] == pytest.approx(2.5)
    # frames in groups (a long series) give the same as all at once
    via_interface = apply_file(series_path, xfm_path, tmp_path / 'iface.nii.gz')
    old = engine.FRAME_VOXELS
    try:
        engine.FRAME_VOXELS = 1
        grouped = engine.moved_image(nb.load(str(series_path)), load_transform(xfm_path))
    finally:
        engine.FRAME_VOXELS = old
    assert np.array_equal(nb.load(str(via_interface)).get_fdata(), data)
    assert np.allclose(grouped.get_fdata(), data, atol=1e-5)
    # register itself still needs one 3D volume
    assert main(['register', '-m', 'affine', str(series_path), str(fixed)]) == 1


def test_apply_through_a_chain(pair, tmp_path):
    """``apply --before`` (and the interface's ``before_transforms``) resamples once through
    the image's own transform, then TRANS: what :func:`compose` of the two gives, another
    image than TRANS alone or the two in the other order."""
    from nipype import Node

    from synthmorph_app.engine.register import moved_image
    from synthmorph_app.interfaces import SynthMorphApply
    from synthmorph_app.io.images import Geometry
    from synthmorph_app.io.transforms import Transform, compose, load_transform, save_transform

    moving, fixed = pair
    grid = Geometry.from_image(nb.load(str(fixed)))
    field = np.zeros((*grid.shape, 3), np.float32)
    field[..., 1] = 2 * np.sin(np.linspace(0, np.pi, grid.shape[0]))[:, None, None]
    shift = np.eye(4)
    shift[:3, 3] = [6, -8, 4]  # the image's own space -> the space TRANS moves
    turn = np.eye(4)
    turn[:3, :3] = [[0.94, -0.342, 0], [0.342, 0.94, 0], [0, 0, 1]]  # 20 degrees
    trans, own = tmp_path / 'trans.h5', tmp_path / 'own.txt'
    save_transform(Transform(turn, field, grid, reference=grid), trans)
    save_transform(Transform(shift), own)
    out, alone = tmp_path / 'out.nii.gz', tmp_path / 'alone.nii.gz'
    assert main(['apply', '--before', str(own), str(trans), str(moving), str(out)]) == 0
    assert main(['apply', str(trans), str(moving), str(alone)]) == 0
    img = nb.load(str(moving))
    expected = moved_image(img, compose(load_transform(trans), load_transform(own)))
    got = nb.load(str(out)).get_fdata()
    assert np.allclose(got, expected.get_fdata(), atol=1e-4)
    other = moved_image(img, compose(load_transform(own), load_transform(trans)), grid)
    for different in (nb.load(str(alone)).get_fdata(), other.get_fdata()):
        assert np.abs(got - different).mean() > 1.0  # intensities 0-100, smooth blobs
    node = Node(SynthMorphApply(in_file=str(moving), transform=str(trans),
                                before_transforms=[str(own)]), name='apply',
                base_dir=str(tmp_path / 'work'))
    result = node.run()
    assert np.allclose(nb.load(result.outputs.out_file).get_fdata(), got, atol=1e-5)


def test_apply_inverts_matrices_in_place(pair, tmp_path, capsys):
    """``-I`` inverts TRANS and ``--before-inverse`` a step of the chain, in the order given
    (one list with --before); a displacement field is not inverted: one clear error."""
    from synthmorph_app.engine.register import moved_image
    from synthmorph_app.io.images import Geometry
    from synthmorph_app.io.transforms import Transform, compose, load_transform, save_transform

    moving, fixed = pair
    grid = Geometry.from_image(nb.load(str(fixed)))
    turn = np.eye(4)
    turn[:3, :3] = [[0.94, -0.342, 0], [0.342, 0.94, 0], [0, 0, 1]]
    turn[:3, 3] = [2, 5, -3]
    shift = np.eye(4)
    shift[:3, 3] = [6, -8, 4]
    field = np.zeros((*grid.shape, 3), np.float32)
    field[..., 2] = 1.5
    a, b, f = tmp_path / 'a.txt', tmp_path / 'b.mat', tmp_path / 'f.h5'
    save_transform(Transform(turn), a)
    save_transform(Transform(shift), b)
    save_transform(Transform(np.eye(4), field, grid, reference=grid), f)
    img = nb.load(str(moving))
    inv_a = Transform(np.linalg.inv(turn))
    inv_b = Transform(np.linalg.inv(shift))
    out = tmp_path / 'out.nii.gz'
    # -I: TRANS inverted
    assert main(['apply', '-r', str(fixed), '-I', str(a), str(moving), str(out)]) == 0
    assert np.allclose(nb.load(str(out)).get_fdata(),
                       moved_image(img, inv_a, grid).get_fdata(), atol=1e-4)
    # the image goes through b, then the inverse of a, then f (points: f, inverse a, b)
    assert main(['apply', '--before', str(b), '--before-inverse', str(a), str(f),
                 str(moving), str(out)]) == 0
    expected = compose(compose(load_transform(f), inv_a), load_transform(b))
    assert np.allclose(nb.load(str(out)).get_fdata(),
                       moved_image(img, expected).get_fdata(), atol=1e-4)
    assert main(['apply', '--before-inverse', str(b), '--before', str(a), str(f),
                 str(moving), str(out)]) == 0
    other = compose(compose(load_transform(f), load_transform(a)), inv_b)
    assert np.allclose(nb.load(str(out)).get_fdata(), moved_image(img, other).get_fdata(),
                       atol=1e-4)
    assert main(['apply', '-I', str(f), str(moving), str(out)]) == 1
    assert 'only linear transforms are inverted' in capsys.readouterr().err


def test_fsl_flirt_matrices_on_the_command_line(pair, tmp_path, capsys):
    """An FSL FLIRT .mat moves each image given its reference (-r), as read with both grids;
    without -r, or inside a chain, it is refused by name; register -i starts from one."""
    from synthmorph_app.engine.register import moved_image
    from synthmorph_app.io.images import Geometry
    from synthmorph_app.io.transforms import load_transform

    moving, fixed = pair
    flirt = tmp_path / 'flirt.mat'
    flirt.write_text('0.98 -0.17 0 3\n0.17 0.98 0 -2\n0 0 1 4\n0 0 0 1\n')
    out = tmp_path / 'moved.nii.gz'
    assert main(['apply', str(flirt), str(moving), str(out)]) == 1
    assert 'FSL FLIRT matrix' in capsys.readouterr().err and not out.exists()
    assert main(['apply', '-r', str(fixed), str(flirt), str(moving), str(out)]) == 0
    img, ref = nb.load(str(moving)), Geometry.from_image(nb.load(str(fixed)))
    xfm = load_transform(flirt, reference=ref, moving=Geometry.from_image(img))
    assert np.allclose(nb.load(str(out)).get_fdata(), moved_image(img, xfm, ref).get_fdata(),
                       atol=1e-4)
    from synthmorph_app.io.transforms import Transform, save_transform

    identity = save_transform(Transform(np.eye(4)), tmp_path / 'identity.txt')
    # in a chain (as a step, or as TRANS behind steps) the grid FLIRT moved is not known
    for step, trans in ((flirt, flirt), (identity, flirt)):
        assert main(['apply', '-r', str(fixed), '--before', str(step), str(trans),
                     str(moving), str(out)]) == 1
        assert 'c3d_affine_tool' in capsys.readouterr().err
    assert main(['register', '-m', 'affine', '--refine', '0', '-e', '128', '-i', str(flirt),
                 '-t', str(tmp_path / 'a.txt'), str(moving), str(fixed)]) == 0


def test_a_field_of_view_smaller_or_larger_than_a_head_is_warned_about(pair, tmp_path, caplog):
    """A 25 mm cube is neither a head nor a slab, and a 1 m one (voxel sizes in cm read as mm)
    no head: each registers, with a warning naming it and its size; a head-sized pair draws
    none."""
    moving, fixed = pair
    small, large = tmp_path / 'small.nii.gz', tmp_path / 'large.nii.gz'
    nb.save(_blobs(shape=(10, 10, 24), seed=3), str(small))  # 25 x 25 x 60 mm
    nb.save(_blobs(affine=np.diag([25.0, 25.0, 25.0, 1.0]), seed=3), str(large))

    def warnings_of(image):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger='synthmorph_app'):
            assert main(['register', '-m', 'rigid', '--refine', '0', '-e', '128',
                         str(image), str(fixed)]) == 0
        return [r.getMessage() for r in caplog.records
                if 'less than a head' in r.getMessage() or 'more than any head' in r.getMessage()]

    warned = warnings_of(small)
    assert len(warned) == 1 and str(small) in warned[0] and '25 x 25 x 60 mm' in warned[0]
    assert 'less than a head' in warned[0]
    warned = warnings_of(large)
    assert len(warned) == 1 and str(large) in warned[0] and '(25 x 25 x 25 mm)' in warned[0]
    assert 'more than any head' in warned[0]
    assert not warnings_of(moving)


@pytest.mark.parametrize('make_bad,message', [
    (lambda p: p.write_bytes(b'garbage'), 'cannot be read'),
    (lambda p: nb.save(nb.Nifti1Image(np.zeros((8, 8, 8, 4), np.float32), np.eye(4)), str(p)),
     '4 dimensions'),
    (lambda p: nb.save(nb.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(p)),
     'dimensions'),
    (lambda p: nb.save(nb.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)),
                       str(p)), 'NaN'),
    (lambda p: nb.save(nb.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(p)),
     'single value'),
    (lambda p: None, 'does not exist'),
])
def test_bad_input_one_clear_error_and_no_output(pair, tmp_path, capsys, make_bad, message):
    _, fixed = pair
    bad = tmp_path / 'bad.nii.gz'
    make_bad(bad)
    out, xfm = tmp_path / 'out.nii.gz', tmp_path / 'out.h5'
    code = main(['register', '-o', str(out), '-t', str(xfm), str(bad), str(fixed)])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and str(bad) in err
    assert err.count('error:') == 1 and 'Traceback' not in err
    assert not out.exists() and not xfm.exists()


def test_bad_arguments(pair, tmp_path, capsys):
    moving, fixed = pair
    with pytest.raises(SystemExit) as err:
        main(['register', '-r', '1.5', str(moving), str(fixed)])
    assert err.value.code == 2 and 'lambda must lie in [0, 1]' in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(['register', '--passes', '0', str(moving), str(fixed)])
    assert err.value.code == 2 and '--passes' in capsys.readouterr().err
    assert main(['register', '-t', str(tmp_path / 'x.png'), str(moving), str(fixed)]) == 1
    assert 'x.png' in capsys.readouterr().err
    assert main(['register', '-m', 'joint', '-t', str(tmp_path / 'x.lta'),
                 str(moving), str(fixed)]) == 1
    assert 'linear transforms only' in capsys.readouterr().err
    assert main(['apply', str(tmp_path / 'none.h5'), str(moving), str(tmp_path / 'o.nii.gz')]) == 1
    assert 'none.h5' in capsys.readouterr().err
    assert main(['apply', str(tmp_path / 'none.h5'), str(moving)]) == 1
    assert 'pairs' in capsys.readouterr().err
    # a misspelt -i method is named as such, not taken for a missing file
    assert main(['register', '-i', 'moment', str(moving), str(fixed)]) == 1
    err = capsys.readouterr().err
    assert "'moment' is neither a method (network, moments, identity)" in err


def test_masks_on_the_command_line(pair, tmp_path, capsys):
    """-x/--moving-mask: a mask elsewhere in the world is one clear error naming it, before
    anything is written; a mask of the image works, on its own grid."""
    moving, fixed = pair
    fimg = nb.load(str(fixed))
    far = fimg.affine.copy()
    far[:3, 3] += 400.0
    bad = tmp_path / 'far_mask.nii.gz'
    nb.save(nb.Nifti1Image(np.ones(fimg.shape, np.uint8) * (fimg.get_fdata() > 30), far), str(bad))
    out = tmp_path / 'out.nii.gz'
    code = main(['register', '-m', 'rigid', '--refine', '2', '-e', '128', '-o', str(out),
                 '-x', str(bad), str(moving), str(fixed)])
    err = capsys.readouterr().err
    assert code == 1 and 'fixed mask' in err and str(bad) in err and 'covers no voxel' in err
    assert err.count('error:') == 1 and not out.exists()
    good = tmp_path / 'mask.nii.gz'
    half = np.zeros(fimg.shape, np.uint8)
    half[:, :, : fimg.shape[2] // 2] = 1
    nb.save(nb.Nifti1Image(half, fimg.affine), str(good))
    assert main(['register', '-m', 'rigid', '--refine', '2', '-e', '128', '-o', str(out),
                 '-x', str(good), '--moving-mask', str(good), str(moving), str(fixed)]) == 0
    assert out.exists()


def test_lesion_masks_on_the_command_line(pair, tmp_path, capsys, caplog):
    """--moving-lesion-mask/--fixed-lesion-mask: one that marks nothing of its image is one
    clear error naming it, before anything is written; with --via the moving one is refused
    (which image would it belong to?); a lesion on the image's own grid works and is logged."""
    moving, fixed = pair
    mimg = nb.load(str(moving))
    out = tmp_path / 'out.nii.gz'
    empty = tmp_path / 'empty_lesion.nii.gz'
    nb.save(nb.Nifti1Image(np.zeros(mimg.shape, np.uint8), mimg.affine), str(empty))
    code = main(['register', '-m', 'rigid', '--refine', '2', '-e', '128', '-o', str(out),
                 '--moving-lesion-mask', str(empty), str(moving), str(fixed)])
    err = capsys.readouterr().err
    assert code == 1 and 'moving lesion mask' in err and str(empty) in err
    assert 'empty' in err and err.count('error:') == 1 and not out.exists()
    assert main(['register', '--via', str(fixed), '--moving-lesion-mask', str(empty), '-o',
                 str(out), str(moving), str(fixed)]) == 1
    assert '--via' in capsys.readouterr().err and not out.exists()
    lesion = tmp_path / 'lesion.nii.gz'
    ball = np.zeros(mimg.shape, np.uint8)
    ball[14:22, 16:24, 12:20] = 1
    nb.save(nb.Nifti1Image(ball, mimg.affine), str(lesion))
    fimg = nb.load(str(fixed))
    nb.save(nb.Nifti1Image(ball, fimg.affine), str(tmp_path / 'fixed_lesion.nii.gz'))
    with caplog.at_level(logging.INFO, logger='synthmorph_app'):
        assert main(['register', '-m', 'rigid', '--refine', '2', '-e', '128', '-o', str(out),
                     '--moving-lesion-mask', str(lesion), '--fixed-lesion-mask',
                     str(tmp_path / 'fixed_lesion.nii.gz'), str(moving), str(fixed)]) == 0
    assert out.exists()
    logged = [r.getMessage() for r in caplog.records if 'left out of the similarity' in
              r.getMessage()]
    assert len(logged) == 2 and str(lesion) in logged[1], logged
    assert not [r for r in caplog.records if r.levelname == 'WARNING']
    # a brain mask given as the lesion: it still runs, with a warning that says what it looks like
    whole = tmp_path / 'whole.nii.gz'
    most = np.ones(mimg.shape, np.uint8)
    most[:2] = 0  # one value everywhere would be refused as empty
    nb.save(nb.Nifti1Image(most, mimg.affine), str(whole))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='synthmorph_app'):
        assert main(['register', '-m', 'rigid', '--refine', '2', '-e', '128', '-o', str(out),
                     '--moving-lesion-mask', str(whole), str(moving), str(fixed)]) == 0
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == 'WARNING' and str(whole) in r.getMessage()]
    assert len(warned) == 1 and 'of the head' in warned[0] and '--moving-mask' in warned[0]


def test_assign_weights_by_name_then_order():
    got = assign_weights(['/m/synthmorph.deform.3.h5', '/m/synthmorph.affine.2.h5'], 'joint')
    assert got == {'deform': '/m/synthmorph.deform.3.h5', 'affine': '/m/synthmorph.affine.2.h5'}
    assert assign_weights(['a.pt', 'b.pt'], 'joint') == {'affine': 'a.pt', 'deform': 'b.pt'}
    assert assign_weights(['r.pt'], 'rigid') == {'rigid': 'r.pt'}


@pytest.mark.slow
def test_fresh_venv_install_and_help(tmp_path):
    """``pip install .`` into a fresh venv, then the three help pages (dependencies are taken
    from the test environment through a .pth file, so nothing is downloaded)."""
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    py = venv / 'bin' / 'python'
    site = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, 'parent-env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    build = tmp_path / 'src'
    subprocess.run(['git', 'clone', '-q', str(REPO), str(build)], check=True)
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                    str(build)], check=True, env={**os.environ, 'PIP_NO_INDEX': '1'})
    exe = venv / 'bin' / 'synthmorph-app'
    for argv in ([], ['register'], ['apply']):
        out = subprocess.run([str(exe), *argv, '--help'], check=True, capture_output=True,
                             text=True, cwd=tmp_path).stdout
        assert 'usage: synthmorph-app' in out
