"""Synthesis of training pairs: label consistency, normalisation, recoverable ground truth."""

from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch

from synthmorph_app.engine import spatial
from synthmorph_app.engine.losses import load_label_groups
from synthmorph_app.engine.synthesis import (
    VALIDATION_MAPS,
    LabelMaps,
    SynthesisSettings,
    Synthesizer,
    SynthStream,
    curriculum_factor,
    downsample_labels,
    fit_prealignment,
    label_map_paths,
    labels_to_image,
    load_label_maps,
    random_affine,
    random_shapes,
    step_generator,
)
from synthmorph_app.io.images import Geometry

torch.manual_seed(0)
VOX, SHAPE = 4.0, 48  # a 192 mm cube at 4 mm: small and fast, still a whole brain
GROUPS = load_label_groups()
#: No intensity augmentation: every label shows one constant intensity.
FLAT = {'std_range': (0.0, 0.0), 'blur_max': 0.0, 'slice_probability': 0.0,
        'bias_std': (0.0, 0.0), 'noise_std': (0.0, 0.0), 'gamma': (1.0, 1.0),
        'crop_probability': 0.0, 'zero_background_probability': 0.0, 'strip_probability': 0.0,
        'drop_probability': 0.0}


@pytest.fixture(scope='module')
def maps(shared_data):
    train, _ = label_map_paths(shared_data / 'label_maps')
    return load_label_maps(train[:2], VOX, SHAPE, GROUPS)


def _blob_maps(shape=(40, 40, 40)) -> LabelMaps:
    """Eight large boxes of loss labels inside a background shell: few boundaries."""
    values = torch.tensor([0, 2, 3, 4, 7, 8, 10, 11, 12, 507])
    index = torch.full((1, 1, *shape), 9, dtype=torch.uint8)  # a removable 'skull' everywhere
    n = [s // 4 for s in shape]
    label = 1
    for i in range(2):
        for j in range(2):
            for k in range(2):
                index[0, 0, n[0] * (1 + i):n[0] * (2 + i), n[1] * (1 + j):n[1] * (2 + j),
                      n[2] * (1 + k):n[2] * (2 + k)] = label
                label += 1
    index[..., :2, :, :] = 0
    geom = Geometry(shape, np.diag([4.0, 4.0, 4.0, 1.0]))
    return LabelMaps(index, values, [geom], ['blobs'], torch.eye(4, dtype=torch.float64)[None],
                     VOX)


def test_settings_are_frozen_and_checked():
    settings = SynthesisSettings()
    with pytest.raises(FrozenInstanceError):
        settings.shift = 3.0
    assert settings.replace(shift=3.0).shift == 3.0
    with pytest.raises(ValueError, match='mean_range'):
        SynthesisSettings(mean_range=(1.0, 0.0))
    with pytest.raises(ValueError, match='crop_probability'):
        SynthesisSettings(crop_probability=1.5)
    with pytest.raises(ValueError, match='scale'):
        SynthesisSettings(scale=1.0)
    deform = SynthesisSettings.for_task('deform')
    assert deform.prealign and deform.rotate < SynthesisSettings().rotate
    with pytest.raises(ValueError, match='task'):
        SynthesisSettings.for_task('nope')
    assert SynthesisSettings(gamma=[0.8, 1.2]).to_dict()['gamma'] == [0.8, 1.2]


def test_downsample_labels_takes_the_block_mode():
    data = np.zeros((4, 4, 4), dtype=np.int32)
    data[:2, :2, :2] = 5
    data[0, 0, 0] = 7  # a minority voxel in the 5-block
    data[2:, 2:, 2:] = 3
    data[3, 3, 3] = 0
    source = Geometry((4, 4, 4), np.eye(4))
    target = Geometry((2, 2, 2), np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5],
                                           [0, 0, 0, 1.0]]))
    out = downsample_labels(data, source, target)
    assert out[0, 0, 0] == 5 and out[1, 1, 1] == 3 and out[1, 0, 0] == 0
    # A target grid off the block grid: nearest neighbour, nothing invented.
    moved = target.affine.copy()
    moved[0, 3] += 0.7
    shifted = Geometry((3, 3, 3), moved)
    assert set(np.unique(downsample_labels(data, source, shifted))) <= {0, 3, 5}


