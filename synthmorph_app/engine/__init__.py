"""The registration engine: networks, spatial operations, synthesis, training, refinement."""

#: Test-time optimisation iterations at the finest level: the default of every layer (the API,
#: the Nipype interfaces and workflows, the command line, where ``$SYNTHMORPH_REFINE`` changes
#: it). The networks alone reach far less: cross-subject T1w pairs, mean Dice 0.46 against 0.67
#: (``benchmarks/README.md``). 0 runs the networks only, as ``mri_synthmorph`` does.
DEFAULT_REFINE = 15
