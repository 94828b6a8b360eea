"""Load the official SynthMorph Keras weights (FreeSurfer 8 ``models/``) with h5py only.

Files: ``synthmorph.affine.2.h5`` and ``synthmorph.rigid.1.h5`` (``VxmAffineFeatureDetector``),
``synthmorph.deform.3.h5`` (the deformable part of ``HyperVxmJoint``). No TensorFlow is needed: the
datasets are read with h5py, the architecture is inferred from their shapes, and the weights are
copied into :class:`~.networks.AffineDetector` or :class:`~.networks.HyperUNet`.

What we checked in the public sources, and what remains an assumption
---------------------------------------------------------------------
Verified in voxelmorph's TF source (``voxelmorph/tf/networks.py``, ``utils``), neurite's
``ne.utils.barycenter`` and FreeSurfer's ``mri_synthmorph/synthmorph/registration.py``:

* ``mri_synthmorph`` builds ``VxmAffineFeatureDetector(in_shape, bidir=True, make_dense=False,
  rigid=<model == 'rigid'>)`` and ``HyperVxmJoint(in_shape, bidir=True, mid_space=True,
  int_steps, skip_affine=<model == 'deform'>)`` with default sizes and ``load_weights`` them.
* Detector: subsample by 2 (samples at ``2 i``), per level conv(3^3, 'same') + LeakyReLU(0.2) +
  max-pool(2); ``add_nf`` convs + LeakyReLU at the coarsest level; a conv to ``num_feat`` maps
  with ReLU. Defaults ``enc_nf = add_nf = [256] * 4``, ``dec_nf = []``, ``num_feat = 64``: 9
  ``conv3d`` layers. Barycentres ``(i - (n - 1) / 2) / n * full_shape`` with divide-no-nan;
  weights ``pow_1 * pow_2`` (each channel's sum over its total); ``fit_affine(cen_1, cen_2, w)``
  maps image-2 (fixed) points to image-1 (moving) points; the result is the arithmetic mean of
  that fit and the inverse of the reverse fit; rigid drops scale and shear by
  ``affine_matrix_to_params`` / ``ParamsToAffineMatrix`` (Cholesky, Euler X-Y-Z); the matrix is
  moved from the centred frame to zero-based indices. All of this is
  :class:`~.networks.AffineDetector` with ``downsample='subsample', symmetrize='mean',
  rigid_method='decompose', ridge=0``.
* Deformable: ``lam -> Dense(32, relu) x 4``; the U-Net on ``concat(moving, fixed)`` at half
  resolution (subsampled), ``enc_nf = dec_nf = add_nf = [256] * 4``, per level
  ``HyperConvFromDense`` + LeakyReLU(0.2) (+ max-pool / + nearest upsampling and
  ``concat([up, skip])``), then a hyper-conv to 3 channels without activation: 4 ``dense`` and
  13 ``hyper_conv_from_dense`` layers; the output is the SVF at half resolution in half-res
  voxels. All of this is :class:`~.networks.HyperUNet` with ``downsample='subsample'``.

A consistency check of both: with the official sizes our :class:`~.networks.HyperUNet` has
877,133,827 parameters (the published 877 M) and our :class:`~.networks.AffineDetector`
12,837,696 (49 MiB in float32, the 51 MB file).

Taken from third-party ports and neurite's documented interface, not from neurite's TF source
itself (which our search index did not hold):

* A ``hyper_conv_from_dense*`` layer holds ``hyperkernel_kernel`` (H, 27 * Cin * Cout),
  ``hyperkernel_bias`` (27 * Cin * Cout), ``hyperbias_kernel`` (H, Cout), ``hyperbias_bias``
  (Cout); the kernel is ``reshape(h @ hyperkernel_kernel + hyperkernel_bias, (3, 3, 3, Cin,
  Cout))`` in C order, i.e. the Keras ``Conv3D`` kernel layout. We identify the four tensors by
  name (``hyperkernel``/``hyperbias`` + ``kernel``/``bias``) and check their shapes.

Assumptions (not verifiable without the real files; each is checked at load time where possible
and fails with a :class:`~synthmorph_app.errors.WeightsError`):

* The files are Keras 2 ``save_weights``/``save`` HDF5: every weight is a dataset whose parent
  group is named after its layer (``.../conv3d_3/kernel:0``), possibly nested in a sub-model
  group. Layers are ordered by their Keras name counter (``conv3d``, ``conv3d_1``, ...), which
  is their creation order; we check that the channel counts chain.
* The number of encoder levels of a detector is not visible in the shapes: we assume the
  official 4 (``levels=`` overrides it). For the U-Net it is inferred (decoder convolutions
  see concatenated channels) and cross-checked against the encoder's skip channels.
* Keras' spatial axes are those of our ``(X, Y, Z)`` array axes (both index the same volume
  array; ``permute(4, 3, 0, 1, 2)`` turns a kernel into torch's layout without flipping).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from ..errors import WeightsError
from .networks import build_model

__all__ = ['keras_layers', 'load_keras_model']

_NAME = re.compile(r'^(?P<base>.+?)(?:_(?P<index>\d+))?$')


def _collect(h5: h5py.File, path: Path) -> dict[str, dict[str, h5py.Dataset]]:
    layers: dict[str, dict[str, h5py.Dataset]] = {}

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split('/')
        if len(parts) < 2:
            return
        layer, weight = parts[-2], parts[-1].split(':')[0]
        if parts[0] == 'optimizer_weights' or parts[-2] == 'vars' or weight.isdigit():
            return  # optimizer state, or the Keras 3 layout (not an official file)
        group = layers.setdefault(layer, {})
        if weight in group:
            raise WeightsError(
                f'<{path}> holds two layers named {layer!r}; not an official SynthMorph file.'
            )
        group[weight] = obj

    # A full-model save keeps the weights under 'model_weights' (and optimizer state apart).
    root = h5['model_weights'] if isinstance(h5.get('model_weights'), h5py.Group) else h5
    root.visititems(visit)
    return layers


def _ordered(layers: dict, base: str) -> list[tuple[str, dict]]:
    """Layers named ``base`` or ``base_<n>``, in Keras creation order."""
    found = []
    for name, weights in layers.items():
        match = _NAME.match(name)
        if match and match['base'] == base:
            found.append((int(match['index'] or 0), name, weights))
    return [(name, weights) for _, name, weights in sorted(found)]


def _array(path: Path, layer: str, weights: dict, key: str, ndim: int) -> np.ndarray:
    if key not in weights:
        raise WeightsError(
            f'Layer {layer!r} of <{path}> lacks its {key!r} weights (has {sorted(weights)}).'
        )
    data = np.asarray(weights[key][()], dtype=np.float32)
    if data.ndim != ndim:
        raise WeightsError(
            f'Layer {layer!r} of <{path}>: {key!r} has shape {data.shape}, expected {ndim} axes.'
        )
    return data


def _conv(path: Path, layer: str, weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _array(path, layer, weights, 'kernel', 5)
    bias = _array(path, layer, weights, 'bias', 1)
    if kernel.shape[:3] != (3, 3, 3) or bias.shape != kernel.shape[-1:]:
        raise WeightsError(
            f'Layer {layer!r} of <{path}> is not a 3x3x3 convolution: kernel {kernel.shape}, '
            f'bias {bias.shape}.'
        )
    return torch.from_numpy(kernel).permute(4, 3, 0, 1, 2).contiguous(), torch.from_numpy(bias)


def _hyper_keys(path: Path, layer: str, weights: dict) -> dict[str, str]:
    keys = {}
    for name in weights:
        low = name.lower()
        part = 'kernel' if 'hyperkernel' in low else 'bias' if 'hyperbias' in low else None
        role = 'w' if low.endswith('kernel') else 'b' if low.endswith('bias') else None
        if part and role:
            keys[f'{part}_{role}'] = name
    if set(keys) != {'kernel_w', 'kernel_b', 'bias_w', 'bias_b'}:
        raise WeightsError(
            f'Hyper-convolution {layer!r} of <{path}> does not hold hyperkernel and hyperbias '
            f'kernels and biases (has {sorted(weights)}).'
        )
    return keys


def _detector(layers: dict, path: Path, kind: str, levels: int | None):
    convs = _ordered(layers, 'conv3d')
    if len(convs) < 2:
        raise WeightsError(
            f'<{path}> holds {len(convs)} conv3d layers: not a SynthMorph affine/rigid model '
            f'(layers: {sorted(layers)[:12]}).'
        )
    tensors = [_conv(path, name, w) for name, w in convs]
    chans = [k.shape[0] for k, _ in tensors]
    for (name, _), (k, _), prev in zip(convs[1:], tensors[1:], chans):
        if k.shape[1] != prev:
            raise WeightsError(
                f'Layer {name!r} of <{path}> takes {k.shape[1]} channels but the layer before '
                f'gives {prev}: the layers do not form a feature detector.'
            )
    levels = 4 if levels is None else int(levels)
    if not 0 < levels < len(tensors):
        raise WeightsError(
            f'<{path}>: cannot split {len(tensors)} convolutions into {levels} levels.'
        )
    config = {
        'arch': 'AffineDetector',
        'in_channels': int(tensors[0][0].shape[1]),
        'enc': chans[:levels],
        'dec': [],
        'add': chans[levels:-1],
        'num_features': chans[-1],
        'downsample': 'subsample',
        'feature_activation': 'relu',
        'rigid': kind == 'rigid',
        'rigid_method': 'decompose',
        'symmetrize': 'mean',
        'ridge': 0.0,
    }
    names = [f'core.enc.{i}' for i in range(levels)]
    names += [f'core.add.{i}' for i in range(len(tensors) - 1 - levels)] + ['head']
    state = {}
    for name, (kernel, bias) in zip(names, tensors):
        state[f'{name}.weight'] = kernel
        state[f'{name}.bias'] = bias
    return config, state


def _hyper_unet(layers: dict, path: Path):
    dense = _ordered(layers, 'dense')
    hyper = _ordered(layers, 'hyper_conv_from_dense')
    if not dense or len(hyper) < 2:
        raise WeightsError(
            f'<{path}> holds {len(dense)} dense and {len(hyper)} hyper_conv_from_dense layers: '
            f'not a SynthMorph deformable model (layers: {sorted(layers)[:12]}).'
        )
    state = {}
    units = []
    width = None
    for i, (name, w) in enumerate(dense):
        kernel = _array(path, name, w, 'kernel', 2)
        bias = _array(path, name, w, 'bias', 1)
        if width is not None and kernel.shape[0] != width:
            raise WeightsError(
                f'Dense layer {name!r} of <{path}> does not follow the previous one.'
            )
        width = kernel.shape[1]
        units.append(int(width))
        state[f'hyper.{2 * i}.weight'] = torch.from_numpy(kernel.T.copy())
        state[f'hyper.{2 * i}.bias'] = torch.from_numpy(bias)
    inputs = int(_array(path, dense[0][0], dense[0][1], 'kernel', 2).shape[0])

    shapes = []  # (cin, cout) of each hyper-convolution
    arrays = []
    for name, w in hyper:
        keys = _hyper_keys(path, name, w)
        kw = _array(path, name, w, keys['kernel_w'], 2)
        kb = _array(path, name, w, keys['kernel_b'], 1)
        bw = _array(path, name, w, keys['bias_w'], 2)
        bb = _array(path, name, w, keys['bias_b'], 1)
        cout = bw.shape[1]
        cin = kw.shape[1] // (27 * cout) if cout else 0
        if (
            kw.shape[0] != width
            or bw.shape[0] != width
            or kw.shape[1] != 27 * cin * cout
            or kb.shape != (kw.shape[1],)
            or bb.shape != (cout,)
            or cin == 0
        ):
            raise WeightsError(
                f'Hyper-convolution {name!r} of <{path}> has inconsistent shapes: hyperkernel '
                f'{kw.shape} + {kb.shape}, hyperbias {bw.shape} + {bb.shape}, hypernetwork '
                f'width {width}.'
            )
        shapes.append((cin, cout))
        arrays.append((kw, kb, bw, bb))

    # Decoder convolutions (after the first) and the first extra convolution see concatenated
    # channels: each of those breaks the chain cin == previous cout, once per level.
    breaks = [i for i in range(1, len(shapes)) if shapes[i][0] != shapes[i - 1][1]]
    levels = len(breaks)
    enc = [c for _, c in shapes[:levels]]
    dec = [c for _, c in shapes[levels : 2 * levels]]
    add = [c for _, c in shapes[2 * levels : -1]]
    ok = levels > 0 and len(shapes) >= 2 * levels + 1 and shapes[-1][1] == 3
    if ok:
        expect = [shapes[0][0]] + enc[:-1]  # encoder chain
        ok = [cin for cin, _ in shapes[:levels]] == expect
        skips = list(enc)
        ch = enc[-1]
        for i, n in enumerate(dec + add + [3]):
            ok = ok and shapes[levels + i][0] == ch
            ch = n + skips.pop() if i < levels else n
    if not ok or shapes[0][0] % 2:
        raise WeightsError(
            f'<{path}>: the hyper-convolutions (in, out channels {shapes}) do not form the '
            'SynthMorph U-Net (encoder, decoder with skips, extra convolutions, 3 outputs).'
        )
    config = {
        'arch': 'HyperUNet',
        'in_channels': shapes[0][0] // 2,
        'enc': enc,
        'dec': dec,
        'add': add,
        'hyper_units': units,
        'hyper_activation': 'relu',
        'hyper_inputs': inputs,
        'downsample': 'subsample',
        'final_init_std': 1e-5,
    }
    names = [f'core.enc.{i}' for i in range(levels)] + [f'core.dec.{i}' for i in range(levels)]
    names += [f'core.add.{i}' for i in range(len(add))] + ['flow']
    for name, (cin, cout), (kw, kb, bw, bb) in zip(names, shapes, arrays):
        h = kw.shape[0]
        kernel = torch.from_numpy(kw).view(h, 3, 3, 3, cin, cout).permute(5, 4, 1, 2, 3, 0)
        state[f'{name}.kernel_map.weight'] = kernel.reshape(-1, h).contiguous()
        bias = torch.from_numpy(kb).view(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2)
        state[f'{name}.kernel_map.bias'] = bias.reshape(-1).contiguous()
        state[f'{name}.bias_map.weight'] = torch.from_numpy(bw.T.copy())
        state[f'{name}.bias_map.bias'] = torch.from_numpy(bb)
        del kw, kb
    return config, state


def load_keras_model(
    path: str | Path, kind: str, levels: int | None = None
) -> tuple[nn.Module, dict]:
    """Build our network from an official SynthMorph Keras ``.h5`` file.

    Parameters
    ----------
    path : str or Path
        ``synthmorph.affine.2.h5``, ``synthmorph.rigid.1.h5`` or ``synthmorph.deform.3.h5``
        (or a file with the same layer layout and other sizes).
    kind : {'affine', 'rigid', 'deform'}
        'affine' and 'rigid' read the ``conv3d*`` layers into an
        :class:`~.networks.AffineDetector` (rigid: scale and shear dropped as the official
        model does); 'deform' reads the ``dense*`` and ``hyper_conv_from_dense*`` layers into a
        :class:`~.networks.HyperUNet` (other layers are ignored).
    levels : int, optional
        Encoder levels of a detector (default 4, the official value; not visible in the file).

    Returns
    -------
    model : nn.Module
        On the CPU, eval mode. The model is first built on the ``meta`` device and the file's
        tensors assigned to it, so the 3.5 GB deformable model is held once, not twice.
    card : dict
        Made up from the file: ``format: 'keras-h5'``, ``name`` (file stem), ``kind``, ``arch``,
        ``config``, ``space`` (1 mm, 256^3, the divisor: ``mri_synthmorph``'s network space),
        ``trained: True``, ``path``, ``parameters``, ``size_bytes``.
    """
    path = Path(path)
    if kind not in ('affine', 'rigid', 'deform'):
        raise ValueError(f"kind must be 'affine', 'rigid' or 'deform', got {kind!r}")
    if not path.is_file():
        raise WeightsError(f'The Keras weights <{path}> do not exist.')
    try:
        h5 = h5py.File(path, 'r')
    except OSError as err:
        raise WeightsError(
            f'Cannot open <{path}> as HDF5 ({err}); is it a Keras .h5 file?'
        ) from err
    with h5:
        layers = _collect(h5, path)
        if kind == 'deform':
            config, state = _hyper_unet(layers, path)
        else:
            config, state = _detector(layers, path, kind, levels)
    with torch.device('meta'):
        model = build_model(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise WeightsError(f'The layers of <{path}> do not fit the network: {err}') from err
    model.eval()
    card = {
        'format': 'keras-h5',
        'name': path.stem,
        'kind': kind,
        'arch': config['arch'],
        'config': config,
        'space': {'voxel_size': 1.0, 'shape': [256, 256, 256], 'divisor': model.multiple},
        'trained': True,
        'path': str(path),
        'parameters': int(sum(p.numel() for p in model.parameters())),
        'size_bytes': path.stat().st_size,
    }
    return model, card


def keras_layers(path: str | Path) -> dict[str, dict[str, tuple]]:
    """Layer name -> ``{weight name: shape}`` of a Keras HDF5 file, for inspection.

    Weight names drop the ``:0`` suffix; nested sub-model groups are flattened.
    """
    path = Path(path)
    with h5py.File(path, 'r') as h5:
        return {
            layer: {k: tuple(d.shape) for k, d in weights.items()}
            for layer, weights in _collect(h5, path).items()
        }