def test_label_maps_load_onto_the_network_grid(maps, shared_data):
    train, val = label_map_paths(shared_data / 'label_maps')
    assert len(train) == 18 and sorted(p.name.split('.')[0] for p in val) == list(
        VALIDATION_MAPS)
    assert maps.index.shape == (2, 1, SHAPE, SHAPE, SHAPE) and maps.index.dtype == torch.uint8
    assert maps.values[0] == 0 and set(GROUPS.loss) <= set(maps.values.tolist())
    assert maps.geometries[0].shape == (SHAPE,) * 3
    assert np.allclose(maps.geometries[0].voxel_sizes, VOX)
    assert maps.prealign.shape == (2, 4, 4)
    # The pre-alignment brings the loss labels' centroids closer together.
    labs = [maps.labels(i) for i in range(2)]
    before, after = [], []
    for lab in GROUPS.loss:
        c = [torch.nonzero(lb[0, 0] == lab).double().mean(0) for lb in labs]
        before.append(float((c[0] - c[1]).norm()))
        p = [maps.prealign[i].inverse() for i in range(2)]
        ca = [p[i][:3, :3] @ c[i] + p[i][:3, 3] for i in range(2)]
        after.append(float((ca[0] - ca[1]).norm()))
    assert np.mean(after) < 0.6 * np.mean(before)


def test_intensity_images_and_foreign_numbering_are_refused(shared_data, tmp_path):
    """An MRI image given as a label map (fractional, or whole numbers that change from voxel
    to voxel) is refused by name; so are maps none of whose labels the loss counts, until a
    label table of their numbering is given."""
    import nibabel as nb

    t1w = nb.load(str(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz'))
    fractional, whole = tmp_path / 'fractional.nii.gz', tmp_path / 'whole.nii.gz'
    nb.save(nb.Nifti1Image(t1w.get_fdata(dtype=np.float32) + 0.5, t1w.affine), str(fractional))
    nb.save(nb.Nifti1Image(np.rint(t1w.get_fdata()).astype(np.int16), t1w.affine), str(whole))
    for path, message in ((fractional, 'fractional values'), (whole, 'share the value')):
        with pytest.raises(ValueError, match=message) as err:
            load_label_maps([path], VOX, SHAPE, GROUPS)
        assert str(path) in str(err.value) and 'not a label map' in str(err.value)
    # a segmentation in another numbering: boxes of labels 501-508
    data = np.zeros((48, 48, 48), np.int16)
    for k, label in enumerate(range(501, 509)):
        data[8 + 4 * k:12 + 4 * k, 10:38, 10:38] = label
    foreign = tmp_path / 'foreign.nii.gz'
    nb.save(nb.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), str(foreign))
    with pytest.raises(ValueError, match='--label-table'):
        load_label_maps([foreign], VOX, SHAPE, GROUPS)
    table = tmp_path / 'table.tsv'
    table.write_text('label\tname\tloss\tremovable\n0\tUnknown\t0\t0\n'
                     + ''.join(f'{v}\tpart{v}\t1\t0\n' for v in range(501, 508))
                     + '508\tskin\t0\t1\n')
    groups = load_label_groups(table)
    loaded = load_label_maps([foreign], VOX, SHAPE, groups)
    assert set(loaded.values.tolist()) == {0, *range(501, 509)}
    assert groups.loss == tuple(range(501, 508)) and groups.removable == (508,)


def test_fit_prealignment_recovers_a_known_affine():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 40, size=(30, 3))
    mat = np.array([[1.05, 0.1, 0, 3], [0, 0.95, 0.05, -2], [0.02, 0, 1.0, 1], [0, 0, 0, 1]])
    moved = pts @ mat[:3, :3].T + mat[:3, 3]
    present = np.ones((2, 30), dtype=bool)
    fitted = fit_prealignment(np.stack([pts, moved]), present)
    mean = (pts + moved) / 2
    for i, target in enumerate((pts, moved)):
        assert np.allclose(mean @ fitted[i, :3, :3].T + fitted[i, :3, 3], target, atol=1e-8)


