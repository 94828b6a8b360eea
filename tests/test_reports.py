"""Report metrics with hand-computed answers, group outliers, subject and group pages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from synthmorph_app.errors import SynthMorphError
from synthmorph_app.evaluate import ncc
from synthmorph_app.reports.group import flag_outliers, write_group_report
from synthmorph_app.reports.metrics import QC_KEYS, registration_qc
from synthmorph_app.reports.subject import write_subject_report


def test_folding_and_similarity():
    jac = np.ones((4, 4, 4))
    jac[0, 0, 0] = -0.5
    img = np.random.default_rng(0).random((4, 4, 4))
    qc = registration_qc(img, img, np.ones_like(img, bool), jac)
    assert set(qc) == set(QC_KEYS)
    assert qc['mind_ncc'] == pytest.approx(1.0) and qc['ncc'] == pytest.approx(1.0)
    assert qc['folding_pct'] == pytest.approx(100 / 64, abs=1e-4)
    assert ncc(img, -img) == pytest.approx(-1.0)


def test_a_lesion_is_left_out_of_the_qc(tmp_path):
    """A lesion on the template grid: the metrics are those of the brain mask without it."""
    import nibabel as nb

    from synthmorph_app.reports.figures import image_qc

    rng = np.random.default_rng(1)
    shape, affine = (20, 22, 24), np.diag([2.0, 2.0, 2.0, 1.0])
    template = rng.random(shape).astype(np.float32)
    moved = template + 0.1 * rng.random(shape).astype(np.float32)
    lesion = np.zeros(shape, np.uint8)
    lesion[4:12, 5:13, 6:14] = 1
    moved[lesion > 0] = 0.0  # a cavity: nothing like the template
    brain = np.zeros(shape, np.uint8)
    brain[2:18, 2:20, 2:22] = 1
    files = {}
    for name, data in (('tpl', template), ('moved', moved), ('brain', brain),
                       ('lesion', lesion)):
        files[name] = tmp_path / f'{name}.nii.gz'
        nb.save(nb.Nifti1Image(data, affine), str(files[name]))
    args = (files['moved'], files['moved'], files['tpl'], files['brain'], None, tmp_path)
    plain = image_qc(*args, figures=False)['qc']
    without = image_qc(*args, figures=False, lesion_mask=files['lesion'])['qc']
    expected = registration_qc(moved, template, (brain > 0) & (lesion == 0), None)
    assert without == expected
    assert without['ncc'] > plain['ncc'] + 0.1


def test_outliers_flagged():
    rows = [{'mind_ncc': v, 'ncc': 0.5, 'logjac_sd': 0.1, 'folding_pct': f, 'time_s': 10.0}
            for v, f in [(0.8, 0), (0.81, 0), (0.79, 0), (0.8, 0), (0.2, 0.5)]]
    flag_outliers(rows)
    assert [r['outlier'] for r in rows[:4]] == ['', '', '', '']
    assert rows[4]['outlier'] == 'mind_ncc,folding_pct'


def _fake_run(out, sub, ncc_value):
    anat = out / f'sub-{sub}' / 'anat'
    anat.mkdir(parents=True)
    meta = {'Sources': [f'bids:raw:sub-{sub}/anat/sub-{sub}_T1w.nii.gz'],
            'FromSpace': 'T1w', 'ToSpace': 'MNI152NLin6Asym', 'Template': 'MNI152NLin6Asym',
            'TemplateSpec': {'res': '2'}, 'RegistrationMode': 'joint', 'Lambda': 0.5,
            'Models': {'affine': {'name': 'a', 'trained': False, 'sha256': '0' * 64}},
            'ElapsedTime': 12.0,
            'QC': {'mind_ncc': ncc_value, 'ncc': 0.5, 'logjac_sd': 0.1, 'folding_pct': 0.0}}
    (anat / f'sub-{sub}_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json').write_text(
        json.dumps(meta))


def test_subject_and_group_pages(tmp_path):
    with pytest.raises(SynthMorphError, match='participant level first'):
        write_group_report(tmp_path)
    for i, value in enumerate([0.8, 0.81, 0.79, 0.1]):
        _fake_run(tmp_path, f'0{i}', value)
    page = write_subject_report(tmp_path, '00', failures={'/x/sub-00_T2w.nii.gz': 'bad file'})
    text = page.read_text()
    assert 'FAILED sub-00_T2w.nii.gz: bad file' in text and 'UNTRAINED' in text
    tsv, html = write_group_report(tmp_path)
    lines = tsv.read_text().splitlines()
    assert len(lines) == 5 and lines[-1].endswith('mind_ncc')
    assert html.read_text().count('<svg') == len(QC_KEYS) + 1  # one plot per metric and time


def test_the_figures_read_a_moving_image_stored_with_a_fourth_axis_of_one(tmp_path):
    """A (X, Y, Z, 1) file registers as 3D; its before/after figure must read it alike."""
    import nibabel as nb

    from synthmorph_app.reports.figures import image_qc

    rng = np.random.default_rng(2)
    shape, affine = (20, 22, 24), np.diag([2.0, 2.0, 2.0, 1.0])
    template = rng.random(shape).astype(np.float32)
    brain = np.zeros(shape, np.uint8)
    brain[2:18, 2:20, 2:22] = 1
    files = {}
    for name, data in (('tpl', template), ('brain', brain), ('moving', template[..., None])):
        files[name] = tmp_path / f'{name}.nii.gz'
        nb.save(nb.Nifti1Image(data, affine), str(files[name]))
    out = image_qc(files['moving'], files['tpl'], files['tpl'], files['brain'], None, tmp_path)
    svg = (tmp_path / 'before_after.svg').read_text()
    assert out['before_after'] == str(tmp_path / 'before_after.svg') and '<svg' in svg


def test_the_subject_page_finds_the_figures_where_the_sink_writes_them(tmp_path):
    """A cohort template's figures are named with the cohort (``space-MNIInfant_cohort-1``)
    and the entities in BIDS order; the page looked for ``space-MNIInfant_desc-reg`` under
    the source's own entity order and showed no figure."""
    from synthmorph_app.interfaces.derivatives import derivative_paths, sidecar
    from synthmorph_app.reports.subject import collect_subject

    source = 'sub-01_rec-norm_ce-gd_T1w.nii.gz'  # entities out of BIDS order
    spec = {'cohort': '1', 'res': '1'}
    paths = derivative_paths(tmp_path, source, 'MNIInfant', spec)
    for key in ('before_after', 'jacobian_figure'):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        paths[key].write_text('<svg/>')
    paths['forward_xfm'].parent.mkdir(parents=True)
    sidecar(paths['forward_xfm']).write_text(json.dumps({
        'Sources': [f'bids:raw:sub-01/anat/{source}'], 'FromSpace': 'T1w',
        'ToSpace': 'MNIInfant', 'Template': 'MNIInfant', 'TemplateSpec': spec}))
    [item] = collect_subject(tmp_path, '01')
    assert item['before_after'] == paths['before_after'] and item['before_after'].is_file()
    assert item['jacobian'] == paths['jacobian_figure']


def test_methods_text_names_the_refinement_that_was_run():
    """The methods text a paper copies must describe what made the results: the test-time
    refinement (on by default everywhere), its metric and its weight; and nothing of it where
    it was off."""
    from synthmorph_app.reports.boilerplate import citation_markdown

    text, bib = citation_markdown(['MNI152NLin6Asym:res-2'])
    assert 'test-time optimisation of the affine transform, then the stationary velocity field' \
        in text and '(15 iterations at the finest level)' in text
    assert "weighted by the template's brain mask" in text and 'lambda 0.7' in text
    assert '@heinrich2013' in text and '@inproceedings{heinrich2013' in bib
    text, _ = citation_markdown(['MNI152NLin6Asym:res-2'], mode='rigid', refine=5,
                                refine_options={'refine_metric': 'lncc', 'refine_weight': 'none'})
    assert ('refined by test-time optimisation of the rigid transform, coarse to fine (5 '
            'iterations at the finest level), maximising local normalised cross-correlation.'
            ) in text
    text, bib = citation_markdown(['MNI152NLin6Asym:res-2'], refine=0)
    assert 'test-time' not in text and 'heinrich2013' not in bib
