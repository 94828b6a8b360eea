"""How our processes use CPU threads: OpenMP threads sleep while they wait, unless told not to;
the BIDS-App counts only the CPUs its process may run on and shares them among registrations.

Spinning OpenMP threads (libgomp's default) made a 2-thread registration ten times slower while
another job held one of two cores (benchmarks/README.md, "A busy core"). OpenMP reads its
settings when torch is first imported, so importing the package must set the default before
anything of ours imports torch.
"""

import os
import subprocess
import sys

import pytest

PROBE = (
    'import os, sys, synthmorph_app; '
    "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
)


def _probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    env.update(env_changes)
    result = subprocess.run(
        [sys.executable, '-c', PROBE], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_importing_the_package_makes_openmp_threads_sleep_before_torch_loads():
    assert _probe() == ['PASSIVE', 'False']


def test_a_wait_policy_the_user_set_is_kept():
    assert _probe(OMP_WAIT_POLICY='ACTIVE') == ['ACTIVE', 'False']


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='no CPU affinity masks here')
def test_the_bids_app_counts_the_cpus_its_process_may_run_on():
    """As in a Slurm job given one core of a bigger node: one, not the node's count."""
    code = (
        'import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); '
        'from synthmorph_app.cli.bids import usable_cpus; print(usable_cpus(), os.cpu_count())'
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            check=True)
    usable, total = (int(v) for v in result.stdout.split())
    assert usable == 1 and total >= 1


def test_registrations_share_the_cpus_one_thread_each_when_there_are_enough():
    from synthmorph_app.cli.bids import threads_per_registration

    assert threads_per_registration(2, 2) == 1  # two subjects on 2 cores: side by side
    assert threads_per_registration(64, 1000) == 1
    assert threads_per_registration(8, 3) == 2
    assert threads_per_registration(4, 1) == 4  # one image: all the cores
    assert threads_per_registration(32, 1) == 8  # at most 8
    assert threads_per_registration(2, 0) == 2
