"""Registering an image through the T1w of its session (``register_via``, ``--via``,
``--via-t1w``): the composition, what ANTs reads of it, and the plumbing around it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.io.images import Geometry
from synthmorph_app.io.transforms import Transform, save_transform
from synthmorph_app.utils.bids import session_t1w

RNG = np.random.default_rng(11)
TEMPLATE = (Path(__file__).resolve().parents[1] / 'synthmorph_app' / 'data' / 'templateflow'
            / 'tpl-MNI152NLin6Asym' / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')


def _rigid(degrees=(8.0, -5.0, 12.0), shift=(4.0, -7.0, 3.0)) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler('xyz', degrees, degrees=True).as_matrix()
    out[:3, 3] = shift
    return out


def _field_transform() -> Transform:
    """An affine and a smooth random field on a small oblique grid."""
    from scipy.ndimage import zoom

    grid_affine = _rigid((3, 0, -4), (-30, -35, -25)) @ np.diag([3.0, 3.0, 3.0, 1.0])
    geom = Geometry((20, 24, 22), grid_affine)
    coarse = RNG.normal(scale=3.0, size=(4, 4, 4, 3))
    field = np.stack([zoom(coarse[..., c], [s / 4 for s in geom.shape], order=3)
                      for c in range(3)], -1)
    affine = _rigid((2, 3, 1), (1, 2, -1)) @ np.diag([1.05, 0.97, 1.02, 1.0])
    return Transform(affine=affine, field=field.astype(np.float32), field_geometry=geom)


def _inner_points(geom: Geometry, n=200) -> np.ndarray:
    ijk = RNG.uniform(2, np.asarray(geom.shape) - 3, size=(n, 3))
    return ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]


def _apply(matrix, points):
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def test_then_linear_applies_the_matrix_after_the_transform():
    xfm = _field_transform()
    m = _rigid()
    out = xfm.then_linear(m)
    pts = _inner_points(xfm.field_geometry)
    np.testing.assert_allclose(out.map_points(pts), _apply(m, xfm.map_points(pts)), atol=1e-6)
    assert out.field is xfm.field  # the field is untouched


def test_after_linear_applies_the_matrix_first():
    xfm = _field_transform()
    m = _rigid((-10, 6, 3), (5, 1, -8))
    out = xfm.after_linear(m)
    # points whose image under m falls inside the field's grid
    pts = _apply(np.linalg.inv(m), _inner_points(xfm.field_geometry))
    np.testing.assert_allclose(out.map_points(pts), xfm.map_points(_apply(m, pts)), atol=1e-4)
    # a linear transform composes without a field
    lin = Transform(affine=xfm.affine).after_linear(m)
    np.testing.assert_allclose(lin.affine, xfm.affine @ m)
    assert lin.field is None


# --------------------------------------------------------------------------------------------
# A real person: sub-01's FLAIR through its T1w onto the packaged MNI template (networks only)


@pytest.fixture(scope='module')
def via_case(shared_data):
    from synthmorph_app.engine.register import register, register_via

    anat = shared_data / 'bids' / 'sub-01' / 'anat'
    flair = nb.load(str(anat / 'sub-01_FLAIR.nii.gz'))
    t1w = nb.load(str(anat / 'sub-01_T1w.nii.gz'))
    template = TEMPLATE
    mni = nb.load(str(template))
    options = {'refine': 0, 'extent': 192.0}
    result = register_via(flair, t1w, mni, **options)
    first = register(flair, t1w, mode='rigid', **options)
    second = register(t1w, mni, **options)
    return {'flair': flair, 't1w': t1w, 'mni': mni, 'template': template, 'result': result,
            'first': first, 'second': second, 'anat': anat}


@pytest.mark.slow
def test_register_via_is_the_rigid_map_after_the_t1w_registration(via_case):
    res, first, second = via_case['result'], via_case['first'], via_case['second']
    mni = Geometry.from_image(via_case['mni'])
    pts = _inner_points(Geometry(mni.shape, mni.affine), 500)
    expected = _apply(first.forward.affine, second.forward.map_points(pts))
    np.testing.assert_allclose(res.forward.map_points(pts), expected, atol=1e-3)
    assert res.forward.field is not None
    assert res.forward.moving == Geometry.from_image(via_case['flair'])
    # the inverse undoes the forward (up to the inverse field's own error)
    back = res.inverse.map_points(res.forward.map_points(pts))
    assert np.median(np.linalg.norm(back - pts, axis=1)) < 0.5
    assert res.inverse.reference == Geometry.from_image(via_case['flair'])
    info = res.info['via']
    assert info['mode'] == 'rigid' and 'rigid' in info['models']
    np.testing.assert_allclose(np.asarray(info['matrix']), first.forward.affine, atol=1e-5)
    assert any(k.startswith('via ') for k in res.timings)
    with pytest.raises(ValueError, match='mid-space'):
        res.mid_space()


@pytest.mark.slow
def test_ants_reads_the_composed_transforms_as_we_mean_them(via_case, tmp_path):
    """Forward (FLAIR onto the template) and inverse (template onto the FLAIR), as .h5."""
    import ants

    from synthmorph_app.engine.register import moved_image

    res = via_case['result']
    flair_file = via_case['anat'] / 'sub-01_FLAIR.nii.gz'
    cases = (
        (res.forward, flair_file, via_case['template'], via_case['flair'], via_case['mni']),
        (res.inverse, via_case['template'], flair_file, via_case['mni'], via_case['flair']),
    )
    for i, (xfm, moving_file, fixed_file, moving_img, fixed_img) in enumerate(cases):
        path = save_transform(xfm, tmp_path / f'xfm{i}.h5')
        ours = np.asanyarray(moved_image(moving_img, xfm, Geometry.from_image(fixed_img))
                             .dataobj).astype(np.float32)
        fixed_ants, moving_ants = ants.image_read(str(fixed_file)), ants.image_read(
            str(moving_file))
        theirs = ants.apply_transforms(fixed=fixed_ants, moving=moving_ants,
                                       transformlist=[str(path)],
                                       interpolator='linear').numpy()
        ones = moving_ants.new_image_like(np.ones(moving_ants.shape, dtype='float32'))
        covered = ants.apply_transforms(fixed=fixed_ants, moving=ones,
                                        transformlist=[str(path)]).numpy() > 0.999
        from scipy import ndimage

        inside = ndimage.binary_erosion(covered, iterations=2)
        inside[:2] = inside[-2:] = False
        inside[:, :2] = inside[:, -2:] = False
        inside[:, :, :2] = inside[:, :, -2:] = False
        assert inside.sum() > 0.2 * inside.size
        span = float(ours.max() - ours.min())
        # the images agree to a small fraction of their range where both see data
        assert np.percentile(np.abs(theirs - ours)[inside], 99) < 0.01 * span, i


# --------------------------------------------------------------------------------------------
# The command line and the BIDS side


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, '-m', 'synthmorph_app', *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=600, **kwargs)


@pytest.mark.slow
def test_register_command_via(shared_data, tmp_path):
    anat = shared_data / 'bids' / 'sub-01' / 'anat'
    flair, t1w = anat / 'sub-01_FLAIR.nii.gz', anat / 'sub-01_T1w.nii.gz'
    other = shared_data / 'bids' / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz'
    fwd, moved = tmp_path / 'fwd.h5', tmp_path / 'moved.nii.gz'
    res = _cli('register', '--refine', '0', '-e', '192', '-j', '1', '--via', t1w, '-t', fwd,
               '-o', moved, flair, other)
    assert res.returncode == 0, res.stderr
    assert fwd.is_file() and nb.load(str(moved)).shape == nb.load(str(other)).shape
    res = _cli('register', '--via', t1w, '-M', '-o', tmp_path / 'mid.nii.gz', flair, other)
    assert res.returncode == 1 and '--mid-space' in res.stderr and '--via' in res.stderr
    assert not (tmp_path / 'mid.nii.gz').exists()
    lta = tmp_path / 'init.lta'
    save_transform(Transform(reference=Geometry.from_image(nb.load(str(other))),
                             moving=Geometry.from_image(nb.load(str(flair)))), lta)
    res = _cli('register', '--via', t1w, '-i', lta, '-t', tmp_path / 'x.h5', flair, other)
    assert res.returncode == 1 and '--via' in res.stderr
    res = _cli('register', '--via', tmp_path / 'missing.nii.gz', '-t', tmp_path / 'y.h5',
               flair, other)
    assert res.returncode == 1 and 'missing.nii.gz' in res.stderr


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'')
    return path


def test_session_t1w_picks_the_t1w_beside_the_image(tmp_path):
    anat = tmp_path / 'sub-01' / 'ses-1' / 'anat'
    flair = _touch(anat / 'sub-01_ses-1_FLAIR.nii.gz')
    assert session_t1w(flair) is None  # no T1w yet
    run2 = _touch(anat / 'sub-01_ses-1_run-2_T1w.nii.gz')
    run1 = _touch(anat / 'sub-01_ses-1_run-1_T1w.nii.gz')
    _touch(anat / 'sub-01_ses-1_run-1_T1w.json')
    assert session_t1w(flair) == run1  # the first by name among equals
    t2w = _touch(anat / 'sub-01_ses-1_run-2_T2w.nii.gz')
    assert session_t1w(t2w) == run2  # the one sharing its run
    assert session_t1w(run1) is None  # a T1w goes directly
    other = _touch(tmp_path / 'sub-01' / 'ses-2' / 'anat' / 'sub-01_ses-2_PDw.nii')
    assert session_t1w(other) is None  # another session's T1w does not count


def test_workflow_registers_other_contrasts_through_the_session_t1w(tmp_path):
    from synthmorph_app.workflows.base import init_anat_image_wf
    from synthmorph_app.workflows.settings import RegistrationSettings

    anat = tmp_path / 'sub-01' / 'anat'
    flair = _touch(anat / 'sub-01_FLAIR.nii.gz')
    t1w = _touch(anat / 'sub-01_T1w.nii.gz')
    lone = _touch(tmp_path / 'sub-02' / 'anat' / 'sub-02_T2w.nii.gz')
    settings = RegistrationSettings(refine=15, via_t1w=True)

    def node_inputs(path, settings):
        wf = init_anat_image_wf(in_file=str(path), templates=['MNI152NLin6Asym:res-2'],
                                out_dir=str(tmp_path / 'out'), bids_dir=str(tmp_path),
                                settings=settings)
        reg_wf = wf.get_node('register_template_wf')
        return reg_wf.get_node('registration').inputs, reg_wf, \
            reg_wf.get_node('inputnode').inputs

    inputs, reg_wf, inputnode = node_inputs(flair, settings)
    assert inputnode.via_image == str(t1w)
    # the deformable step registers the T1w to the T1w template: same contrast
    assert inputs.refine_options['cross_contrast'] is False
    assert inputs.refine_options['refine_metric'] == 'auto'  # local NCC unless inverted
    assert 'aligned rigidly to the T1w image of the same session' in reg_wf.__desc__
    for path, opts in ((flair, RegistrationSettings(refine=15)), (t1w, settings),
                       (lone, settings)):
        inputs, reg_wf, inputnode = node_inputs(path, opts)
        assert not isinstance(inputnode.via_image, str), path
        assert 'aligned rigidly' not in reg_wf.__desc__
    inputs, _, _ = node_inputs(flair, RegistrationSettings(refine=15))
    assert inputs.refine_options['cross_contrast'] is True  # directly: across contrasts


@pytest.mark.slow
def test_registrations_are_kept_and_reused(shared_data, tmp_path):
    """The T1w's job stores its registration; a job through that T1w reads it back."""
    from synthmorph_app.engine.cache import registration_key
    from synthmorph_app.interfaces.synthmorph import register_files
    from synthmorph_app.io.transforms import load_transform

    anat = shared_data / 'bids' / 'sub-01' / 'anat'
    flair, t1w = anat / 'sub-01_FLAIR.nii.gz', anat / 'sub-01_T1w.nii.gz'
    cache = tmp_path / 'cache'
    common = {'refine': 0, 'extent': 192.0, 'cache_dir': cache, 'num_threads': 1}
    own = register_files(t1w, TEMPLATE, forward_xfm=tmp_path / 't1w.h5',
                         inverse_xfm=tmp_path / 't1w_inv.h5', **common)
    assert own['metadata']['cache'] == 'written'
    assert len(list(cache.iterdir())) == 1
    via = register_files(flair, TEMPLATE, forward_xfm=tmp_path / 'flair.h5',
                         inverse_xfm=tmp_path / 'flair_inv.h5', via_image=t1w, **common)
    assert via['metadata']['cache'] == 'read'  # not computed again
    assert 'via load models' in via['metadata']['timings']
    assert 'networks' not in via['metadata']['timings']
    assert len(list(cache.iterdir())) == 1
    # the FLAIR's transform is the rigid map after the T1w's, as written for the T1w
    mni = Geometry.from_image(nb.load(str(TEMPLATE)))
    pts = _inner_points(mni, 300)
    t1w_fwd = load_transform(own['forward_xfm'])
    flair_fwd = load_transform(via['forward_xfm'])
    rigid = np.asarray(via['metadata']['via']['matrix'])
    np.testing.assert_allclose(flair_fwd.map_points(pts),
                               _apply(rigid, t1w_fwd.map_points(pts)), atol=1e-3)
    # the key follows every input that decides the result
    options = {'mode': 'joint', 'refine': 0, 'extent': 192.0}
    key = registration_key(t1w, TEMPLATE, options)
    assert key == registration_key(t1w, TEMPLATE, dict(options))
    assert key != registration_key(t1w, TEMPLATE, {**options, 'lam': 0.3})
    assert key != registration_key(flair, TEMPLATE, options)
    assert key != registration_key(t1w, TEMPLATE, options, {'fixed_mask': flair})
    assert key != registration_key(t1w, TEMPLATE, {**options, 'mode': 'affine'})


