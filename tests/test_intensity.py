"""What the engine reads of an image's intensities: background at 0, artefacts cut."""

import nibabel as nb
import numpy as np
import pytest

from synthmorph_app.engine.intensity import SPIKE_FACTOR, clean_intensities

RNG = np.random.default_rng(0)


def _head(shape=(40, 44, 48)):
    """A bright ball (tissue 100-300) in a zero background."""
    ijk = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    inside = (ijk**2).sum(0) < 15**2
    return np.where(inside, RNG.uniform(100, 300, shape), 0.0).astype(np.float32)


def test_a_clean_image_is_left_as_it_is():
    data = _head()
    assert np.array_equal(clean_intensities(data), data)


def test_offset_spikes_and_negative_artefacts():
    data = _head()
    idx = tuple(RNG.integers(0, s, 10) for s in data.shape)
    spiky = data.copy()
    spiky[idx] = 1e6
    out = clean_intensities(spiky)
    tissue = np.percentile(data[data > 0], 99.9)
    assert tissue < out.max() <= 1.01 * SPIKE_FACTOR * tissue  # cut at the ceiling
    others = np.ones(data.shape, bool)
    others[idx] = False
    assert np.array_equal(out[others], data[others])  # only the spikes change
    negative = data.copy()
    negative[idx] = -32768
    out = clean_intensities(negative)
    assert out.min() == 0 and np.array_equal(out[data > 0], negative[data > 0].clip(0))
    # stored with an offset: the background comes back to 0, the tissue keeps its contrast
    out = clean_intensities(data - 500)
    np.testing.assert_allclose(out, data, atol=1e-3)


@pytest.mark.slow
def test_artefacts_and_offsets_do_not_move_the_registration(shared_data):
    """A real T1w with 20 spikes of 10^6 and 20 voxels of -30000, stored with an offset of -500:
    the affine onto the template is the one of the clean image (it was 17-164 mm away)."""
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    t1w = load_image(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz')
    template = load_image(shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
                          / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    data = t1w.get_fdata(dtype=np.float32)
    spoilt = data.copy()
    for value in (1e6, -30000):
        spoilt[tuple(RNG.integers(0, s, 20) for s in data.shape)] = value
    spoilt -= 500
    points = np.random.default_rng(1).uniform(-60, 60, (500, 3))
    found = [register(nb.Nifti1Image(d, t1w.affine), template, mode='affine', refine=5)
             .forward.map_points(points) for d in (data, spoilt)]
    assert np.linalg.norm(found[0] - found[1], axis=1).mean() < 0.5
