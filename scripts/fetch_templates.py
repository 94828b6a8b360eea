#!/usr/bin/env python
"""Fetch the TemplateFlow templates that the container image bakes in.

Run at image BUILD time, where there is a network (the ``Dockerfile`` does)::

    python scripts/fetch_templates.py --tf-dir /opt/templateflow

The app never downloads at run time: compute nodes have no internet, so every template a
default run needs must already be in ``$TEMPLATEFLOW_HOME``. After fetching, the script prunes
the home (TemplateFlow's zero-byte placeholders and the templates we do not ship) and checks,
offline, that each required file is there and not empty; it exits non-zero otherwise, which
fails the image build. ``--check`` only runs that offline check (no network), e.g. on a home
prepared by hand for a cluster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

#: Template -> the files the app needs: the head T1w it registers to and the brain mask its QC
#: uses, at the resolutions of the app's output spaces (``res-2`` is the default, ``res-1`` the
#: fMRIPrep-style high-resolution choice). Queries use TemplateFlow's entities.
TEMPLATES: dict[str, list[dict]] = {
    name: [
        {'resolution': res, 'suffix': suffix, 'desc': desc}
        for res in (1, 2)
        for suffix, desc in (('T1w', None), ('mask', 'brain'))
    ]
    for name in ('MNI152NLin6Asym', 'MNI152NLin2009cAsym')
}


def expected_files(home: Path, templates: dict[str, list[dict]] = TEMPLATES) -> list[Path]:
    """The paths the required files have in a TemplateFlow home."""
    out = []
    for name, queries in templates.items():
        for q in queries:
            desc = f'_desc-{q["desc"]}' if q['desc'] else ''
            out.append(home / f'tpl-{name}' /
                       f'tpl-{name}_res-{q["resolution"]:02d}{desc}_{q["suffix"]}.nii.gz')
        out.append(home / f'tpl-{name}' / 'template_description.json')
    return out


def missing_files(home: Path, templates: dict[str, list[dict]] = TEMPLATES) -> list[Path]:
    """Required files that are absent or empty (TemplateFlow's placeholders are empty)."""
    return [p for p in expected_files(home, templates)
            if not p.is_file() or p.stat().st_size == 0]


def prune(home: Path, keep: list[str]) -> None:
    """Delete zero-byte placeholders, then empty folders and the templates not in ``keep``."""
    for entry in home.iterdir():
        if entry.is_dir() and entry.name.startswith('tpl-') and entry.name[4:] not in keep:
            shutil.rmtree(entry)
    for path in sorted(home.rglob('*'), reverse=True):
        if path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def fetch(home: Path, templates: dict[str, list[dict]] = TEMPLATES) -> None:
    """Download the required files into ``home`` (needs a network)."""
    os.environ['TEMPLATEFLOW_HOME'] = str(home)
    os.environ['TEMPLATEFLOW_AUTOUPDATE'] = 'off'
    from templateflow import api  # reads TEMPLATEFLOW_HOME when first imported

    for name, queries in templates.items():
        for q in queries:
            api.get(name, extension='.nii.gz', raise_empty=True, **q)
            print(f'fetched {name} {q}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tf-dir', type=Path,
                        default=os.environ.get('TEMPLATEFLOW_HOME') or None,
                        help='TemplateFlow home to fill (default: $TEMPLATEFLOW_HOME)')
    parser.add_argument('--check', action='store_true',
                        help='only check, offline, that the required files are there')
    args = parser.parse_args(argv)
    if args.tf_dir is None:
        parser.error('give --tf-dir or set TEMPLATEFLOW_HOME (refusing to fill ~/.cache)')
    home = args.tf_dir.absolute()
    if not args.check:
        home.mkdir(parents=True, exist_ok=True)
        fetch(home)
        prune(home, keep=list(TEMPLATES))
    missing = missing_files(home)
    if missing:
        print(f'TemplateFlow home <{home}> lacks {len(missing)} required file(s):',
              file=sys.stderr)
        for path in missing:
            print(f'  {path}', file=sys.stderr)
        return 1
    print(f'TemplateFlow home <{home}> holds every required file '
          f'({", ".join(TEMPLATES)}, res-1 and res-2).')
    return 0


if __name__ == '__main__':
    sys.exit(main())
