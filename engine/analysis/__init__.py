"""Analysis passes any task family can run, and the driver that runs a family's passes per cohort.

Generic passes take activations or parameters with a leading run axis and know nothing of the task:
``cross_seed`` — neuron correlations against a random-rotation baseline and universal neurons (through
``universality.kernels.correlation``), one-to-one matching, CKA / Procrustes / mutual k-NN between runs,
agreement of per-neuron labels; ``neuron_stats`` — streamed moments of each neuron's activations, variance
explained by token features, vocabulary composition of output weights; ``convergent`` — Convergent
Learning's one-to-one matchings, sparse prediction and spectral clusters of two runs' units. ``records``:
the typed JSON records every family's analysis writes. ``driver``: every cohort of a run directory (runs
that differ only in seed) into analysis/summary.json, through the family's hook.

Passes that read one family's task or architecture live in that family's package (the group family's
representation theory, cosets, margins, mode connectivity and feature merging of its MLP:
``universality.engine.families.group.passes``).
"""

from universality.engine.analysis.cross_seed import irrep_agreement
from universality.engine.analysis.cross_seed import live_neurons
from universality.engine.analysis.cross_seed import match_neurons
from universality.engine.analysis.cross_seed import neuron_correlations
from universality.engine.analysis.cross_seed import representation_similarity
