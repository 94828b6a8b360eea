"""Shared fixtures: where the real data lives, and a quiet, reproducible torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault('NIPYPE_NO_ET', '1')
# The CLIs default to 15 refinement iterations (engine.DEFAULT_REFINE); tests of plumbing
# through the CLIs run the networks only (fast), and the tests of refinement ask for it. The
# API's default is not the environment's: tests calling it say refine= where it matters.
os.environ.setdefault('SYNTHMORPH_REFINE', '0')

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get('SYNTHMORPH_SHARED_DATA', REPO.parent / 'shared' / 'data'))


def pytest_report_header(config):
    state = 'found' if SHARED_DATA.exists() else 'MISSING (tests that need it skip)'
    return f'shared data: {SHARED_DATA} ({state})'


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """The real MRI data beside the repository (``../shared/data``)."""
    if not SHARED_DATA.exists():
        pytest.skip(f'shared data not found at {SHARED_DATA}')
    return SHARED_DATA


@pytest.fixture(autouse=True, scope='session')
def _torch_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