def test_pairs_are_normalised_and_label_consistent(maps):
    synth = Synthesizer(maps, SynthesisSettings())
    pair = synth.sample(step_generator(0, 1), batch_size=2)
    channel = GROUPS.channel_lut(maps.values)
    for image, labels, seg in ((pair.fixed, pair.fixed_labels, pair.fixed_seg),
                               (pair.moving, pair.moving_labels, pair.moving_seg)):
        assert image.shape == (2, 1, SHAPE, SHAPE, SHAPE) and image.dtype == torch.float32
        assert float(image.min()) == 0.0 and float(image.max()) <= 1.0
        assert float(image.amax(dim=(1, 2, 3, 4)).min()) > 0.5
        assert set(labels.unique().tolist()) <= set(maps.values.tolist())
        # The loss channel of every voxel is that of its label; non-loss labels are channel 0.
        lut = dict(zip(maps.values.tolist(), channel.tolist()))
        for value in labels.unique().tolist():
            assert set(seg[labels == value].unique().tolist()) == {lut[value]}
        assert int(seg.max()) <= GROUPS.num_channels
    assert pair.affine.shape == (2, 4, 4) and pair.coords is None
    assert len(pair.info) == 2


def test_image_intensity_follows_the_labels(maps):
    synth = Synthesizer(maps, SynthesisSettings(**FLAT))
    pair = synth.sample(step_generator(3, 0))
    for image, labels in ((pair.fixed, pair.fixed_labels), (pair.moving, pair.moving_labels)):
        for value in labels.unique().tolist():
            values = image[labels == value]
            assert float(values.max() - values.min()) < 1e-5, f'label {value} not constant'
    # Stripping: every removable label takes the background's intensity.
    strip = Synthesizer(maps, SynthesisSettings(**{**FLAT, 'strip_probability': 1.0}))
    pair = strip.sample(step_generator(3, 0))
    removable = torch.isin(pair.fixed_labels, torch.tensor(GROUPS.removable))
    background = pair.fixed[pair.fixed_labels == 0]
    assert torch.allclose(pair.fixed[removable], background[0].expand(int(removable.sum())))


def test_same_contrast_pairs_share_their_label_intensities():
    """``same_contrast_probability``: one draw of label intensities for both images (with no
    other augmentation and no motion, the two images are equal); independent draws otherwise;
    at probability 0 no extra draw, so the published settings' stream is unchanged."""
    still = {**FLAT, 'same_map_probability': 1.0, 'warp_probability': 0.0, 'shift': 0.0,
             'rotate': 0.0, 'scale': 0.0, 'shear': 0.0, 'drop_probability': 0.5}
    same = Synthesizer(_blob_maps(), SynthesisSettings(**still, same_contrast_probability=1.0))
    apart = Synthesizer(_blob_maps(), SynthesisSettings(**still))
    for step in range(3):
        pair = same.sample(step_generator(2, step))
        assert torch.equal(pair.fixed_labels, pair.moving_labels)
        assert torch.equal(pair.fixed, pair.moving)
        other = apart.sample(step_generator(2, step))
        assert float((other.fixed - other.moving).abs().max()) > 0.1
    # Probability 0 draws nothing more: the same pairs as the field's default.
    base = Synthesizer(_blob_maps(), SynthesisSettings())
    zero = Synthesizer(_blob_maps(), SynthesisSettings(same_contrast_probability=0.0))
    a, b = base.sample(step_generator(4, 3)), zero.sample(step_generator(4, 3))
    assert torch.equal(a.fixed, b.fixed) and torch.equal(a.moving, b.moving)
    with pytest.raises(ValueError, match='same_contrast_probability'):
        SynthesisSettings(same_contrast_probability=1.5)


def test_augmentations_change_the_image_but_stay_in_range():
    index = _blob_maps().index.long()
    removable = torch.zeros(10, dtype=torch.bool)
    heavy = SynthesisSettings(blur_max=8.0, slice_probability=1.0, slice_spacing=(12.0, 16.0),
                              bias_std=(0.5, 0.5), noise_std=(0.1, 0.1), crop_probability=1.0,
                              crop_max=0.2)
    img = labels_to_image(index, removable, step_generator(0, 0), heavy, VOX)
    flat = labels_to_image(index, removable, step_generator(0, 0), SynthesisSettings(**FLAT), VOX)
    assert img.shape == index.shape
    assert float(img.min()) >= 0 and float(img.max()) <= 1
    assert float((img - flat).abs().mean()) > 0.01


