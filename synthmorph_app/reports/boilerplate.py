"""Methods boilerplate (``logs/CITATION.md``) from the workflows' ``__desc__`` and the .bib.

>>> text, bib = citation_markdown(['MNI152NLin6Asym:res-2'])
>>> 'SynthMorph' in text and '@article{hoffmann2024' in bib
True
"""

from __future__ import annotations

import re
from pathlib import Path

BIB = Path(__file__).resolve().parents[1] / 'data' / 'boilerplate.bib'


def citation_markdown(spaces: list[str], *, mode: str = 'joint', lam: float = 0.5,
                      image_type: str = 'anatomical', via_t1w: bool = False,
                      lesions: bool = False, refine: int | None = None,
                      refine_options: dict | None = None) -> tuple[str, str]:
    """Methods text (Markdown, pandoc citation keys) and the BibTeX entries it cites.

    ``via_t1w``: images of other contrasts went through the T1w of their session.
    ``lesions``: some images had a lesion mask (``label-lesion_roi``).
    ``refine``, ``refine_options``: the test-time refinement (default: the default one).
    """
    from ..engine import DEFAULT_REFINE
    from ..workflows.registration import init_register_template_wf

    wf = init_register_template_wf(
        templates=spaces, mode=mode, lam=lam, image_type=image_type,
        refine=DEFAULT_REFINE if refine is None else refine, refine_options=refine_options)
    desc = ' '.join(wf.__desc__.split())
    if via_t1w:
        desc += (' Images of a contrast other than T1w were aligned rigidly to the T1w image of'
                 ' their session, where there was one, and the two transforms (rigid, then the'
                 " T1w image's to the template) were composed into one, so that they land where"
                 ' the T1w image does.')
    if lesions:
        desc += (' Where a lesion mask was given (for a T1w image and the images registered'
                 ' through it), the lesion was filled from the tissue around it and left out of'
                 ' the image similarity (cost-function masking [@brett2001]).')
    bib = BIB.read_text()
    entries = {m.group(1): m.group(0) for m in
               re.finditer(r'@\w+\{([^,]+),.*?\n\}', bib, flags=re.DOTALL)}
    keys = [k for k in dict.fromkeys(re.findall(r'@([A-Za-z0-9_]+)', desc)) if k in entries]
    keys.append('nipype1') if 'nipype1' not in keys else None
    text = (
        '# Methods: how to describe this processing\n\n'
        'synthmorph-app writes this text so that you can copy it into the methods section of '
        'a paper. It is released under the CC0 license. Keys in brackets are in '
        '`CITATION.bib`.\n\n'
        f'{desc} The processing was run with *Nipype* [@nipype1].\n\n'
        '## References\n\n'
        + '\n\n'.join(_plain(entries[k]) for k in keys) + '\n'
    )
    return text, '\n\n'.join(entries[k] for k in keys) + '\n'


def _plain(entry: str) -> str:
    fields = {k: v.replace('{', '').replace('}', '')  # {{Corporate author}} -> text
              for k, v in re.findall(r'(\w+) = \{(.*?)\},?\n', entry + '\n')}
    key = re.match(r'@\w+\{([^,]+),', entry).group(1)
    venue = fields.get('journal') or fields.get('booktitle', '')
    doi = f' doi:{fields["doi"]}' if 'doi' in fields else ''
    doi += f' {fields["url"]}' if 'url' in fields and 'doi' not in fields else ''
    year = f'({fields["year"]})' if 'year' in fields else ''
    tail = ' '.join(part for part in (venue, year) if part)
    return (f'- [{key}] {fields.get("author", "")}. {fields.get("title", "")}.'
            + (f' {tail}.' if tail else '') + doi)
