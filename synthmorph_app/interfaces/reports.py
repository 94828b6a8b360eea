"""QC of one registration as a Nipype interface (figures and metrics).

>>> from synthmorph_app.interfaces.reports import ImageQC
>>> sorted(ImageQC().output_spec().get())
['before_after', 'jacobian_figure', 'qc']
"""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)


class _ImageQCInputSpec(BaseInterfaceInputSpec):
    moving_image = File(exists=True, mandatory=True, desc='the input image (subject space)')
    moved_image = File(exists=True, mandatory=True, desc='the image resampled on the template')
    template = File(exists=True, mandatory=True, desc='template image (fixed)')
    template_mask = File(exists=True, mandatory=True, desc='template brain mask')
    log_jacobian = File(desc='Jacobian determinant of the forward map (deformable modes)')
    figures = traits.Bool(True, usedefault=True, desc='draw the report figures')
    lesion_mask = File(exists=True, desc='the lesion on the template grid: left out of the QC '
                       'metrics')


class _ImageQCOutputSpec(TraitedSpec):
    qc = traits.Dict(desc='mind_ncc, ncc, logjac_sd, folding_pct (see synthmorph_app.evaluate)')
    before_after = File(desc='flicker SVG: header-only placement vs registered, over contours')
    jacobian_figure = File(desc='SVG of the log Jacobian determinant over the template')


class ImageQC(SimpleInterface):
    """Similarity to the template, Jacobian spread, folding and the report's figures."""

    input_spec = _ImageQCInputSpec
    output_spec = _ImageQCOutputSpec

    def _run_interface(self, runtime):
        from ..reports.figures import image_qc

        jac = self.inputs.log_jacobian if isdefined(self.inputs.log_jacobian) else None
        lesion = self.inputs.lesion_mask if isdefined(self.inputs.lesion_mask) else None
        self._results.update(image_qc(
            self.inputs.moving_image, self.inputs.moved_image, self.inputs.template,
            self.inputs.template_mask, jac, runtime.cwd, figures=self.inputs.figures,
            lesion_mask=lesion,
        ))
        return runtime