def test_ground_truth_pulls_moving_labels_onto_fixed_labels():
    blobs = _blob_maps()
    settings = SynthesisSettings(**FLAT, same_map_probability=1.0, warp_std=(2.0, 2.0))
    synth = Synthesizer(blobs, settings)
    for step in range(3):
        pair = synth.sample(step_generator(5, step), truth=True)
        moved = spatial.sample_grid(pair.moving_labels.float(), pair.coords, 'nearest').long()
        shape = torch.tensor(blobs.shape).view(1, 3, 1, 1, 1)
        inside = ((pair.coords >= 0) & (pair.coords <= shape - 1)).all(1, keepdim=True)
        agree = (moved == pair.fixed_labels)[inside].float().mean()
        identity = (pair.moving_labels == pair.fixed_labels).float().mean()
        assert agree > 0.96, f'step {step}: only {agree:.3f} of the voxels agree'
        assert agree > identity + 0.1
    # Without deformation the linear part alone is the whole truth.
    rigid = Synthesizer(blobs, settings.replace(warp_probability=0.0))
    pair = rigid.sample(step_generator(5, 7), truth=True)
    expected = spatial.affine_coords(pair.affine[0].numpy(), blobs.shape)
    assert torch.allclose(pair.coords[0], expected, atol=1e-4)


def test_ground_truth_on_real_maps(maps):
    settings = SynthesisSettings(**FLAT, same_map_probability=1.0)
    pair = Synthesizer(maps, settings).sample(step_generator(2, 0), truth=True)
    moved = spatial.sample_grid(pair.moving_labels.float(), pair.coords, 'nearest').long()
    brain = pair.fixed_seg > 0
    agree = float((moved == pair.fixed_labels)[brain].float().mean())
    identity = float((pair.moving_labels == pair.fixed_labels)[brain].float().mean())
    # Nearest-neighbour resampling twice at 4 mm blurs thin structures; far above identity.
    assert agree > 0.6 and agree > identity + 0.3


def test_random_affine_ranges():
    settings = SynthesisSettings(shift=0.0, rotate=0.0, scale=0.0, shear=0.0)
    mat = random_affine(step_generator(0, 0), settings, (32, 32, 32), VOX)
    assert torch.allclose(mat, torch.eye(4, dtype=torch.float64), atol=1e-6)
    settings = SynthesisSettings(shift=30.0, rotate=0.0, scale=0.0, shear=0.0)
    for step in range(5):
        mat = random_affine(step_generator(0, step), settings, (32, 32, 32), VOX)
        assert torch.allclose(mat[:3, :3], torch.eye(3, dtype=torch.float64), atol=1e-6)
        assert float(mat[:3, 3].abs().max()) <= 30.0 / VOX + 1e-6
    settings = SynthesisSettings(shift=0.0, rotate=45.0, scale=0.1, shear=0.0)
    mat = random_affine(step_generator(0, 9), settings, (32, 32, 32), VOX)
    sv = torch.linalg.svdvals(mat[:3, :3])
    assert float(sv.max()) <= 1.1 + 1e-6 and float(sv.min()) >= 0.9 - 1e-6
    centre = torch.tensor([15.5, 15.5, 15.5, 1.0], dtype=torch.float64)
    assert torch.allclose(mat @ centre, centre, atol=1e-6)  # about the grid centre