@pytest.mark.slow
def test_bids_app_via_t1w_records_the_t1w(shared_data, tmp_path):
    out = tmp_path / 'out'
    res = _cli(shared_data / 'bids', out, 'participant', '--participant-label', '01',
               '--contrasts', 'FLAIR', '--via-t1w', '--no-figures', '--extent', '192',
               '--nprocs', '1', '-w', tmp_path / 'work', env={
                   **__import__('os').environ, 'SYNTHMORPH_REFINE': '0',
                   'TMPDIR': str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'sub-01_FLAIR.nii.gz -> MNI152NLin6Asym:res-2 (through sub-01_T1w.nii.gz)' in res.stdout
    anat = out / 'sub-01' / 'anat'
    fwd = anat / 'sub-01_from-FLAIR_to-MNI152NLin6Asym_mode-image_xfm.h5'
    assert fwd.is_file()
    meta = json.loads(fwd.with_suffix('.json').read_text())
    assert 'bids:raw:sub-01/anat/sub-01_T1w.nii.gz' in meta['Sources']
    assert meta['Via']['Image'] == 'bids:raw:sub-01/anat/sub-01_T1w.nii.gz'
    assert meta['Via']['RegistrationMode'] == 'rigid'
    assert np.asarray(meta['Via']['Matrix']).shape == (4, 4)
    assert set(meta['Models']) == {'affine', 'deform'} and 'rigid' in meta['Via']['Models']
    assert 'aligned rigidly to the T1w image of their session' in (
        out / 'logs' / 'CITATION.md').read_text()
    assert '<th>through</th><td>sub-01_T1w.nii.gz</td>' in (out / 'sub-01.html').read_text()
    group = _cli(tmp_path / 'unused', out, 'group')
    assert group.returncode == 0, group.stderr
    header, row = (out / 'group' / 'qc.tsv').read_text().splitlines()
    assert dict(zip(header.split('\t'), row.split('\t')))['via'] == 'sub-01_T1w.nii.gz'
    config = json.loads(next((out / 'logs').glob('config_*.json')).read_text())
    assert config['via_t1w'] is True
    assert not list(anat.glob('*T1w*'))  # the T1w itself was not asked for
    # the T1w's registration is kept in the work directory for the jobs that need it
    kept = [p for p in (tmp_path / 'work' / 'registrations').iterdir()
            if not p.name.startswith('.')]
    assert len(kept) == 1 and (kept[0] / 'forward.h5').is_file()


def test_bids_app_goes_through_the_t1w_unless_told_not_to():
    from synthmorph_app.cli.bids import build_bids_parser

    parser = build_bids_parser()
    assert parser.parse_args(['bids', 'out', 'participant']).via_t1w is True
    assert parser.parse_args(['bids', 'out', 'participant', '--no-via-t1w']).via_t1w is False


def test_a_cache_that_cannot_be_written_does_not_fail_the_registration(tmp_path, caplog):
    from synthmorph_app.engine.cache import cached_registration
    from synthmorph_app.engine.register import RegistrationResult

    xfm = _field_transform()
    geom = xfm.field_geometry
    xfm = Transform(affine=xfm.affine, field=xfm.field, field_geometry=geom, reference=geom,
                    moving=geom)
    blocker = tmp_path / 'not-a-folder'
    blocker.write_text('a file where the cache folder should be')
    calls = []

    def compute():
        calls.append(1)
        return RegistrationResult(xfm, xfm, {}, {'mode': 'joint'})

    result = cached_registration(blocker, 'k' * 64, compute, reference=geom, moving=geom)
    assert calls == [1] and result.forward is xfm and 'cache' not in result.info
    assert 'could not keep the registration' in caplog.text
    # a writable folder: stored, then read back without computing
    cache = tmp_path / 'cache'
    first = cached_registration(cache, 'k' * 64, compute, reference=geom, moving=geom)
    second = cached_registration(cache, 'k' * 64, compute, reference=geom, moving=geom)
    assert calls == [1, 1] and first.info['cache'] == 'written'
    assert second.info['cache'] == 'read' and second.info['mode'] == 'joint'
    pts = _inner_points(geom, 100)
    np.testing.assert_allclose(second.forward.map_points(pts), xfm.map_points(pts), atol=1e-3)
    np.testing.assert_allclose(second.inverse.map_points(pts), xfm.map_points(pts), atol=1e-3)
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]  # no scratch left


@pytest.mark.slow
def test_an_unreadable_t1w_fails_its_images_by_name_and_no_via_t1w_goes_around_it(
        shared_data, tmp_path):
    import os
    import shutil

    anat = tmp_path / 'bids' / 'sub-01' / 'anat'
    anat.mkdir(parents=True)
    shutil.copy(shared_data / 'bids' / 'dataset_description.json', tmp_path / 'bids')
    shutil.copy(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_FLAIR.nii.gz', anat)
    t1w = anat / 'sub-01_T1w.nii.gz'  # truncated: unreadable
    t1w.write_bytes((shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
                    .read_bytes()[:5000])
    env = {**os.environ, 'SYNTHMORPH_REFINE': '0', 'TMPDIR': str(tmp_path)}
    out = tmp_path / 'out'
    args = [tmp_path / 'bids', out, 'participant', '--contrasts', 'FLAIR', '--no-figures',
            '--skip-bids-validation', '--extent', '192', '--nprocs', '1',
            '-w', tmp_path / 'work']
    res = _cli(*args, env=env)
    assert res.returncode != 0
    assert 'sub-01_FLAIR.nii.gz' in res.stderr and str(t1w) in res.stderr
    assert '--no-via-t1w' in res.stderr
    assert not list(out.glob('sub-01/anat/*FLAIR*'))  # nothing that looks complete
    res = _cli(*args, '--no-via-t1w', env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    fwd = out / 'sub-01' / 'anat' / 'sub-01_from-FLAIR_to-MNI152NLin6Asym_mode-image_xfm.json'
    assert 'Via' not in json.loads(fwd.read_text())
