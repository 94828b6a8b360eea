"""Per-subject HTML report (``<out>/sub-<label>.html``), in the niworkflows/nireports style.

Built from what is on disk (sidecars and figures), so it also covers images finished by
earlier runs, and lists this run's failures with their reasons.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ..utils.bids import parse_entities, space_name, uri_name, write_text_atomic

STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; color: #225; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
.failed { color: #b00; font-weight: bold; } .elem { margin: 1em 0 2em 0; }
.warn { background: #fee; border: 1px solid #b00; padding: 0.5em; }
img.svg-reportlet { width: 100%; border: 1px solid #ddd; }
"""


def collect_subject(out_dir: str | os.PathLike, subject: str) -> list[dict]:
    """Finished registrations of one subject: sidecar metadata plus file paths."""
    out_dir = Path(out_dir)
    items = []
    for side in sorted((out_dir / f'sub-{subject}').glob('**/anat/*_mode-image_xfm.json')):
        meta = json.loads(side.read_text())
        if meta.get('ToSpace') != meta.get('Template'):
            continue  # the inverse
        src = uri_name(meta['Sources'][0])
        figs = out_dir / f'sub-{subject}' / 'figures'
        tpl, spec = meta['Template'], meta.get('TemplateSpec', {})
        # named as interfaces.derivatives.derivative_paths names them (a cohort, no res)
        fig_spec = {k: v for k, v in spec.items() if k == 'cohort'}
        ent = parse_entities(src)
        items.append({
            'source': src, 'template': tpl, 'spec': spec,
            'qc': meta.get('QC', {}), 'meta': meta, 'xfm': side.with_suffix('.h5'),
            'before_after': figs / space_name(ent, tpl, fig_spec, desc='reg', ext='.svg'),
            'jacobian': figs / space_name(ent, tpl, fig_spec, desc='jacobian', ext='.svg'),
        })
    return items


def write_subject_report(out_dir: str | os.PathLike, subject: str, *,
                         failures: dict | None = None) -> Path:
    """Write ``sub-<subject>.html`` atomically; return its path."""
    out_dir = Path(out_dir)
    items = collect_subject(out_dir, subject)
    parts = [(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>sub-{subject}</title>'
             f'<style>{STYLE}</style></head><body>'),
             f'<h1>synthmorph-app: sub-{html.escape(subject)}</h1>']
    for image, reason in sorted((failures or {}).items()):
        parts.append(f'<p class="warn failed">FAILED {html.escape(Path(image).name)}: '
                     f'{html.escape(reason)}</p>')
    untrained = {c.get('name') for it in items for c in it['meta'].get('Models', {}).values()
                 if c.get('trained') is False and c.get('used', True)}
    if untrained:
        parts.append('<p class="warn">The models ' + html.escape(', '.join(sorted(
            n for n in untrained if n))) + ' have UNTRAINED random weights: these results are '
            'NOT meaningful registrations.</p>')
    for it in items:
        meta = it['meta']
        parts.append(f'<h2>{html.escape(it["source"])} &rarr; {html.escape(it["template"])}'
                     '</h2><div class="elem">')
        rows = {
            'mode': meta.get('RegistrationMode'), 'lambda': meta.get('Lambda'),
            'device': meta.get('Device'), 'time (s)': meta.get('ElapsedTime'),
            **({'through': uri_name(meta['Via'].get('Image'))} if meta.get('Via') else {}),
            **{k: v for k, v in it['qc'].items()},
            'models': ', '.join(f'{k}: {v.get("name")} ({str(v.get("sha256", ""))[:12]})'
                                for k, v in meta.get('Models', {}).items()),
        }
        parts.append('<table>' + ''.join(
            f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
            for k, v in rows.items()) + '</table>')
        if meta.get('Warnings'):
            parts.append('<div class="warn"><b>Warnings</b><ul>' + ''.join(
                f'<li>{html.escape(str(w))}</li>' for w in meta['Warnings']) + '</ul></div>')
        for key, caption in (('before_after', ('Before/after (hover to flicker): the image '
                              'placed by its header, then registered, under the template brain '
                              'outline.')),
                             ('jacobian', ('log Jacobian determinant of the deformation (red: '
                              'growth, blue: shrinkage).'))):
            if it[key].is_file():
                rel = it[key].relative_to(out_dir).as_posix()
                parts.append(f'<p>{caption}</p><object class="svg-reportlet" type="image/svg+xml"'
                             f' data="./{rel}" width="100%">{rel}</object>')
        parts.append('</div>')
    if not items and not failures:
        parts.append('<p>No registration of this subject is complete yet.</p>')
    citation = out_dir / 'logs' / 'CITATION.md'
    if citation.is_file():
        parts.append('<h2>Methods</h2><pre style="white-space: pre-wrap">'
                     + html.escape(citation.read_text()) + '</pre>')
    parts.append('</body></html>\n')
    return write_text_atomic(out_dir / f'sub-{subject}.html', '\n'.join(parts))