def test_head_size_draws_an_isotropic_size_per_image():
    still = SynthesisSettings(shift=0.0, rotate=0.0, scale=0.0, shear=0.0)
    small = still.replace(head_size=(0.7, 0.7))
    mat = random_affine(step_generator(0, 0), small, (32, 32, 32), VOX)
    # the matrix pulls grid coordinates into the map: a head 0.7 the size reads 1/0.7 as far
    assert torch.allclose(mat[:3, :3], torch.eye(3, dtype=torch.float64) / 0.7, atol=1e-6)
    spread = still.replace(head_size=(0.6, 1.2))
    sizes = [1 / float(random_affine(step_generator(0, k), spread, (32,) * 3, VOX)[0, 0])
             for k in range(40)]
    assert 0.6 - 1e-6 <= min(sizes) < 0.7 and 1.1 < max(sizes) <= 1.2 + 1e-6
    # the default draws nothing more: the published stream is unchanged
    base = SynthesisSettings()
    assert torch.equal(random_affine(step_generator(2, 3), base, (32,) * 3, VOX),
                       random_affine(step_generator(2, 3), base.replace(head_size=[1, 1]),
                                     (32,) * 3, VOX))
    assert spread.scaled(0.0).head_size == (1.0, 1.0)
    assert spread.scaled(0.5).head_size == pytest.approx((0.6 ** 0.5, 1.2 ** 0.5))
    with pytest.raises(ValueError, match='head_size'):
        SynthesisSettings(head_size=(0.0, 1.0))
    with pytest.raises(ValueError, match='head_size'):
        SynthesisSettings(head_size=(1.2, 0.8))


def test_random_shapes_and_shape_pairs():
    lab = random_shapes(step_generator(0, 0), (32, 32, 32), 6, 6.0)
    assert lab.shape == (1, 1, 32, 32, 32) and lab.min() >= 1 and lab.max() <= 6
    assert len(lab.unique()) >= 4
    synth = Synthesizer(_blob_maps(), SynthesisSettings(shapes_probability=1.0, shapes_labels=6))
    pair = synth.sample(step_generator(0, 1))
    assert pair.info[0]['fixed'] == 'shapes'
    assert set(pair.fixed_seg.unique().tolist()) <= set(range(7))
    assert int(pair.fixed_seg.max()) >= 3
    with pytest.raises(ValueError, match='shapes_labels'):
        Synthesizer(_blob_maps(), SynthesisSettings(shapes_probability=0.5, shapes_labels=40))


def test_synthesis_is_reproducible_per_step():
    synth = Synthesizer(_blob_maps(), SynthesisSettings())
    a = synth.sample(step_generator(4, 10))
    b = synth.sample(step_generator(4, 10))
    c = synth.sample(step_generator(4, 11))
    assert torch.equal(a.fixed, b.fixed) and torch.equal(a.moving_labels, b.moving_labels)
    assert not torch.equal(a.fixed, c.fixed)


def test_stream_is_the_same_with_workers():
    synth = Synthesizer(_blob_maps(), SynthesisSettings())
    stream = SynthStream(synth, seed=3, start=5, stop=8)
    local = list(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    remote = list(loader)
    assert [s for s, _ in local] == [s for s, _ in remote] == [5, 6, 7]
    for (_, a), (_, b) in zip(local, remote):
        assert torch.equal(a.fixed, b.fixed)
    direct = synth.sample(step_generator(3, 6))
    assert torch.equal(direct.moving, local[1][1].moving)


@pytest.mark.gpu
def test_synthesis_runs_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    blobs = _blob_maps()
    synth = Synthesizer(blobs.to('cuda'), SynthesisSettings())
    pair = synth.sample(step_generator(0, 0, 'cuda'), truth=True)
    assert pair.fixed.is_cuda and pair.coords.is_cuda
    assert 0 <= float(pair.fixed.min()) and float(pair.fixed.max()) <= 1


def test_curriculum_scales_the_affine_ranges():
    assert curriculum_factor(0, 0) == 1.0 and curriculum_factor(50, 100) == pytest.approx(0.6)
    assert curriculum_factor(0, 100) == pytest.approx(0.2) and curriculum_factor(100, 100) == 1
    settings = SynthesisSettings(**FLAT, same_map_probability=1.0, warp_probability=0.0)
    assert settings.scaled(0.5).rotate == settings.rotate / 2
    synth = Synthesizer(_blob_maps(), settings)
    pair = synth.sample(step_generator(0, 0), affine_factor=0.0)
    assert torch.allclose(pair.affine[0], torch.eye(4, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match='factor'):
        settings.scaled(2.0)
