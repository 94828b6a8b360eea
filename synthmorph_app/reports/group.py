"""Group level: ``group/qc.tsv`` over every finished registration, and one HTML page.

Outliers are flagged per metric with a robust z-score (``|x - median| / (1.4826 MAD) > 3``)
and, for folding, any value above 0.1 %.
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path

import numpy as np

from ..errors import SynthMorphError
from ..utils.bids import uri_name, write_text_atomic
from .metrics import QC_KEYS

METRICS = (*QC_KEYS, 'time_s')
COLUMNS = ('participant_id', 'image', 'template', 'mode', 'lambda', 'via', *METRICS,
           'warnings', 'outlier')


def collect_qc(out_dir: str | os.PathLike) -> list[dict]:
    """One row per finished image-to-template registration found in ``out_dir``."""
    rows = []
    for side in sorted(Path(out_dir).glob('sub-*/**/anat/*_mode-image_xfm.json')):
        meta = json.loads(side.read_text())
        if meta.get('ToSpace') != meta.get('Template'):
            continue
        qc = meta.get('QC', {})
        src = uri_name(meta['Sources'][0])
        rows.append({
            'participant_id': src.split('_')[0], 'image': src,
            'template': ':'.join([meta['Template'], *(f'{k}-{v}' for k, v in
                                                      meta.get('TemplateSpec', {}).items())]),
            'mode': meta.get('RegistrationMode'), 'lambda': meta.get('Lambda'),
            # the T1w it went through (--via-t1w), if any
            'via': uri_name(meta['Via']['Image'])
            if (meta.get('Via') or {}).get('Image') else None,
            **{key: qc.get(key) for key in QC_KEYS}, 'time_s': meta.get('ElapsedTime'),
            # what the registration logged about these images (sidecar "Warnings")
            'warnings': len(meta.get('Warnings') or []), 'warning_texts': meta.get('Warnings'),
        })
    return rows


def flag_outliers(rows: list[dict]) -> None:
    """Set ``row['outlier']`` to the metrics where the row is an outlier ('' if none)."""
    flags = {id(r): [] for r in rows}
    for metric in METRICS:
        values = np.array([np.nan if r[metric] is None else float(r[metric]) for r in rows])
        ok = np.isfinite(values)
        if ok.sum() >= 3:
            med = np.median(values[ok])
            mad = 1.4826 * np.median(np.abs(values[ok] - med))
            if mad > 0:
                for r, v in zip(rows, values):
                    if np.isfinite(v) and abs(v - med) / mad > 3:
                        flags[id(r)].append(metric)
        if metric == 'folding_pct':
            for r, v in zip(rows, values):
                if np.isfinite(v) and v > 0.1 and metric not in flags[id(r)]:
                    flags[id(r)].append(metric)
    for r in rows:
        r['outlier'] = ','.join(flags[id(r)])


def write_group_report(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``group/qc.tsv`` and ``group/qc.html``; return both paths."""
    out_dir = Path(out_dir)
    rows = collect_qc(out_dir)
    if not rows:
        raise SynthMorphError(
            f'no finished registration in <{out_dir}>: run the participant level first'
        )
    flag_outliers(rows)
    lines = ['\t'.join(COLUMNS)]
    for r in rows:
        lines.append('\t'.join('n/a' if r.get(c) in (None, '') and c != 'outlier' else
                               str(r.get(c, '')) for c in COLUMNS))
    tsv = write_text_atomic(out_dir / 'group' / 'qc.tsv', '\n'.join(lines) + '\n')
    page = [('<!DOCTYPE html><html><head><meta charset="utf-8"><title>synthmorph-app group QC'
            '</title></head><body style="font-family: sans-serif; max-width: 1000px; '
            'margin: auto">'), '<h1>synthmorph-app: group QC</h1>',
            (f'<p>{len(rows)} registrations; outliers (red) have a robust z-score above 3 '
            '(or folding above 0.1 %). Table: <a href="qc.tsv">qc.tsv</a>.</p>')]
    for metric in METRICS:
        page.append(f'<h2>{metric}</h2>' + _strip_plot(rows, metric))
    flagged = [r for r in rows if r['outlier']]
    page.append('<h2>Outliers</h2>' + ('<ul>' + ''.join(
        f'<li>{r["image"]} ({r["template"]}): {r["outlier"]}</li>' for r in flagged) + '</ul>'
        if flagged else '<p>None.</p>'))
    warned = [r for r in rows if r['warnings']]
    page.append('<h2>Warnings</h2>' + ('<ul>' + ''.join(
        f'<li>{html.escape(r["image"])} ({html.escape(r["template"])}): '
        + '; '.join(html.escape(str(w)) for w in r['warning_texts']) + '</li>' for r in warned)
        + '</ul>' if warned else '<p>None.</p>'))
    page.append('</body></html>\n')
    html_path = write_text_atomic(out_dir / 'group' / 'qc.html', '\n'.join(page))
    return tsv, html_path


def _strip_plot(rows: list[dict], metric: str) -> str:
    """An inline SVG strip plot of one metric, outliers in red and labelled."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    vals = [(r, float(r[metric])) for r in rows if r[metric] is not None]
    fig, ax = plt.subplots(figsize=(8, 1.6))
    rng = np.random.default_rng(0)
    for r, v in vals:
        bad = metric in r['outlier'].split(',')
        ax.plot(v, rng.uniform(-0.3, 0.3), 'o', color='red' if bad else 'tab:blue', alpha=0.8)
        if bad:
            ax.annotate(r['participant_id'], (v, 0.3), fontsize=7, color='red')
    ax.set_yticks([])
    ax.set_ylim(-0.6, 0.6)
    ax.set_xlabel(metric)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format='svg')
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.find('<svg'):]
