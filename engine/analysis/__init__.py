"""Jitted analysis passes over stacked runs: irreps in logits, weights and neurons; cross-seed comparison.

``representation``: logit similarity, fraction of logits explained, key irreps, FVEs, restricted / excluded
losses, learning order, per-neuron irreps. ``cross_seed``: neuron correlations and their rotation baseline,
universal neurons, one-to-one matching, CKA / Procrustes / mutual k-NN. ``pipeline``: all of it for the
runs of one group, as JSON-ready records.
"""

from engine.analysis.cross_seed import irrep_agreement
from engine.analysis.cross_seed import live_neurons
from engine.analysis.cross_seed import match_neurons
from engine.analysis.cross_seed import neuron_correlations
from engine.analysis.cross_seed import representation_similarity
from engine.analysis.pipeline import analyze_group
from engine.analysis.pipeline import evaluate_all_pairs
from engine.analysis.pipeline import matrices_fn_for
from engine.analysis.pipeline import neuron_irreps_from_hidden
from engine.analysis.representation import DEFAULT_THRESHOLD
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
from engine.analysis.workdir import analyze
from engine.analysis.workdir import load_summary
