"""Localization and steering heuristics whose claims the audit can test, one module per heuristic.

- `attribution`: attribution patching (gradient x activation of the preference margin) for every head, MLP
  neuron and layer, with rankings (`Attribution.top_heads(k)`, `top_neurons`, `top_layers`).
- `steering`: Contrastive Activation Addition's mean-difference steering at a layer's residual stream or at a set
  of neurons / heads (`MeanDiffSteering`), and `choose_alpha` on validation items.
- `layer_sweep`: CAA's sweep of the steering layer, and the layer where steering moves the behaviour most.
`rows` (pairs as whole token rows) and `sites` (where units live; unit names through `locaudit.units`) are shared
by all three.
"""

from locaudit.heuristics.attribution import Attribution, attribute_pairs, attribution_patching
from locaudit.heuristics.layer_sweep import LayerSweep, layer_sweep
from locaudit.heuristics.sites import SITES, site_units
from locaudit.heuristics.steering import AlphaChoice, MeanDiffSteering, choose_alpha, mean_diff_vectors, mean_difference

__all__ = ["AlphaChoice", "Attribution", "LayerSweep", "MeanDiffSteering", "SITES", "attribute_pairs",
           "attribution_patching", "choose_alpha", "layer_sweep", "mean_diff_vectors", "mean_difference", "site_units"]
