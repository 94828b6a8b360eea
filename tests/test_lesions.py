"""Lesion masks in the BIDS-App: found beside the T1w as fMRIPrep reads them, accepted by the
input check, handed to the T1w's job and to the jobs that go through that T1w."""

from pathlib import Path

import pytest

from synthmorph_app.utils.bids import (
    BIDSError,
    bidsignored,
    session_lesion,
    validate_dataset,
)


def _touch(path: Path, text: str = '') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_session_lesion_picks_the_mask_beside_the_t1w(tmp_path):
    anat = tmp_path / 'sub-01' / 'ses-1' / 'anat'
    run1 = _touch(anat / 'sub-01_ses-1_run-1_T1w.nii.gz')
    run2 = _touch(anat / 'sub-01_ses-1_run-2_T1w.nii.gz')
    assert session_lesion(run1) is None  # none yet
    _touch(anat / 'sub-01_ses-1_label-tumour_roi.nii.gz')  # another label: not a lesion mask
    _touch(anat / 'sub-01_ses-1_label-lesion_roi.json')
    assert session_lesion(run1) is None
    both = _touch(anat / 'sub-01_ses-1_label-lesion_roi.nii.gz')
    assert session_lesion(run1) == both and session_lesion(run2) == both
    second = _touch(anat / 'sub-01_ses-1_run-2_label-lesion_roi.nii.gz')
    assert session_lesion(run2) == second  # the one sharing its run
    assert session_lesion(run1) == both
    other = _touch(tmp_path / 'sub-01' / 'ses-2' / 'anat' / 'sub-01_ses-2_T1w.nii.gz')
    assert session_lesion(other) is None  # another session's mask does not count


def test_input_check_accepts_lesion_masks_and_honours_bidsignore(tmp_path):
    _touch(tmp_path / 'dataset_description.json', '{"Name": "x", "BIDSVersion": "1.9.0"}')
    anat = tmp_path / 'sub-01' / 'anat'
    _touch(anat / 'sub-01_T1w.nii.gz')
    _touch(anat / 'sub-01_label-lesion_roi.nii.gz')
    validate_dataset(tmp_path)
    notes = _touch(anat / 'notes.txt')
    scans = _touch(tmp_path / 'sub-01' / 'extra' / 'scan.dat')
    with pytest.raises(BIDSError, match='notes.txt'):
        validate_dataset(tmp_path)
    _touch(tmp_path / '.bidsignore', '# ours\n*.txt\nsub-*/extra/\n')
    validate_dataset(tmp_path)
    scans.rename(tmp_path / 'sub-01' / 'anat' / 'scan.dat')
    with pytest.raises(BIDSError, match='scan.dat'):
        validate_dataset(tmp_path)
    assert notes.exists()


@pytest.mark.parametrize(('rel', 'pattern', 'ignored'), [
    ('sub-01/anat/notes.txt', '*.txt', True),
    ('sub-01/figures/a.svg', 'sub-*/figures/', True),
    ('sub-01/anat/figures', 'figures/', False),  # a file, not a folder
    ('group/qc.tsv', 'group/', True),
    ('sub-01/anat/sub-01_T1w.nii.gz', 'sub-*/func/', False),
    ('sub-01/anat/x.nii', 'anat', True),  # a bare name matches at any level
    ('sub-01/anat/x.nii', 'sub-02/*', False),
])
def test_bidsignore_patterns(rel, pattern, ignored):
    assert bidsignored(rel, [pattern]) is ignored


def test_workflow_hands_the_lesion_to_the_t1w_and_through_it(tmp_path):
    from synthmorph_app.workflows.base import init_anat_image_wf
    from synthmorph_app.workflows.settings import RegistrationSettings

    anat = tmp_path / 'sub-01' / 'anat'
    t1w = _touch(anat / 'sub-01_T1w.nii.gz')
    flair = _touch(anat / 'sub-01_FLAIR.nii.gz')
    lesion = _touch(anat / 'sub-01_label-lesion_roi.nii.gz')
    lone = _touch(tmp_path / 'sub-02' / 'anat' / 'sub-02_T1w.nii.gz')

    def lesion_of(path, **settings):
        wf = init_anat_image_wf(in_file=str(path), templates=['MNI152NLin6Asym:res-2'],
                                out_dir=str(tmp_path / 'out'), bids_dir=str(tmp_path),
                                settings=RegistrationSettings(refine=15, **settings))
        reg_wf = wf.get_node('register_template_wf')
        given = reg_wf.get_node('inputnode').inputs.lesion_mask
        written = [c for _, _, data in wf._graph.edges(data=True) for c in data['connect']
                   if c[1] == 'inputnode.lesion_mask']
        assert len(written) == (1 if path == t1w else 0), (path, written)  # the T1w's job only
        return (given if isinstance(given, str) else None), reg_wf.__desc__

    given, desc = lesion_of(t1w)
    assert given == str(lesion) and 'cost-function masking [@brett2001]' in desc
    assert lesion_of(flair, via_t1w=True)[0] == str(lesion)  # through the T1w it was drawn on
    given, desc = lesion_of(flair)  # registered on its own: the mask is the T1w's
    assert given is None and 'lesion' not in desc
    assert lesion_of(lone)[0] is None
