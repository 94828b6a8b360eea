"""Weights I/O: packaged models, model cards, strict loading, checksums, name lookup."""

from __future__ import annotations

import json

import pytest
import torch

from synthmorph_app.engine import weights
from synthmorph_app.engine.networks import AffineDetector, HyperUNet, build_model
from synthmorph_app.errors import WeightsError

SMALL_AFFINE = {'arch': 'AffineDetector', 'enc': [4, 8], 'add': [8], 'num_features': 8}
SMALL_DEFORM = {'arch': 'HyperUNet', 'enc': [4, 4], 'dec': [4, 4], 'add': [4],
                'hyper_units': [4]}  # fmt: skip


#: packaged models that are trained (docs/model_cards.md); any other would be a random placeholder
TRAINED = {'affine', 'rigid', 'deform'}


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    monkeypatch.delenv(weights.ENV_DIR, raising=False)


def saved(tmp_path, config=SMALL_AFFINE, name='model', extra=None):
    model = weights.init_untrained('affine', seed=3, config=config)
    pt, card = weights.save_model(model, tmp_path / name, extra)
    return model, pt, card


@pytest.mark.parametrize('kind', weights.KINDS)
def test_packaged_defaults_load(kind):
    model, card = weights.load_model(weights.DEFAULT_MODELS[kind], kind)
    assert card['trained'] is (kind in TRAINED)
    if card['trained']:  # a trained card says how and how well (held-out synthetic pairs)
        assert card['training']['steps'] > 0 and card['training']['data']
        assert card['validation']['dice'] > card['validation']['dice_before']
    assert card['kind'] == kind
    assert card['format_version'] == weights.FORMAT_VERSION
    assert not model.training
    assert model.config == card['config']
    expected = HyperUNet if kind == 'deform' else AffineDetector
    assert isinstance(model, expected)
    assert model.config.get('rigid', False) is (kind == 'rigid')
    pt = weights._packaged_dir() / f'{weights.DEFAULT_MODELS[kind]}.pt'
    assert pt.stat().st_size < 5e6  # a few MB at most
    assert card['sha256'] == weights.sha256sum(pt)


@pytest.mark.parametrize('kind', weights.KINDS)
def test_default_spec(kind):
    for spec in (None, 'default'):
        model, card = weights.load_model(spec, kind)
        assert card['name'] == weights.DEFAULT_MODELS[kind]
        assert card['space']['divisor'] == model.multiple
        # trained models work on the grid they were trained on; placeholders on 2 mm
        assert card['space']['voxel_size'] == (4.0 if card['trained'] else 2.0)


def test_list_models_lists_packaged_defaults():
    names = {m['name']: m for m in weights.list_models()}
    for kind, name in weights.DEFAULT_MODELS.items():
        assert names[name]['kind'] == kind
        assert names[name]['source'] == 'package'
        assert names[name]['trained'] is (kind in TRAINED)


def test_save_load_round_trip(tmp_path):
    model, pt, card_path = saved(tmp_path, extra={'trained': True, 'training': {'steps': 5}})
    assert pt.name == 'model.pt' and card_path.name == 'model.json'
    card = json.loads(card_path.read_text())
    assert card['trained'] is True and card['training'] == {'steps': 5}
    assert card['parameters'] == sum(p.numel() for p in model.parameters())
    assert card['arch'] == 'AffineDetector'
    assert card['space'] == {'voxel_size': 2.0, 'shape': [128] * 3, 'divisor': model.multiple}
    for spec in (pt, card_path, tmp_path / 'model', str(pt)):
        loaded, got = weights.load_model(spec, 'affine')
        assert got.pop('path') == str(pt)
        assert got == card
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, x.flip(2)), model.eval()(x, x.flip(2)))


def test_init_untrained_is_reproducible_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = weights.init_untrained('deform', seed=1, config=SMALL_DEFORM)
    b = weights.init_untrained('deform', seed=1, config=SMALL_DEFORM)
    c = weights.init_untrained('deform', seed=2, config=SMALL_DEFORM)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_strict_loading_catches_missing_key(tmp_path):
    _, pt, card_path = saved(tmp_path)
    state = torch.load(pt, weights_only=True)
    del state['head.bias']
    torch.save(state, pt)
    card = json.loads(card_path.read_text())
    card['sha256'] = weights.sha256sum(pt)
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=r'head\.bias') as err:
        weights.load_model(pt, 'affine')
    assert f'<{pt}>' in str(err.value)


def test_strict_loading_catches_wrong_shape(tmp_path):
    _, pt, card_path = saved(tmp_path)
    card = json.loads(card_path.read_text())
    card['config']['num_features'] = 4
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match='do not fit'):
        weights.load_model(pt, 'affine')


def test_sha256_mismatch(tmp_path):
    _, pt, _ = saved(tmp_path)
    data = bytearray(pt.read_bytes())
    data[-100] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match='sha256') as err:
        weights.load_model(pt, 'affine')
    assert f'<{pt}>' in str(err.value)


def test_wrong_kind(tmp_path):
    _, pt, _ = saved(tmp_path)
    with pytest.raises(WeightsError, match="'affine' model, but a 'deform'"):
        weights.load_model(pt, 'deform')
    with pytest.raises(WeightsError, match="'rigid'"):
        weights.load_model(pt, 'rigid')
    with pytest.raises(ValueError, match='kind'):
        weights.load_model(pt, 'joint')


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(WeightsError, match='No model named'):
        weights.load_model('no-such-model', 'affine')
    missing = tmp_path / 'absent.pt'
    with pytest.raises(WeightsError, match=f'<{tmp_path / "absent.json"}>'):
        weights.load_model(missing, 'affine')
    _, pt, card_path = saved(tmp_path)
    pt.unlink()
    with pytest.raises(WeightsError, match='missing'):
        weights.load_model(card_path, 'affine')
    card_path.write_text('{not json')
    with pytest.raises(WeightsError, match='Cannot read the model card'):
        weights.load_model(card_path, 'affine')
    card_path.write_text(json.dumps({'format': 'something else'}))
    with pytest.raises(WeightsError, match='not a synthmorph-app model card'):
        weights.load_model(card_path, 'affine')
    card_path.write_text(json.dumps({'format': weights.FORMAT, 'format_version': 99}))
    with pytest.raises(WeightsError, match='upgrade'):
        weights.load_model(card_path, 'affine')


def test_not_a_state_dict(tmp_path):
    _, pt, card_path = saved(tmp_path)
    pt.write_bytes(b'garbage')
    card = json.loads(card_path.read_text())
    card['sha256'] = weights.sha256sum(pt)
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match='Cannot read the weights'):
        weights.load_model(pt, 'affine')


def test_env_dir_names(tmp_path, monkeypatch):
    model = build_model(SMALL_DEFORM)
    weights.save_model(model, tmp_path / 'mine', {'trained': True})
    weights.save_model(build_model(SMALL_AFFINE), tmp_path / 'affine')  # overrides the package
    monkeypatch.setenv(weights.ENV_DIR, str(tmp_path))
    names = {m['name']: m for m in weights.list_models()}
    assert names['mine']['source'] == 'env' and names['mine']['kind'] == 'deform'
    assert names['affine']['source'] == 'env'
    assert names['deform']['source'] == 'package'
    loaded, card = weights.load_model('mine', 'deform')
    assert card['trained'] is True and loaded.config == model.config
    loaded, _ = weights.load_model('affine', 'affine')
    assert loaded.config['enc'] == SMALL_AFFINE['enc']
