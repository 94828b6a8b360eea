r"""Pack what ``benchmarks/gpu_check.sh`` needs on a lent GPU machine into ``.gpu/``.

The GPU machine has PyTorch with CUDA but none of our neuroimaging dependencies and no network,
and only the repository travels to it (64 MiB at most). This script, run here, writes:

- ``.gpu/site.tar.gz``: our dependencies that the GPU image lacks (nibabel, nipype, pybids,
  templateflow, niworkflows, nitransforms, voxelmorph, neurite and theirs), unpacked from
  Python 3.12 wheels (``pip download`` for the machine's platform) without their test suites;
- ``.gpu/data/``: the files of ``../shared/data`` the checks read (bert and fsaverage, the
  MNI152NLin6Asym templates, the 2 mm T1w images of ``bids/``, sub-01..12) and the 20
  training label maps already on the 4 mm x 64 training grid (what
  ``synthesis.load_label_maps`` makes of them: about 30 kB each instead of 1.6 MB; loading
  them again gives the same arrays, checked here).

Run from the repository root (``.gpu/`` is ignored through ``.git/info/exclude``)::

    python benchmarks/gpu_prepare.py
    # then, with the device tool: carry [".gpu"], command "bash benchmarks/gpu_check.sh"
    # (STAGES="demo bids" bash benchmarks/gpu_check.sh runs some stages only)

The device tool sends the tracked files too, and the training checkpoints under ``training/``
(about 85 MB) are over its 64 MiB with ``.gpu/`` (about 42 MB) and the rest (about 19 MB).
Take them out of the index for the run, and put them back after it (nothing is deleted)::

    echo /training/ >> .git/info/exclude && git rm -r -q --cached training
    # ... the device run ...
    git reset -q -- training && sed -i '\|^/training/$|d' .git/info/exclude
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import _common as C

#: Our dependencies missing from the GPU image (its KINDS.md package list), pinned as in our
#: test environment. Pure Python unless the machine's Python (3.12) needs a binary wheel.
PACKAGES = (
    'acres==0.5.0', 'bids-validator==1.14.7.post0', 'bidsschematools==2.0.1', 'ci-info==0.4.0',
    'etelemetry==0.3.1', 'frozendict==2.5.1', 'importlib_resources==7.1.0',
    'looseversion==1.3.0', 'neurite==0.3.4', 'nibabel==5.4.2', 'nilearn==0.14.1',
    'nipype==1.11.0', 'nitransforms==25.1.0', 'niworkflows==1.14.5', 'num2words==0.5.14',
    'pathlib_abc==0.5.2', 'platformdirs==4.14.9', 'prov==3.2.3', 'puremagic==1.30',
    'pybids==0.22.0', 'pydot==4.0.1', 'rdflib==7.6.0', 'SQLAlchemy==2.1.9', 'svgutils==0.3.4',
    'templateflow==25.1.2', 'traits==7.3.0', 'transforms3d==0.4.2',
    'universal_pathlib==0.3.10', 'voxelmorph==0.3.4', 'tzdata==2026.6',
)
#: Published as source only: built into wheels here (pure Python).
SOURCE_ONLY = ('docopt==0.6.2', 'pystrum==0.4')
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64',
             'manylinux2014_x86_64', 'manylinux1_x86_64')
SHARED_FILES = (
    'freesurfer/bert/mri/brain.mgz', 'freesurfer/bert/mri/norm.mgz',
    'freesurfer/bert/mri/aseg.mgz', 'freesurfer/fsaverage/mri/brain.mgz',
    'freesurfer/fsaverage/mri/aseg.mgz',
    'templateflow/tpl-MNI152NLin6Asym/template_description.json',
    'templateflow/tpl-MNI152NLin6Asym/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz',
)


def build_site(out: Path, wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, '-m', 'pip']
    for spec in PACKAGES:
        if any(w.name.lower().startswith(spec.split('==')[0].lower().replace('-', '_'))
               for w in wheels.glob('*.whl')):
            continue
        cmd = pip + ['download', '-q', '--no-deps', '--only-binary=:all:', '--python-version',
                     '3.12', '--implementation', 'cp', '-d', str(wheels), spec]
        for plat in PLATFORMS:
            cmd += ['--platform', plat]
        subprocess.run(cmd, check=True)
    for spec in SOURCE_ONLY:
        subprocess.run(pip + ['wheel', '-q', '--no-deps', '-w', str(wheels), spec], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / 'site'
        for whl in sorted(wheels.glob('*.whl')):
            with zipfile.ZipFile(whl) as z:
                z.extractall(site)
        # Test suites and their data are most of nitransforms' and nilearn's wheels.
        for tests in sorted(site.glob('*/**/tests'), key=lambda p: len(p.parts)):
            if tests.is_dir():
                shutil.rmtree(tests, ignore_errors=True)
        with tarfile.open(out, 'w:gz') as tar:
            tar.add(site, arcname='site')


def copy_data(data: Path) -> None:
    import nibabel as nb
    import numpy as np

    from synthmorph_app.engine import synthesis

    for rel in SHARED_FILES:
        dest = data / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(C.DATA / rel, dest)
    bids = data / 'bids'  # the BIDS dataset's T1w images, for the BIDS-App's timing
    for src in [C.DATA / 'bids' / 'dataset_description.json',
                *sorted((C.DATA / 'bids').glob('sub-[0-9]*/anat/sub-*_T1w.nii.gz'))]:
        dest = bids / src.relative_to(C.DATA / 'bids')
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    maps = sorted((C.DATA / 'label_maps').glob('training_seg_*.nii.gz'))
    small = data / 'label_maps'
    small.mkdir(parents=True, exist_ok=True)
    loaded = synthesis.load_label_maps(maps, voxel_size=4.0, shape=64)
    for i, (path, geom) in enumerate(zip(maps, loaded.geometries)):
        labels = loaded.values[loaded.index[i, 0].long()].numpy().astype(np.int16)
        img = nb.Nifti1Image(labels, geom.affine)
        img.set_data_dtype(np.int16)
        nb.save(img, small / path.name)
    again = synthesis.load_label_maps(sorted(small.glob('*.nii.gz')), voxel_size=4.0, shape=64)
    if not (bool((again.index == loaded.index).all())
            and bool((again.values == loaded.values).all())):
        raise SystemExit('the 4 mm label maps do not load back to the same arrays')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=str(REPO / '.gpu'), help='output folder (.gpu)')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    build_site(out / 'site.tar.gz', out / 'wheels')
    copy_data(out / 'data')
    shutil.rmtree(out / 'wheels', ignore_errors=True)
    sizes = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split('\0')
    rest = sum((REPO / f).stat().st_size for f in tracked
               if f and not f.startswith('training/') and (REPO / f).is_file())
    print(f'{out}: {sizes / 2**20:.1f} MiB to carry; the tracked files outside training/: '
          f'{rest / 2**20:.1f} MiB (the device tool sends at most 64 MiB)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
