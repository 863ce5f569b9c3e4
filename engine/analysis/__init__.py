"""Jitted analysis passes over stacked runs, and the driver that runs them per cohort.

Passes (pure: no I/O, no Orbax, no plotting): ``representation`` — logit similarity, fraction of logits
explained, key irreps, FVEs, restricted / excluded losses, learning order, per-neuron irreps; ``cross_seed`` —
neuron correlations and their rotation baseline, universal neurons, one-to-one matching, CKA / Procrustes /
mutual k-NN; ``cosets`` — the share of each neuron's input explained by the cosets of every subgroup, its
best subgroup and the irreps of the permutation representation on those cosets; ``margins`` — normalised
margin, single-irrep neurons, irrep coverage; ``connectivity`` — loss barriers on the linear path between
seeds, raw and after neuron alignment; ``redundancy`` — iterative feature merging; ``pipeline`` — all of
it for the runs of one group, as JSON-ready records. ``driver``: every cohort of a run directory (runs that
differ only in seed) into analysis/summary.json.
"""

from universality.engine.analysis.cosets import coset_neurons
from universality.engine.analysis.cosets import coset_tables
from universality.engine.analysis.cross_seed import irrep_agreement
from universality.engine.analysis.cross_seed import live_neurons
from universality.engine.analysis.cross_seed import match_neurons
from universality.engine.analysis.cross_seed import neuron_correlations
from universality.engine.analysis.cross_seed import representation_similarity
from universality.engine.analysis.pipeline import analyze_group
from universality.engine.analysis.pipeline import evaluate_all_pairs
from universality.engine.analysis.pipeline import neuron_irreps_from_hidden
from universality.engine.analysis.representation import DEFAULT_KEY_THRESHOLD
from universality.engine.analysis.representation import DEFAULT_ORDER_THRESHOLD
from universality.engine.analysis.representation import IrrepTables
from universality.engine.analysis.representation import ablation_losses
from universality.engine.analysis.representation import fraction_explained
from universality.engine.analysis.representation import fve
from universality.engine.analysis.representation import hidden_fve
from universality.engine.analysis.representation import irrep_tables
from universality.engine.analysis.representation import key_irreps
from universality.engine.analysis.representation import learning_order
from universality.engine.analysis.representation import logit_fourier_power
from universality.engine.analysis.representation import logit_similarity
from universality.engine.analysis.representation import neuron_irreps
