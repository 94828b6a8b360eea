"""Training: the loss falls on a fixed batch, resuming repeats the next step exactly, the CLI."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from synthmorph_app.cli import train as cli
from synthmorph_app.engine import losses as L
from synthmorph_app.engine.synthesis import LabelMaps
from synthmorph_app.engine.training import TrainConfig, Trainer
from synthmorph_app.engine.weights import load_model
from synthmorph_app.errors import WeightsError
from synthmorph_app.io.images import Geometry

torch.manual_seed(0)
SHAPE = 24
#: Tiny networks: the tests check the machinery, not the accuracy.
TINY_AFFINE = {'enc': [4, 8], 'add': [8], 'num_features': 8}
TINY_DEFORM = {'enc': [4, 4], 'dec': [4, 4], 'add': [4], 'hyper_units': [8, 4],
               'final_init_std': 1e-2, 'cost_volume': 0}
#: Milder spatial augmentation: a tiny network and a few steps.
MILD = {'rotate': 10.0, 'shift': 10.0, 'crop_probability': 0.0}


def _blob_maps(count=2, shape=(SHAPE,) * 3, seed=0) -> LabelMaps:
    """Label maps of boxes of brain labels (different sizes per map) inside a 'skull'."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([0, 2, 3, 4, 7, 8, 10, 11, 12, 507])
    index = torch.full((count, 1, *shape), 9, dtype=torch.uint8)
    index[..., :2, :, :] = 0
    for m in range(count):
        jitter = torch.randint(-1, 2, (3,), generator=gen).tolist()
        cuts = [[s // 4 + jitter[a], s // 2 + jitter[a], 3 * s // 4] for a, s in enumerate(shape)]
        label = 1
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    index[m, 0, cuts[0][i]:cuts[0][i + 1], cuts[1][j]:cuts[1][j + 1],
                          cuts[2][k]:cuts[2][k + 1]] = label
                    label += 1
    geom = Geometry(shape, np.diag([8.0, 8.0, 8.0, 1.0]))
    return LabelMaps(index, values, [geom] * count, [f'blobs{m}' for m in range(count)],
                     torch.eye(4, dtype=torch.float64).repeat(count, 1, 1), 8.0)


def _config(tmp_path, task, **kw):
    base = {'task': task, 'label_maps': str(tmp_path), 'out': str(tmp_path / 'out'),
            'steps': 3, 'voxel_size': 8.0, 'shape': SHAPE, 'checkpoint_every': 0,
            'validate_every': 0, 'validation_pairs': 2, 'affine_model': TINY_AFFINE,
            'deform_model': TINY_DEFORM, 'synthesis': MILD, 'seed': 1, 'lr': 1e-2}
    base.update(kw)
    return TrainConfig(**base)


def _trainer(tmp_path, task, **kw):
    return Trainer(_config(tmp_path, task, **kw), _blob_maps(), _blob_maps(1, seed=3))


def test_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match='task'):
        _config(tmp_path, 'nope')
    with pytest.raises(ValueError, match='arch'):
        _config(tmp_path, 'affine', arch='resnet')
    with pytest.raises(ValueError, match='batch_size'):
        _config(tmp_path, 'affine', batch_size=0)
    with pytest.raises(ValueError, match='overlap'):
        _config(tmp_path, 'deform', overlap='ncc')
    with pytest.raises(ValueError, match='loss_grid'):
        _config(tmp_path, 'deform', loss_grid='quarter')
    with pytest.raises(ValueError, match='smooth_weight'):
        _config(tmp_path, 'deform', smooth_weight=-1)
    cfg = _config(tmp_path, 'joint')
    assert cfg.kinds == ('affine', 'deform')
    assert TrainConfig.from_dict({**cfg.to_dict(), 'unknown': 1}) == cfg
    with pytest.raises(ValueError, match='divisible'):
        _trainer(tmp_path, 'deform', deform_model={**TINY_DEFORM, 'enc': [4] * 5,
                                                   'dec': [4] * 5})


@pytest.mark.parametrize('task, options', [
    ('affine', {}),
    ('deform', {}),
    ('deform', {'overlap': 'dice', 'overlap_weight': 1.0, 'loss_grid': 'full'}),
    ('deform', {'overlap': 'dice', 'overlap_weight': 1.0, 'loss_grid': 'full',
                'deform_model': {**TINY_DEFORM, 'cost_volume': 1}, 'lr': 1e-3}),
])
def test_steps_decrease_the_loss_on_a_fixed_batch(tmp_path, task, options):
    trainer = _trainer(tmp_path, task, **options)
    pair = trainer.synthesize(0)
    lam = torch.full((1, 1), 0.2) if task == 'deform' else None
    if task == 'deform':
        # The prealigned pairs of these tiny maps hold little to fix on a 12^3 loss grid; move
        # the fixed image by 2 voxels so there is a real (known) misalignment to learn.
        def shift(t):
            return torch.roll(t, 2, dims=2)

        pair = dataclasses.replace(pair, moving=shift(pair.fixed),
                                   moving_seg=shift(pair.fixed_seg),
                                   moving_labels=shift(pair.fixed_labels))

    def loss():
        with torch.no_grad():
            return float(trainer.losses(pair, lam)['loss'].mean())

    before = loss()
    after = []
    for step in range(24):
        row = trainer.train_step(pair, step)
        if step >= 11 and step % 4 == 3:
            after.append(loss())
    assert row['step'] == 24 and np.isfinite(row['loss'])
    # each step draws its own lambda, so the loss at lambda 0.2 wanders: its best of the
    # last evaluations must be well below the start
    assert min(after) < 0.9 * before


def test_full_loss_grid_pulls_the_working_grid_labels(tmp_path):
    """On the full grid, the loss maps are the working grid's and a zero field leaves them."""
    half = _trainer(tmp_path / 'h', 'deform', overlap='dice', overlap_weight=1.0)
    full = _trainer(tmp_path / 'f', 'deform', overlap='dice', overlap_weight=1.0,
                    loss_grid='full')
    pair = full.synthesize(0)
    seg_m, seg_f = full.loss_maps(pair)
    assert seg_f.shape[2:] == (SHAPE,) * 3
    assert half.loss_maps(pair)[1].shape[2:] == (SHAPE // 2,) * 3
    zero = torch.zeros(1, 3, SHAPE // 2, SHAPE // 2, SHAPE // 2)
    lam = torch.zeros(1, 1)
    _, overlap, smooth = full.deform_terms(seg_m, seg_f, zero, lam)
    torch.testing.assert_close(overlap, L.overlap_dice(seg_m, seg_f))
    assert float(smooth) == 0.0
    # A uniform shift of one half-grid voxel moves the full-grid labels by two voxels.
    shift = zero.clone()
    shift[:, 0] = 1.0
    _, shifted, _ = full.deform_terms(seg_m, seg_f, shift, lam)
    rolled = torch.roll(seg_m, -2, dims=2)
    rolled[:, :, -2:] = seg_m[:, :, -1:]
    torch.testing.assert_close(shifted, L.overlap_dice(rolled, seg_f))


def _names(pair):
    info = pair.info[0] if isinstance(pair.info, list) else pair.info
    return info['fixed'], info['moving']


def test_validation_keeps_the_tasks_own_pairs(tmp_path):
    """A run that trains on other pairs (one map, larger warps) validates on the task's own."""
    plain = Trainer(_config(tmp_path / 'p', 'deform', validation_pairs=3), _blob_maps(),
                    _blob_maps(2, seed=3))
    same = Trainer(_config(tmp_path / 's', 'deform', validation_pairs=3,
                           synthesis={**MILD, 'same_map_probability': 1.0,
                                      'warp_std': [0.0, 8.0]}),
                   _blob_maps(), _blob_maps(2, seed=3))
    assert same.settings.same_map_probability == 1.0
    assert same.validation_settings().same_map_probability == 0.0
    assert same.validation_settings() == plain.validation_settings()
    # training pairs come from one map, validation pairs are those of the plain run
    fixed, moving = _names(same.synthesize(0))
    assert fixed == moving
    pairs = list(zip(plain.validation_pairs(), same.validation_pairs()))
    assert any(_names(a)[0] != _names(a)[1] for a, _ in pairs)
    for a, b in pairs:
        assert _names(a) == _names(b)
        assert torch.equal(a.fixed_labels, b.fixed_labels)
        assert torch.equal(a.moving_labels, b.moving_labels)


def test_joint_and_rigid_steps_run(tmp_path):
    for task in ('joint', 'rigid'):
        trainer = _trainer(tmp_path, task)
        row = trainer.train_step(trainer.synthesize(0), 0)
        assert np.isfinite(row['loss']) and row['step'] == 1
        grads = [p.grad for m in trainer.models.values() for p in m.parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    # Joint: gradients reach both networks.
    for model in trainer.models.values():
        assert any(p.grad is not None for p in model.parameters())


def test_resume_repeats_the_next_step_exactly(tmp_path):
    kw = {'steps': 3, 'validation_pairs': 1}
    straight = _trainer(tmp_path / 'a', 'deform', **kw)
    straight.fit()
    first = _trainer(tmp_path / 'b', 'deform', **{**kw, 'steps': 2})
    first.fit()
    assert (tmp_path / 'b' / 'out' / 'checkpoint.pt').exists()
    resumed = _trainer(tmp_path / 'b', 'deform', **kw)
    summary = resumed.fit(resume=True)
    assert summary['start_step'] == 2 and summary['step'] == 3
    for key, value in straight.models['deform'].state_dict().items():
        assert torch.equal(value, resumed.models['deform'].state_dict()[key]), key
    # the exported card says how the velocity was formed in training (symmetric by default)
    _, card = load_model(tmp_path / 'b' / 'out' / 'deform.pt', 'deform')
    assert card['training']['symmetric'] is True
    assert card['training']['loss'] == {'overlap': 'mse', 'overlap_weight': 10.0,
                                        'smooth_weight': 1.0}
    rows = {}
    for run in ('a', 'b'):
        with open(tmp_path / run / 'out' / 'train_log.csv') as fobj:
            rows[run] = list(csv.DictReader(fobj))
    assert [r['step'] for r in rows['b']] == ['1', '2', '3']
    assert rows['a'][2]['loss'] == rows['b'][2]['loss']
    with pytest.raises(FileExistsError, match='--resume'):
        _trainer(tmp_path / 'b', 'deform', steps=4).fit()


def test_resume_takes_the_runs_learning_rate(tmp_path):
    first = _trainer(tmp_path, 'affine', steps=1, validation_pairs=1)
    first.fit()
    lower = _trainer(tmp_path, 'affine', steps=2, validation_pairs=1, lr=2.5e-5)
    lower.fit(resume=True)
    assert [g['lr'] for g in lower.optimizer.param_groups] == [2.5e-5]
    with open(tmp_path / 'out' / 'train_log.csv') as fobj:
        rows = list(csv.DictReader(fobj))
    assert [float(r['lr']) for r in rows] == [1e-2, 2.5e-5]  # the first run's, then ours
    # another loss is not a resume: refused, naming what differs, the run's files untouched
    other = _trainer(tmp_path, 'affine', steps=3, validation_pairs=1, overlap_weight=1.0)
    with pytest.raises(ValueError, match="overlap_weight: 10.0 there, 1.0 here"):
        other.fit(resume=True)
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['overlap_weight'] == 10.0


@pytest.mark.parametrize('task, key', [('affine', 'init'), ('deform', 'hidden_init')])
def test_resume_a_checkpoint_written_before_the_init_option(tmp_path, task, key):
    """Checkpoints from before ``init``/``hidden_init`` resume, and record their 'torch' start;
    a real change of the network still refuses to resume."""
    first = _trainer(tmp_path, task, steps=1)
    first.fit()
    path = tmp_path / 'out' / 'checkpoint.pt'
    state = torch.load(path, weights_only=True)
    kind = first.config.kinds[0]
    assert state['model_configs'][kind][key] == 'he'
    del state['model_configs'][kind][key]
    torch.save(state, path)
    resumed = _trainer(tmp_path, task, steps=2)
    assert resumed.fit(resume=True)['step'] == 2
    assert resumed.models[kind].config[key] == 'torch'
    assert torch.load(path, weights_only=True)['model_configs'][kind][key] == 'torch'
    state['model_configs'][kind]['enc'] = [2, 2]
    torch.save(state, path)
    with pytest.raises(ValueError, match='different'):
        _trainer(tmp_path, task, steps=3).fit(resume=True)


#: Tiny encoder and decomposer (a 24^3 grid takes two levels), without the settings that
#: ARCH_DEFAULTS adds to fresh runs.
TINY_ARCHS = {'encoder': ({'enc': [4, 8]}, 'pool_grid', 4, 2),
              'decomposer': ({'enc': [4, 8], 'dec': [8], 'add': [4]}, 'cost_volume', 1, 2)}


@pytest.mark.parametrize('arch', sorted(TINY_ARCHS))
def test_fresh_arch_runs_take_the_settings_that_learn_and_old_checkpoints_resume(tmp_path, arch):
    """A fresh encoder run pools on a 4^3 grid, a decomposer run reads the cost volume; a
    checkpoint from before (its network without the key) resumes with its own network, while a
    run that asks for another value of the key is refused."""
    tiny, key, default, other = TINY_ARCHS[arch]
    fresh = _trainer(tmp_path / 'fresh', 'affine', arch=arch, affine_model=tiny, steps=1)
    assert fresh.models['affine'].config[key] == default
    # an earlier run: the class default (no key in the network's config)
    old = _trainer(tmp_path, 'affine', arch=arch, steps=1,
                   affine_model={**tiny, key: 0 if key == 'cost_volume' else 1})
    old.fit()
    saved = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)
    assert key not in saved['model_configs']['affine']
    resumed = _trainer(tmp_path, 'affine', arch=arch, affine_model=tiny, steps=2)
    assert resumed.fit(resume=True)['step'] == 2
    assert key not in resumed.models['affine'].config
    # the optimiser steps the resumed network's parameters, not the discarded default's
    model_params = {id(p) for p in resumed.models['affine'].parameters()}
    assert {id(p) for g in resumed.optimizer.param_groups for p in g['params']} == model_params
    _, card = load_model(tmp_path / 'out' / 'affine.pt', 'affine')
    assert key not in card['config']
    with pytest.raises(ValueError, match=f"differ in \\['{key}'\\]"):
        _trainer(tmp_path, 'affine', arch=arch, affine_model={**tiny, key: other},
                 steps=3).fit(resume=True)
    with pytest.raises(ValueError, match=f"arch: '{arch}' there, 'detector' here"):
        _trainer(tmp_path, 'affine', arch='detector', affine_model=TINY_AFFINE,
                 steps=3).fit(resume=True)


def test_validation_and_exported_models(tmp_path):
    trainer = _trainer(tmp_path, 'affine', steps=2)
    summary = trainer.fit()
    val = summary['validation']
    assert val['pairs'] == 2 and 0 <= val['dice'] <= 1 and 0 <= val['dice_before'] <= 1
    model, card = load_model(tmp_path / 'out' / 'affine.pt', 'affine')
    assert card['trained'] is True and card['training']['steps'] == 2
    assert card['space'] == {'voxel_size': 8.0, 'shape': [SHAPE] * 3, 'divisor': model.multiple}
    assert card['validation']['dice'] == val['dice']
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['task'] == 'affine' and config['seed'] == 1
    # Predicted coordinates pull the moving labels; identity before training would be the grid.
    pair = trainer.synthesize(5)
    coords = trainer.predict_coords(pair)
    assert coords.shape == (1, 3, SHAPE, SHAPE, SHAPE) and torch.isfinite(coords).all()
    assert float(torch.nanmean(L.dice(pair.fixed_labels, pair.fixed_labels, [2, 3]))) == 1.0


def test_rigid_run_starts_from_an_affine_model(tmp_path):
    """``init_affine`` of a rigid run may name an affine model: its network and weights, with
    the rigid fit; a deformable model is still refused."""
    _trainer(tmp_path / 'a', 'affine', steps=1).fit()
    affine_pt = tmp_path / 'a' / 'out' / 'affine.pt'
    affine, _ = load_model(affine_pt, 'affine')
    rigid = _trainer(tmp_path / 'r', 'rigid', init_affine=str(affine_pt)).models['rigid']
    assert rigid.config == {**affine.config, 'rigid': True}
    for key, value in affine.state_dict().items():
        assert torch.equal(value, rigid.state_dict()[key]), key
    _trainer(tmp_path / 'd', 'deform', steps=1).fit()
    with pytest.raises(WeightsError, match='rigid'):
        _trainer(tmp_path / 'x', 'rigid', init_affine=str(tmp_path / 'd' / 'out' / 'deform.pt'))


def test_resumed_run_keeps_its_latest_validation(tmp_path):
    """A resumed run's exported cards carry the held-out figures validated before the resume,
    and a run resumed at its last step does not validate that step again."""
    first = _trainer(tmp_path, 'affine', steps=2, validate_every=2)
    val = first.fit()['validation']
    assert val['step'] == 2
    again = _trainer(tmp_path, 'affine', steps=2, validate_every=2)
    summary = again.fit(resume=True)
    assert summary['validation'] == val
    _, card = load_model(tmp_path / 'out' / 'affine.pt', 'affine')
    assert card['validation'] == val
    with open(tmp_path / 'out' / 'validation.csv') as fobj:
        assert [r['step'] for r in csv.DictReader(fobj)] == ['2']


def test_export_checkpoint_validates_a_run_stopped_between_validations(tmp_path):
    """``Trainer.export_checkpoint`` writes the checkpoint's models without training, validated
    at the checkpoint's step unless that step was validated already, with extra card fields."""
    _trainer(tmp_path, 'affine', steps=3, validate_every=2).fit()
    validation = tmp_path / 'out' / 'validation.csv'
    lines = validation.read_text().splitlines()
    assert [line.split(',')[0] for line in lines[1:]] == ['2', '3']
    validation.write_text('\n'.join(lines[:2]) + '\n')  # as if stopped before validating 3
    (tmp_path / 'out' / 'affine.pt').unlink()
    before = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)
    result = _trainer(tmp_path, 'affine', steps=100).export_checkpoint({'description': 'early'})
    assert result['step'] == 3 and result['validation']['step'] == 3
    after = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)
    assert after['step'] == 3  # no training step, the checkpoint is untouched
    for key, value in before['models']['affine'].items():
        assert torch.equal(value, after['models']['affine'][key]), key
    _, card = load_model(tmp_path / 'out' / 'affine.pt', 'affine')
    assert card['description'] == 'early' and card['training']['steps'] == 3
    assert card['validation'] == result['validation']
    assert [line.split(',')[0] for line in validation.read_text().splitlines()[1:]] == ['2', '3']
    again = _trainer(tmp_path, 'affine', steps=100).export_checkpoint()
    assert again['validation'] == result['validation']  # already validated: no new row
    assert len(validation.read_text().splitlines()) == 3
    with pytest.raises(FileNotFoundError, match='no run to export'):
        _trainer(tmp_path / 'none', 'affine').export_checkpoint()


def _label_dir(shared_data, tmp_path):
    folder = tmp_path / 'maps'
    folder.mkdir()
    for name in ('training_seg_01', 'training_seg_19'):
        os.symlink(shared_data / 'label_maps' / f'{name}.nii.gz', folder / f'{name}.nii.gz')
    return folder


def test_cli_train_stops_on_sigterm_and_resumes(shared_data, tmp_path):
    maps = _label_dir(shared_data, tmp_path)
    out = tmp_path / 'run'
    config = json.dumps({'affine_model': TINY_AFFINE, 'validation_pairs': 1})
    argv = ['train', 'affine', '--label-maps', str(maps), '--out', str(out), '--steps', '100000',
            '--voxel-size', '8', '--shape', '24', '--checkpoint-every', '0',
            '--validate-every', '0', '--threads', '1', '--config', config]
    proc = subprocess.Popen([sys.executable, '-m', 'synthmorph_app.cli.train', *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / 'train_log.csv'
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert 'interrupted' in err
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    stopped = state['step']
    assert 2 <= stopped < 100000
    assert (out / 'affine.pt').exists() and (out / 'affine.json').exists()
    # Resume in-process for one more step.
    argv[argv.index('--steps') + 1] = str(stopped + 1)
    assert cli.main([*argv, '--resume']) == 0
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['step'] == stopped + 1
    with open(out / 'validation.csv') as fobj:
        assert list(csv.DictReader(fobj))[-1]['step'] == str(stopped + 1)


def test_cli_export_only(shared_data, tmp_path, capsys):
    maps = _label_dir(shared_data, tmp_path)
    out = tmp_path / 'run'
    argv = ['train', 'affine', '--label-maps', str(maps), '--out', str(out), '--steps', '1',
            '--voxel-size', '8', '--shape', '24', '--threads', '1',
            '--config', json.dumps({'affine_model': TINY_AFFINE, 'validation_pairs': 1})]
    assert cli.main(argv) == 0
    (out / 'validation.csv').unlink()
    assert cli.main([*argv, '--description', 'x']) == 2  # only with --export-only
    assert cli.main([*argv, '--export-only', '--description', 'a test model']) == 0
    assert 'exported step 1 (validation Dice' in capsys.readouterr().out
    _, card = load_model(out / 'affine.pt', 'affine')
    assert card['description'] == 'a test model' and card['validation']['step'] == 1
    argv[argv.index('--out') + 1] = str(tmp_path / 'none')
    assert cli.main([*argv, '--export-only']) == 1
    assert 'no run to export' in capsys.readouterr().err


def test_cli_synth_writes_pairs_and_a_montage(shared_data, tmp_path):
    maps = _label_dir(shared_data, tmp_path)
    out = tmp_path / 'synth'
    code = cli.main(['synth', '--label-maps', str(maps), '--out', str(out), '-n', '2',
                     '--maps', '1', '--voxel-size', '8', '--shape', '24'])
    assert code == 0
    import nibabel as nb

    img = nb.load(out / 'pair001_moving.nii.gz')
    assert img.shape == (24, 24, 24) and np.allclose(nb.affines.voxel_sizes(img.affine), 8)
    data = np.asanyarray(img.dataobj)
    assert data.min() >= 0 and data.max() <= 1
    assert nb.load(out / 'pair000_fixed_labels.nii.gz').get_data_dtype() == np.int16
    assert (out / 'montage.png').stat().st_size > 1000


def test_cli_label_table_and_intensity_images(shared_data, tmp_path, capsys):
    """Maps of another numbering train with --label-table (recorded in config.json) and are
    refused, naming the option, without it; an MRI image as a label map is refused by
    ``synth`` and ``train`` alike, by name."""
    import nibabel as nb

    maps = tmp_path / 'foreign'
    maps.mkdir()
    # FreeSurfer's maps renumbered (+1000): the same anatomy in a numbering of its own
    for name in ('training_seg_01', 'training_seg_19'):
        img = nb.load(str(shared_data / 'label_maps' / f'{name}.nii.gz'))
        data = np.rint(np.asanyarray(img.dataobj)).astype(np.int32)
        nb.save(nb.Nifti1Image(np.where(data > 0, data + 1000, 0), img.affine),
                str(maps / f'{name}.nii.gz'))
    table = tmp_path / 'table.tsv'
    from importlib import resources

    rows = (resources.files('synthmorph_app') / 'data' / 'labels' / 'freesurfer_groups.tsv'
            ).read_text().splitlines()
    table.write_text('\n'.join([rows[0], *(
        '\t'.join([str(int(r.split('\t')[0]) + 1000 * (r.split('\t')[0] != '0')),
                   *r.split('\t')[1:]]) for r in rows[1:])]) + '\n')
    out = tmp_path / 'run'
    argv = ['train', 'affine', '--label-maps', str(maps), '--out', str(out), '--steps', '1',
            '--voxel-size', '8', '--shape', '24', '--threads', '1',
            '--config', json.dumps({'affine_model': TINY_AFFINE, 'validation_pairs': 1})]
    assert cli.main(argv) == 1
    assert '--label-table' in capsys.readouterr().err and not (out / 'affine.pt').exists()
    assert cli.main([*argv, '--label-table', str(table)]) == 0
    assert json.loads((out / 'config.json').read_text())['label_table'] == str(table)
    images = tmp_path / 'images'
    images.mkdir()
    os.symlink(shared_data / 'bids' / 'sub-01' / 'anat' / 'sub-01_T1w.nii.gz',
               images / 'sub-01_T1w.nii.gz')
    for command in (['synth', '--out', str(tmp_path / 'synth')], ['train', 'affine', '--out',
                                                                    str(tmp_path / 'run2')]):
        assert cli.main([*command, '--label-maps', str(images)]) == 1
        err = capsys.readouterr().err
        assert 'sub-01_T1w.nii.gz' in err and 'not a label map' in err
        assert 'Traceback' not in err


def test_cli_reports_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(['train', 'affine', '--label-maps', str(tmp_path), '--out', str(tmp_path),
                  '--steps', '-1'])
    code = cli.main(['train', 'affine', '--label-maps', str(tmp_path / 'none'), '--out',
                     str(tmp_path / 'o')])
    assert code == 1 and 'does not exist' in capsys.readouterr().err
    code = cli.main(['train', 'affine', '--label-maps', str(tmp_path), '--out',
                     str(tmp_path / 'o'), '--config', '{"no_such_option": 1}'])
    assert code == 2
    code = cli.main(['train', 'deform', '--label-maps', str(tmp_path), '--out',
                     str(tmp_path / 'o'), '--config', '{"init_deform": "x.pt", "lr": 0.1}'])
    err = capsys.readouterr().err
    assert code == 2 and "'init_deform' (--init-deform), 'lr' (--lr)" in err
    code = cli.main(['train', 'deform', '--label-maps', str(tmp_path), '--out',
                     str(tmp_path / 'o'), '--ema', '1.5'])
    assert code == 2 and 'ema must be in [0, 1)' in capsys.readouterr().err


def test_weight_average_is_validated_exported_and_resumed(tmp_path):
    """``ema``: the average follows ``a <- ema a + (1 - ema) w`` after every step; exports and
    validation use it while training goes on with the raw weights; a resume continues it
    exactly, and a checkpoint without one starts it from its weights."""
    kw = {'steps': 2, 'validation_pairs': 1, 'ema': 0.5}
    trainer = _trainer(tmp_path / 'a', 'deform', **kw)
    states = [trainer._weights()['deform']]
    pair = trainer.synthesize(0)
    for step in range(2):
        trainer.train_step(pair, step)
        states.append(trainer._weights()['deform'])
    key = next(k for k, v in states[0].items() if v.is_floating_point())
    expected = 0.25 * states[0][key] + 0.25 * states[1][key] + 0.5 * states[2][key]
    assert not torch.equal(states[2][key], expected)
    assert torch.allclose(trainer.average['deform'][key], expected, atol=1e-6)
    trainer.export_models()
    exported, card = load_model(tmp_path / 'a' / 'out' / 'deform.pt', 'deform')
    assert torch.allclose(exported.state_dict()[key], expected, atol=1e-6)
    assert card['training']['ema'] == 0.5
    assert torch.equal(trainer.models['deform'].state_dict()[key], states[2][key])  # raw back
    with trainer.averaged():
        assert torch.allclose(trainer.models['deform'].state_dict()[key], expected, atol=1e-6)
        averaged_coords = trainer.predict_coords(pair)
    assert not torch.equal(averaged_coords, trainer.predict_coords(pair))

    straight = _trainer(tmp_path / 'b', 'deform', **{**kw, 'steps': 3})
    straight.fit()
    _trainer(tmp_path / 'c', 'deform', **kw).fit()
    resumed = _trainer(tmp_path / 'c', 'deform', **{**kw, 'steps': 3})
    resumed.fit(resume=True)
    for k, v in straight.average['deform'].items():
        assert torch.equal(v, resumed.average['deform'][k]), k
    _trainer(tmp_path / 'd', 'deform', **{**kw, 'ema': 0.0}).fit()  # no average in it
    late = _trainer(tmp_path / 'd', 'deform', **{**kw, 'steps': 2})
    late.load_checkpoint()
    assert torch.equal(late.average['deform'][key], late.models['deform'].state_dict()[key])
    with pytest.raises(ValueError, match='ema'):
        _config(tmp_path, 'deform', ema=1.0)
