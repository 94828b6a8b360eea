"""Official Keras weights: small .h5 files in the official layout vs an independent numpy model.

The numpy reference works on the Keras arrays as stored (channels last, kernels
``(3, 3, 3, Cin, Cout)``, hyper kernels ``(H, 27 * Cin * Cout)``) and follows voxelmorph's
``VxmAffineFeatureDetector`` / ``HyperVxmJoint`` step by step; it never calls our torch code.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from synthmorph_app.engine import weights
from synthmorph_app.engine.keras import keras_layers, load_keras_model
from synthmorph_app.errors import WeightsError

RNG = np.random.default_rng(42)


# ------------------------------------------------------------------ Keras-layout files


def write_keras(path, layers, nest=None):
    """Write ``[(layer, {weight: array})]`` as Keras 2 ``save_weights`` HDF5.

    ``nest`` puts all layers in one sub-model group (as a functional sub-model is saved).
    """
    with h5py.File(path, 'w') as h5:
        h5.attrs['backend'] = b'tensorflow'
        h5.attrs['keras_version'] = b'2.11.0'
        names = [b'input_1', b'input_2']
        if nest:
            group = h5.create_group(nest)
            group.attrs['weight_names'] = [f'{lay}/{w}:0'.encode() for lay, ws in layers
                                           for w in ws]  # fmt: skip
            for lay, ws in layers:
                for w, arr in ws.items():
                    group.create_dataset(f'{lay}/{w}:0', data=arr.astype(np.float32))
            names.append(nest.encode())
        else:
            for lay, ws in layers:
                group = h5.create_group(lay)
                group.attrs['weight_names'] = [f'{lay}/{w}:0'.encode() for w in ws]
                for w, arr in ws.items():
                    group.create_dataset(f'{lay}/{w}:0', data=arr.astype(np.float32))
                names.append(lay.encode())
        h5.attrs['layer_names'] = names


def keras_name(base, i):
    return base if i == 0 else f'{base}_{i}'


def conv_weights(cin, cout, bias=0.0):
    kernel = RNG.normal(0, 1 / np.sqrt(27 * cin), (3, 3, 3, cin, cout))
    return {'kernel': kernel, 'bias': RNG.normal(bias, 0.05, cout)}


def detector_layers(enc=(4, 4, 8, 8), add=(8, 8), feat=8):
    chans = [*enc, *add]
    layers, cin = [], 1
    for i, n in enumerate(chans):
        layers.append((keras_name('conv3d', i), conv_weights(cin, n)))
        cin = n
    layers.append((keras_name('conv3d', len(chans)), conv_weights(cin, feat, bias=0.2)))
    return layers


def hyper_layers(hyp=(8, 8, 8, 8), enc=(4, 6, 8), dec=(8, 6, 4), add=(4,)):
    layers, width = [], 1
    for i, n in enumerate(hyp):
        layers.append(
            (
                keras_name('dense', i),
                {'kernel': RNG.normal(0, 1, (width, n)), 'bias': RNG.normal(0.1, 0.1, n)},
            )
        )
        width = n
    chans, skips, cin = [], [], 2
    for n in enc:
        chans.append((cin, n))
        cin = n
        skips.append(n)
    for n in dec:
        chans.append((cin, n))
        cin = n + skips.pop()
    for n in (*add, 3):
        chans.append((cin, n))
        cin = n
    for i, (ci, co) in enumerate(chans):
        scale = 1 / np.sqrt(27 * ci) / np.sqrt(width)
        layers.append((keras_name('hyper_conv_from_dense', i), {
            'hyperkernel_kernel': RNG.normal(0, scale, (width, 27 * ci * co)),
            'hyperkernel_bias': RNG.normal(0, 1 / np.sqrt(27 * ci), 27 * ci * co),
            'hyperbias_kernel': RNG.normal(0, 0.05, (width, co)),
            'hyperbias_bias': RNG.normal(0, 0.05, co),
        }))  # fmt: skip
    return layers


# --------------------------------------------------------------------- numpy reference


def np_conv(x, kernel, bias):
    """'same' 3x3x3 cross-correlation of (X, Y, Z, Cin) with (3, 3, 3, Cin, Cout)."""
    pad = np.pad(x, ((1, 1), (1, 1), (1, 1), (0, 0)))
    win = sliding_window_view(pad, (3, 3, 3), axis=(0, 1, 2))  # (X, Y, Z, Cin, 3, 3, 3)
    return np.einsum('xyzcijk,ijkco->xyzo', win, kernel, optimize=True) + bias


def lrelu(x):
    return np.where(x > 0, x, 0.2 * x)


def maxpool(x):
    a, b, c, ch = x.shape
    return x.reshape(a // 2, 2, b // 2, 2, c // 2, 2, ch).max(axis=(1, 3, 5))


def upsample(x):
    return x.repeat(2, 0).repeat(2, 1).repeat(2, 2)


def np_detector(layers, image, levels=4):
    """VxmAffineFeatureDetector features of one (X, Y, Z) image: (x, y, z, K)."""
    x = image[::2, ::2, ::2, None].astype(np.float64)
    ws = [w for _, w in layers]
    for w in ws[:levels]:
        x = maxpool(lrelu(np_conv(x, w['kernel'], w['bias'])))
    for w in ws[levels:-1]:
        x = lrelu(np_conv(x, w['kernel'], w['bias']))
    return np.maximum(np_conv(x, ws[-1]['kernel'], ws[-1]['bias']), 0)


def np_barycentre(feat, full):
    grids = [(np.arange(n) - (n - 1) / 2) / n for n in feat.shape[:3]]
    grid = np.stack(np.meshgrid(*grids, indexing='ij'), -1)  # (x, y, z, 3)
    mass = feat.sum(axis=(0, 1, 2))  # (K,)
    moment = np.einsum('xyzk,xyzd->kd', feat, grid)
    cen = np.divide(moment, mass[:, None], out=np.zeros_like(moment), where=mass[:, None] != 0)
    return cen * np.asarray(full), mass


def np_fit(source, target, w):
    """vxm.utils.fit_affine: regress source on [target, 1] (maps target to source)."""
    x = np.concatenate((target, np.ones((len(target), 1))), 1)
    xt = x.T * w[None]
    beta = np.linalg.inv(xt @ x) @ xt @ source
    return np.vstack((beta.T, [0, 0, 0, 1]))


def np_affine(layers, moving, fixed, rigid=False, levels=4):
    full = moving.shape
    cen_1, pow_1 = np_barycentre(np_detector(layers, moving, levels), full)
    cen_2, pow_2 = np_barycentre(np_detector(layers, fixed, levels), full)
    w = (pow_1 / pow_1.sum()) * (pow_2 / pow_2.sum())
    aff = 0.5 * (np_fit(cen_1, cen_2, w) + np.linalg.inv(np_fit(cen_2, cen_1, w)))
    if rigid:
        lin = aff[:3, :3]
        assert np.linalg.det(lin) > 0  # the test case; then R = A U^-1 is already orthogonal
        upper = np.linalg.cholesky(lin.T @ lin).T
        aff = aff.copy()
        aff[:3, :3] = lin @ np.linalg.inv(upper)
    centre = np.eye(4)
    centre[:3, 3] = -(np.asarray(full) - 1) / 2
    return np.linalg.inv(centre) @ aff @ centre


def np_hyper_unet(layers, source, target, lam, levels):
    dense = [w for name, w in layers if name.startswith('dense')]
    hyper = [w for name, w in layers if name.startswith('hyper')]
    h = np.array([lam], dtype=np.float64)
    for w in dense:
        h = np.maximum(h @ w['kernel'] + w['bias'], 0)

    def conv(x, w):
        cin, cout = x.shape[-1], w['hyperbias_bias'].shape[0]
        kernel = (h @ w['hyperkernel_kernel'] + w['hyperkernel_bias']).reshape(3, 3, 3, cin, cout)
        return np_conv(x, kernel, h @ w['hyperbias_kernel'] + w['hyperbias_bias'])

    x = np.stack((source[::2, ::2, ::2], target[::2, ::2, ::2]), -1).astype(np.float64)
    skips = []
    for w in hyper[:levels]:
        x = lrelu(conv(x, w))
        skips.append(x)
        x = maxpool(x)
    for w in hyper[levels : 2 * levels]:
        x = lrelu(conv(x, w))
        x = np.concatenate((upsample(x), skips.pop()), -1)
    for w in hyper[2 * levels : -1]:
        x = lrelu(conv(x, w))
    return conv(x, hyper[-1])  # (X/2, Y/2, Z/2, 3)


def blob_image(shape, seed, shift=(0, 0, 0)):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing='ij'), -1)
    img = np.zeros(shape)
    for _ in range(8):
        centre = rng.uniform(0.2, 0.8, 3) * np.array(shape) + np.array(shift)
        width = rng.uniform(0.05, 0.12) * min(shape)
        img += rng.uniform(0.3, 1) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2))
    return img / img.max()


def as_torch(img, dtype=torch.float64):
    return torch.as_tensor(img, dtype=dtype)[None, None]


# ------------------------------------------------------------------------------ tests


@pytest.fixture(scope='module')
def detector_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('keras') / 'synthmorph.affine.test.h5'
    layers = detector_layers()
    write_keras(path, layers, nest='model')
    return path, layers


@pytest.fixture(scope='module')
def pair():
    shape = (128, 128, 128)
    return blob_image(shape, 1), blob_image(shape, 1, shift=(4, -3, 2))


@pytest.mark.parametrize('kind', ['affine', 'rigid'])
def test_detector_matches_numpy_reference(detector_file, pair, kind):
    path, layers = detector_file
    model, card = load_keras_model(path, kind)
    cfg = card['config']
    assert cfg['enc'] == [4, 4, 8, 8] and cfg['add'] == [8, 8] and cfg['num_features'] == 8
    assert cfg['rigid'] is (kind == 'rigid')
    assert card['trained'] is True and card['format'] == 'keras-h5'
    assert card['path'] == str(path) and card['space']['divisor'] == model.multiple == 32
    moving, fixed = pair
    expected = np_affine(layers, moving, fixed, rigid=kind == 'rigid')
    with torch.no_grad():
        got = model.double()(as_torch(moving), as_torch(fixed))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # float32, as used in production: close to the float64 reference
    with torch.no_grad():
        got32 = model.float()(as_torch(moving, torch.float32), as_torch(fixed, torch.float32))
    np.testing.assert_allclose(got32[0].numpy(), expected, atol=2e-3, rtol=0)


def test_detector_levels_override(tmp_path, pair):
    layers = detector_layers(enc=(4, 8, 8), add=(8,), feat=6)
    path = tmp_path / 'three_levels.h5'
    write_keras(path, layers)  # flat layout this time
    model, card = load_keras_model(path, 'affine', levels=3)
    assert card['config']['enc'] == [4, 8, 8] and card['config']['add'] == [8]
    moving, fixed = (img[:64, :64, :64] for img in pair)
    expected = np_affine(layers, moving, fixed, levels=3)
    with torch.no_grad():
        got = model.double()(as_torch(moving), as_torch(fixed))[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.fixture(scope='module')
def hyper_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('keras') / 'synthmorph.deform.test.h5'
    layers = hyper_layers()
    write_keras(path, layers)
    return path, layers


def test_hyper_unet_matches_numpy_reference(hyper_file):
    path, layers = hyper_file
    model, card = load_keras_model(path, 'deform')
    cfg = card['config']
    assert cfg['enc'] == [4, 6, 8] and cfg['dec'] == [8, 6, 4] and cfg['add'] == [4]
    assert cfg['hyper_units'] == [8, 8, 8, 8] and cfg['downsample'] == 'subsample'
    shape = (32, 32, 32)
    source, target = blob_image(shape, 3), blob_image(shape, 4)
    model = model.double()
    for lam in (0.25, 0.8):
        expected = np_hyper_unet(layers, source, target, lam, levels=3)
        with torch.no_grad():
            got = model(as_torch(source), as_torch(target), torch.tensor([[lam]]).double())
        assert got.shape == (1, 3, 16, 16, 16)
        np.testing.assert_allclose(got[0].permute(1, 2, 3, 0).numpy(), expected, atol=1e-5,
                                   rtol=0)  # fmt: skip
        assert np.abs(expected).max() > 0.01  # the comparison is not trivially small


def test_load_model_dispatches_h5(hyper_file, detector_file):
    model, card = weights.load_model(hyper_file[0], 'deform')
    assert card['config']['arch'] == 'HyperUNet' and not model.training
    model, card = weights.load_model(str(detector_file[0]), 'rigid')
    assert card['config']['rigid'] is True
    assert next(model.parameters()).device.type == 'cpu'


def test_keras_layers_and_errors(tmp_path, hyper_file, detector_file):
    shapes = keras_layers(hyper_file[0])
    assert shapes['hyper_conv_from_dense']['hyperkernel_kernel'] == (8, 27 * 2 * 4)
    assert shapes['dense_3']['kernel'] == (8, 8)
    with pytest.raises(WeightsError, match='not a SynthMorph deformable model'):
        load_keras_model(detector_file[0], 'deform')
    with pytest.raises(WeightsError, match='not a SynthMorph affine/rigid model'):
        load_keras_model(hyper_file[0], 'affine')
    # a layer missing in the middle breaks the channel chain
    layers = detector_layers()
    del layers[2]
    path = tmp_path / 'broken.h5'
    write_keras(path, layers)
    with pytest.raises(WeightsError, match='do not form a feature detector'):
        load_keras_model(path, 'affine')
    # a hyper-convolution without its hyperbias
    layers = hyper_layers()
    del layers[-1][1]['hyperbias_kernel']
    write_keras(path, layers)
    with pytest.raises(WeightsError, match='hyperkernel and hyperbias'):
        load_keras_model(path, 'deform')
    bad = tmp_path / 'text.h5'
    bad.write_text('not hdf5')
    with pytest.raises(WeightsError, match='Cannot open'):
        load_keras_model(bad, 'affine')
    with pytest.raises(WeightsError, match='do not exist'):
        load_keras_model(tmp_path / 'absent.h5', 'affine')
