"""What the engine reads of an image's intensities: background at 0, artefacts cut, a
background of noise (MP2RAGE UNI) cleared."""

import nibabel as nb
import numpy as np
import pytest
import torch

from synthmorph_app.engine.intensity import (
    SPIKE_FACTOR,
    clean_intensities,
    clear_noisy_background,
    intensity_limits,
    normalize_intensity,
)

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


def _uni_background(data, rng, head=None):
    """``data`` with the air around the head (``head``: where it is kept, by default a generous
    threshold mask) replaced by noise over the whole range, as an MP2RAGE UNI image has it."""
    from scipy import ndimage

    bright = float(np.percentile(data, 99.5))
    if head is None:
        head = ndimage.binary_closing(ndimage.gaussian_filter(data, 2) > 0.1 * bright,
                                      iterations=3)
        head = ndimage.binary_dilation(ndimage.binary_fill_holes(head), iterations=2)
    return np.where(head, data, rng.uniform(0, bright, data.shape)).astype(np.float32)


def test_noisy_background_is_cleared_and_an_ordinary_one_kept():
    """A smooth 'head' (2 mm voxels) in air of noise over the whole range: the air is cleared
    (but for a shell of a few mm), nothing deeper than 6 mm in the head changes; the same head
    in ordinary dim noise comes back as the very same array."""
    from scipy import ndimage

    shape = (80, 90, 80)
    ijk = (np.indices(shape) - np.array(shape)[:, None, None, None] / 2) * 2.0  # mm
    radius = np.sqrt(((ijk / np.array([65.0, 80.0, 70.0])[:, None, None, None]) ** 2).sum(0))
    inside = radius < 1
    texture = ndimage.gaussian_filter(RNG.normal(size=shape), 2)
    tissue = 200 + 60 * texture / texture.std()
    ordinary = np.where(inside, tissue, np.abs(RNG.normal(0, 8, shape))).astype(np.float32)
    assert clear_noisy_background(ordinary, (2.0, 2.0, 2.0)) is ordinary
    uni = _uni_background(ordinary, RNG, head=inside)
    out = clear_noisy_background(uni, (2.0, 2.0, 2.0))
    depth = ndimage.distance_transform_edt(inside, sampling=2.0)
    assert np.array_equal(out[depth > 6], uni[depth > 6])
    far = ndimage.distance_transform_edt(~inside, sampling=2.0) > 6
    assert (out[far] == 0).mean() > 0.9, (out[far] == 0).mean()


@pytest.mark.slow
def test_mp2rage_background_does_not_move_the_affine(shared_data):
    """A real T1w whose air is noise over the whole range (an MP2RAGE UNI background) lands
    where the clean image does under ``-m affine`` (it was 16 mm away on average: the head
    masks took the whole field of view for the head)."""
    from synthmorph_app.engine.register import register
    from synthmorph_app.io.images import load_image

    t1w = load_image(shared_data / 'bids' / 'sub-12' / 'anat' / 'sub-12_T1w.nii.gz')
    template = load_image(shared_data / 'templateflow' / 'tpl-MNI152NLin6Asym'
                          / 'tpl-MNI152NLin6Asym_res-02_T1w.nii.gz')
    data = t1w.get_fdata(dtype=np.float32)
    uni = _uni_background(data, np.random.default_rng(0))
    points = np.random.default_rng(1).uniform(-60, 60, (500, 3))
    results = [register(nb.Nifti1Image(d, t1w.affine), template, mode='affine', refine=15,
                        refine_metric='lncc') for d in (data, uni)]
    found = [r.forward.map_points(points) for r in results]
    gap = np.linalg.norm(found[0] - found[1], axis=1)
    assert gap.mean() < 2.0, gap.mean()
    assert 'noise_background_cleared' not in results[0].info
    assert 0.4 < results[1].info['noise_background_cleared']['moving'] < 0.8


def test_a_lesion_is_filled_from_the_tissue_around_it():
    """A dark cavity in a smooth tissue gradient: filled, it takes the level of the tissue
    around it (no trace of its own contrast); outside it nothing changes."""
    from synthmorph_app.engine.intensity import fill_lesion

    shape = (48, 50, 52)
    ijk = np.indices(shape).astype(np.float32)
    tissue = 100 + 2.0 * ijk[0]  # a smooth gradient along the first axis
    data = tissue + RNG.normal(0, 2, shape).astype(np.float32)
    r = np.linalg.norm(ijk - np.array([24, 25, 26])[:, None, None, None], axis=0)
    lesion = r < 8
    data[lesion] = 5.0  # fluid
    keep = (~lesion).astype(np.float32)
    filled = fill_lesion(data, keep, (2.0, 2.0, 2.0))
    assert filled.dtype == np.float32 and filled.shape == shape
    assert np.array_equal(filled[~lesion], data[~lesion])
    assert np.abs(filled[lesion] - tissue[lesion]).mean() < 6  # the tissue's level, about 148
    assert filled[lesion].min() > 100


def test_normalize_intensity_and_its_limits():
    """Minimum to 0, the 99.9th percentile of the voxels above it to 1, clipped; a part of an
    image scaled with the whole image's limits matches the whole image's result there."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 40, 30, 20, generator=gen) * 300 + 20
    x[:, :, :5] = 20.0  # background at the minimum
    x[1] = 7.0  # one value throughout
    limits = intensity_limits(x)
    assert limits[1] is None
    lo, hi = limits[0]
    assert lo == pytest.approx(20.0)
    fg = x[0][x[0] > 20.0]
    assert hi == pytest.approx(float(torch.quantile(fg, 0.999)), rel=1e-3)
    out = normalize_intensity(x)
    assert float(out[0].min()) == 0.0 and float(out[0].max()) == 1.0
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    part = x[:, :, 10:30]
    torch.testing.assert_close(normalize_intensity(part, limits=limits), out[:, :, 10:30])
    assert not torch.allclose(normalize_intensity(part), out[:, :, 10:30])
