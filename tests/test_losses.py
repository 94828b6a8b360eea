"""Anatomy-aware losses: selected labels only, smoothness, affine warping of one-hot maps."""

import pytest
import torch

from synthmorph_app.engine import losses as L

torch.manual_seed(0)
GROUPS = L.load_label_groups()


def _labels(shape=(16, 16, 16), seed=0):
    """A label map with brain labels inside and non-brain labels around them."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.full((1, 1, *shape), 507)
    brain = [2, 3, 41, 42, 17, 53]
    inner = torch.randint(len(brain), (1, 1, 8, 8, 8), generator=gen)
    lab[..., 4:12, 4:12, 4:12] = torch.tensor(brain)[inner]
    lab[..., :2, :, :] = 0
    lab[..., 14:, :, :] = 24
    return lab


def _seg(labels):
    values = labels.unique()
    lut = dict(zip(values.tolist(), GROUPS.channel_lut(values).tolist()))
    out = torch.zeros_like(labels)
    for value, channel in lut.items():
        out[labels == value] = channel
    return out


def test_packaged_label_groups():
    assert GROUPS.num_channels == 29
    assert set(GROUPS.loss).isdisjoint(GROUPS.removable)
    assert 0 not in GROUPS.loss and 24 in GROUPS.removable and 507 in GROUPS.removable
    assert {2, 3, 41, 42, 17, 53, 16} <= set(GROUPS.loss)
    assert GROUPS.names[17] == 'Left-Hippocampus'
    lut = GROUPS.channel_lut(torch.tensor([0, 2, 507, 3, 5]))
    assert lut.tolist() == [0, 1, 0, 2, 0]
    assert GROUPS.removable_mask(torch.tensor([0, 2, 507])).tolist() == [False, False, True]


def test_label_table_needs_its_columns(tmp_path):
    bad = tmp_path / 'bad.tsv'
    bad.write_text('label\tname\n2\tWM\n')
    with pytest.raises(ValueError, match='lacks the columns'):
        L.load_label_groups(bad)
    good = tmp_path / 'good.tsv'
    good.write_text('label\tname\tloss\tremovable\n0\tbg\t0\t0\n5\tA\t1\t0\n9\tB\t0\t1\n')
    groups = L.load_label_groups(good)
    assert groups.loss == (5,) and groups.removable == (9,)


def test_onehot_has_no_channel_for_ignored_voxels():
    seg = torch.tensor([0, 1, 2, 2, 0]).view(1, 1, 5, 1, 1)
    hot = L.onehot(seg, 3)
    assert hot.shape == (1, 3, 5, 1, 1)
    assert hot[0, :, 0].sum() == 0 and hot[0, :, 4].sum() == 0
    assert hot[0, 0, 1] == 1 and hot[0, 1, 2] == 1 and hot[0, 2].sum() == 0
    with pytest.raises(ValueError, match='seg values'):
        L.onehot(seg, 1)
    with pytest.raises(ValueError, match='seg must be'):
        L.onehot(seg[:, 0], 3)


def test_overlap_ignores_labels_outside_the_loss():
    fixed = _labels(seed=0)
    moved = _labels(seed=1)
    k = GROUPS.num_channels
    base = L.overlap_mse(L.onehot(_seg(moved), k), L.onehot(_seg(fixed), k))
    assert float(base) > 0
    # Rewrite every non-brain voxel (skull -> CSF -> background, and back): no change.
    other = moved.clone()
    other[moved == 507] = 24
    other[moved == 0] = 507
    other[moved == 24] = 0
    same = L.overlap_mse(L.onehot(_seg(other), k), L.onehot(_seg(fixed), k))
    assert torch.equal(same, base)
    # Changing one brain label changes it.
    brain = moved.clone()
    brain[moved == 17] = 53
    assert float(L.overlap_mse(L.onehot(_seg(brain), k), L.onehot(_seg(fixed), k))) != float(base)
    assert float(L.overlap_mse(L.onehot(_seg(fixed), k), L.onehot(_seg(fixed), k))) == 0.0
    with pytest.raises(ValueError, match='same shape'):
        L.overlap_mse(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))


def test_overlap_is_the_mse_of_hard_maps_and_does_not_reward_blur():
    k = GROUPS.num_channels
    fixed = L.onehot(_seg(_labels(seed=0)), k).float()
    moved = L.onehot(_seg(_labels(seed=1)), k).float()
    mse = ((moved - fixed) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(L.overlap_mse(moved, fixed), mse)
    # The moved map pulled half a voxel along one axis by linear interpolation is the mean of
    # two placements; the plain MSE of that blend is lower than either's, ours is their mean.
    nudged = torch.roll(moved, 1, dims=2)
    blend = 0.5 * (moved + nudged)
    plain = ((blend - fixed) ** 2).flatten(1).mean(1)
    ours = L.overlap_mse(blend, fixed)
    ends = torch.stack([L.overlap_mse(moved, fixed), L.overlap_mse(nudged, fixed)])
    assert float(plain) < float(ends.min())
    torch.testing.assert_close(ours, ends.mean(0))


def test_overlap_dice_is_one_minus_the_mean_soft_dice_of_labels():
    k = GROUPS.num_channels
    fixed_seg, moved_seg = _seg(_labels(seed=0)), _seg(_labels(seed=1))
    fixed, moved = L.onehot(fixed_seg, k).float(), L.onehot(moved_seg, k).float()
    # Hard maps: one minus the mean Dice of the labels present in either map.
    dice = L.dice(moved_seg, fixed_seg, range(1, k + 1))
    expected = 1 - torch.nanmean(dice, 1)
    torch.testing.assert_close(L.overlap_dice(moved, fixed), expected.float())
    assert float(L.overlap_dice(fixed, fixed)) == 0.0
    # Every label counts the same: a small label missed entirely costs as much as a large one,
    # while the MSE barely sees it.
    small = torch.zeros(1, 2, 8, 8, 8)
    small[0, 0, :4] = 1
    small[0, 1, 4:, :1, :1] = 1
    lost = small.clone()
    lost[0, 1] = 0
    assert float(L.overlap_dice(lost, small)) == pytest.approx(0.5)
    assert float(L.overlap_mse(lost, small)) < 0.01
    # Linear in the moved map (like overlap_mse), so blur does not pay.
    nudged = torch.roll(moved, 1, dims=2)
    ends = torch.stack([L.overlap_dice(moved, fixed), L.overlap_dice(nudged, fixed)])
    torch.testing.assert_close(L.overlap_dice(0.5 * (moved + nudged), fixed), ends.mean(0))
    with pytest.raises(ValueError, match='same shape'):
        L.overlap_dice(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))


def test_grad_l2_by_hand():
    disp = torch.zeros(2, 3, 6, 6, 6)
    assert torch.equal(L.grad_l2(disp), torch.zeros(2))
    ramp = torch.arange(6.0).view(1, 1, 6, 1, 1) * 0.3
    disp[1, 0] = ramp[0, 0].expand(6, 6, 6)
    # Only channel 0 varies, along the first axis, by 0.3 per voxel: (0.3^2 / 3) / 3.
    expected = 0.3**2 / 3 / 3
    assert torch.allclose(L.grad_l2(disp), torch.tensor([0.0, expected]))
    shift = disp + 5.0  # a constant displacement costs nothing
    assert torch.allclose(L.grad_l2(shift), L.grad_l2(disp))
    with pytest.raises(ValueError, match='disp must be'):
        L.grad_l2(torch.zeros(1, 2, 4, 4, 4))


def test_deform_loss_weights():
    moved = torch.rand(2, 4, 8, 8, 8)
    fixed = torch.rand(2, 4, 8, 8, 8)
    disp = torch.randn(2, 3, 8, 8, 8)
    overlap = L.overlap_mse(moved, fixed)
    smooth = L.grad_l2(disp)
    total, o, s = L.deform_loss(moved, fixed, disp, torch.tensor([[0.0], [1.0]]))
    assert torch.allclose(total, torch.stack([10 * overlap[0], smooth[1]]))
    assert torch.equal(o, overlap) and torch.equal(s, smooth)
    half, *_ = L.deform_loss(moved, fixed, disp, torch.tensor([0.5, 0.5]), overlap_weight=1.0)
    assert torch.allclose(half, 0.5 * overlap + 0.5 * smooth)
    dice, o, _ = L.deform_loss(moved, fixed, disp, torch.tensor([0.5, 0.5]), 1.0, 'dice')
    torch.testing.assert_close(o, L.overlap_dice(moved, fixed))
    assert torch.allclose(dice, 0.5 * o + 0.5 * smooth)
    heavy, _, s20 = L.deform_loss(moved, fixed, disp, torch.tensor([0.5, 0.5]), 1.0, 'dice', 20.0)
    assert torch.equal(s20, smooth)  # the term reported is the plain smoothness
    assert torch.allclose(heavy, 0.5 * o + 10.0 * smooth)
    with pytest.raises(ValueError, match='lam'):
        L.deform_loss(moved, fixed, disp, torch.tensor([0.5]))
    with pytest.raises(ValueError, match='overlap'):
        L.deform_loss(moved, fixed, disp, torch.tensor([0.5, 0.5]), overlap='ncc')


def test_halve_and_half_to_full_agree():
    maps = torch.rand(1, 2, 8, 8, 8)
    avg = L.halve(maps, 'average')
    sub = L.halve(maps, 'subsample')
    assert avg.shape == sub.shape == (1, 2, 4, 4, 4)
    assert torch.allclose(avg[0, :, 1, 2, 3], maps[0, :, 2:4, 4:6, 6:8].mean((1, 2, 3)))
    assert torch.equal(sub[0, :, 1, 2, 3], maps[0, :, 2, 4, 6])
    assert L.half_to_full('average')[0].tolist() == [2, 0, 0, 0.5]
    assert L.half_to_full('subsample')[0].tolist() == [2, 0, 0, 0.0]
    with pytest.raises(ValueError, match='mode'):
        L.halve(maps, 'max')


def test_affine_warp_identity_shift_and_coarse_grid():
    maps = torch.rand(1, 2, 8, 8, 8)
    eye = torch.eye(4)[None]
    assert torch.allclose(L.affine_warp(maps, eye), maps, atol=1e-6)
    shift = eye.clone()
    shift[0, 0, 3] = 2.0  # fixed voxel i looks at moving voxel i + 2
    out = L.affine_warp(maps, shift)
    assert torch.allclose(out[:, :, :6], maps[:, :, 2:], atol=1e-6)
    assert torch.equal(out[:, :, 6:], torch.zeros_like(out[:, :, 6:]))
    # A full-resolution matrix acting on half-resolution (subsampled) maps.
    full = torch.rand(1, 1, 16, 16, 16)
    shift4 = eye.clone()
    shift4[0, 1, 3] = 4.0
    low = L.affine_warp(L.halve(full, 'subsample'), shift4, L.half_to_full('subsample'))
    assert torch.allclose(low[:, :, :, :6], L.halve(full, 'subsample')[:, :, :, 2:], atol=1e-6)
    with pytest.raises(ValueError, match='matrix must be'):
        L.affine_warp(maps, torch.eye(4))


def test_affine_warp_is_differentiable_in_the_matrix():
    maps = torch.rand(1, 1, 5, 5, 5, dtype=torch.float64)
    mat = torch.eye(4, dtype=torch.float64)[None].clone()
    mat[0, :3, 3] = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    mat.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: L.affine_warp(maps, m).sum(), (mat,))


def test_dice_by_hand():
    a = torch.tensor([1, 1, 2, 0]).view(1, 1, 4, 1, 1)
    b = torch.tensor([1, 2, 2, 0]).view(1, 1, 4, 1, 1)
    d = L.dice(a, b, [1, 2, 3])
    assert torch.allclose(d[0, :2], torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    assert torch.isnan(d[0, 2])
