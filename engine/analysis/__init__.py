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

from engine.analysis.cosets import coset_neurons
from engine.analysis.cosets import coset_tables
from engine.analysis.cross_seed import irrep_agreement
from engine.analysis.cross_seed import live_neurons
from engine.analysis.cross_seed import match_neurons
from engine.analysis.cross_seed import neuron_correlations
from engine.analysis.cross_seed import representation_similarity
from engine.analysis.pipeline import analyze_group
from engine.analysis.pipeline import evaluate_all_pairs
from engine.analysis.pipeline import neuron_irreps_from_hidden
from engine.analysis.representation import DEFAULT_KEY_THRESHOLD
from engine.analysis.representation import DEFAULT_ORDER_THRESHOLD
from engine.analysis.representation import IrrepTables
from engine.analysis.representation import ablation_losses
from engine.analysis.representation import fraction_explained
from engine.analysis.representation import fve
from engine.analysis.representation import hidden_fve
from engine.analysis.representation import irrep_tables
from engine.analysis.representation import key_irreps
from engine.analysis.representation import learning_order
from engine.analysis.representation import logit_fourier_power
from engine.analysis.representation import logit_similarity
from engine.analysis.representation import neuron_irreps
