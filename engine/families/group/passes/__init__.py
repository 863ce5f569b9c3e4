"""The group family's analysis passes (pure, jitted: no I/O, no Orbax, no plotting).

``representation`` — logit similarity against irrep characters, fraction of logits explained, key irreps,
FVEs, restricted / excluded losses, learning order, per-neuron irreps; ``cosets`` — the share of each
neuron's input explained by the cosets of every subgroup; ``margins`` — normalised margin, single-irrep
neurons, irrep coverage; ``connectivity`` — loss barriers on the linear path between seeds of the MLP, raw
and after neuron alignment; ``redundancy`` — iterative feature merging of the MLP's hidden layer.

A cohort's analysis: ``streaming`` (one pass over all |G|² pairs in blocks), ``neuron_split`` (the irreps of
neurons without additive pre-activations) and ``context`` (what every unit reads, computed once) feed the
units of ``units`` (each with its settings and its typed record, ``records``); ``pipeline.analyze_group``
runs them all on parameters held in memory.
"""

from universality.engine.families.group.passes.cosets import coset_neurons
from universality.engine.families.group.passes.cosets import coset_tables
from universality.engine.families.group.passes.pipeline import analyze_group
from universality.engine.families.group.passes.pipeline import evaluate_all_pairs
from universality.engine.families.group.passes.pipeline import neuron_irreps_from_hidden
from universality.engine.families.group.passes.representation import DEFAULT_KEY_THRESHOLD
from universality.engine.families.group.passes.representation import DEFAULT_ORDER_THRESHOLD
from universality.engine.families.group.passes.representation import IrrepTables
from universality.engine.families.group.passes.representation import ablation_losses
from universality.engine.families.group.passes.representation import fraction_explained
from universality.engine.families.group.passes.representation import fve
from universality.engine.families.group.passes.representation import hidden_fve
from universality.engine.families.group.passes.representation import irrep_tables
from universality.engine.families.group.passes.representation import key_irreps
from universality.engine.families.group.passes.representation import learning_order
from universality.engine.families.group.passes.representation import logit_fourier_power
from universality.engine.families.group.passes.representation import logit_similarity
from universality.engine.families.group.passes.representation import neuron_irreps
