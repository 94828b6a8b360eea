"""Per-image QC of a registration to a template, from :mod:`synthmorph_app.evaluate`.

The same figures as ``synthmorph-app evaluate`` and the benchmarks: MIND-NCC and NCC of the
moved image with the template, the spread of the log Jacobian and the % of folded voxels, all
inside the template's brain mask.
"""

from __future__ import annotations

import numpy as np

from ..evaluate import evaluate

#: The keys of :func:`registration_qc`, in the order the group report shows them.
QC_KEYS = ('mind_ncc', 'ncc', 'logjac_sd', 'folding_pct')


def registration_qc(moved: np.ndarray, template: np.ndarray, mask: np.ndarray,
                    jacobian: np.ndarray | None) -> dict:
    """Per-image QC inside ``mask``: similarity to the template, log-Jacobian spread, folding (%).

    A linear registration (``jacobian`` None) has no spread and no folding.
    """
    result = evaluate(np.asarray(template, dtype=np.float32), np.asarray(moved, dtype=np.float32),
                      jacobian=jacobian, mask=np.asarray(mask, dtype=bool))
    out = {'mind_ncc': round(result.mind_ncc, 5), 'ncc': round(result.ncc, 5)}
    if jacobian is None:
        out.update(logjac_sd=0.0, folding_pct=0.0)
    else:
        out.update(logjac_sd=round(result.logjac_sd, 5), folding_pct=round(result.folding_pct, 5))
    return out
