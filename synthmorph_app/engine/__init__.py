"""The registration engine: networks, spatial operations, synthesis, training, refinement."""

#: Test-time optimisation iterations at the finest level: the default of every layer (the API,
#: the Nipype interfaces and workflows, the command line, where ``$SYNTHMORPH_REFINE`` changes
#: it). The networks alone reach far less: cross-subject T1w pairs, mean Dice 0.46 against 0.67
#: (``benchmarks/README.md``). 0 runs the networks only, as ``mri_synthmorph`` does.
DEFAULT_REFINE = 15
#: Deformable refinement levels (mm) by default. The last, finer than the network's 2 mm grid,
#: runs on a 1.5 mm mid-space grid (``register``): it raised every benchmark we run but bert ->
#: MNI (0.705 -> 0.703), 2 mm scans included (12 cross-subject 2 mm T1w pairs 0.669 -> 0.681 mean Dice, the
#: BIDS-App's T1w job 0.673 -> 0.678, bert -> T2w template 0.672 -> 0.691, sub-chris PDw ->
#: T1w MIND-NCC 0.538 -> 0.589; benchmarks/README.md, "Session 35: a 1.5 mm finest level
#: everywhere" and "Session 36") for 1.5-2.5 times the refinement's time (MIND: about 2).
#: ``(8, 4, 2)`` (``--refine-levels 8,4,2``) is the faster choice.
DEFAULT_REFINE_LEVELS = (8.0, 4.0, 2.0, 1.5)
