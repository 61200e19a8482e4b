"""A stress checkpoint for quantisation: seeded random GPT-2 weights given the outliers trained GPT-2 has.

Random weights quantise too well: every activation is of the same small size. Trained GPT-2 is not like that:
- massive activations (Sun et al. 2024, "Massive Activations in Large Language Models"): from the first blocks on, a
  few residual dimensions hold values hundreds to thousands of times the median, the same for every token, written
  by a few MLP units; LayerNorm gains are small there, so that they act as biases;
- outlier features (Dettmers et al. 2022, LLM.int8()): a few hidden channels of the projections' inputs are far
  larger than the rest, from LayerNorm gains that are large on those channels.
Both break quantisers that share one scale between an outlier and its neighbours: MatMulNBits' int8 activations
share one per block of inputs, DynamicQuantizeMatMul's (--fast-prefill) one per tensor.

add_outliers() writes both into a GPT2LMHeadModel, and scales the final LayerNorm so that the logits are as peaked
as a trained model's (flat random logits would make every agreement figure meaningless). The magnitudes below are
those of GPT-2 small's; they are the same for every shape.
"""

from __future__ import annotations

from typing import Any

# Residual dimensions that carry the massive activations (GPT-2 small's own are 138, 378 and 447), the MLP units
# that write them (in block 1, as in GPT-2, where they appear after the second block) and their value: about 2000x
# the median |residual| of these random weights (~0.1), as GPT-2 small's reach ~3000 against a median near 1. The
# last block's MLP takes them out again (as they fade in trained models' last layers), so that the final LayerNorm
# is not dominated by them.
MASSIVE_DIMS = (138, 378, 447)
MASSIVE_BLOCK = 1
MASSIVE_VALUE = 200.0
# The writing units' activation (their c_fc bias; GELU(40) = 40 whatever the token): the units that write massive
# activations fire far above the rest (Yu et al. 2024, "The Super Weight"), here about 20x the largest of the other
# units' (2 to 6 on these weights), so that c_proj's input has outlier channels; their c_proj weight is then
# MASSIVE_VALUE / 40 = 5 (the others: ~0.02).
MASSIVE_UNIT_ACTIVATION = 40.0
MASSIVE_GAIN = 0.02  # LayerNorm gain on the massive dimensions (trained GPT-2's are small there too)
# Channels whose LayerNorm gain (ln_1 and ln_2 of every block) is 20x: the projections' inputs then have a few
# channels 20x the rest, the outlier features LLM.int8() describes (systematic from 6.7B parameters on, and present
# in smaller trained transformers).
OUTLIER_CHANNELS = (77, 496, 643)
OUTLIER_GAIN = 20.0
# The final LayerNorm's gain, which sets the logits' scale: 7 brings the mean top-1 probability on the sample text to
# about 0.33 (random GPT-2 small: 0.0002; a gain of 8 gives 0.38, 14 gives 0.66), as peaked as trained GPT-2 small.
LOGIT_GAIN = 7.0


def add_outliers(model: Any) -> dict[str, Any]:
    """Write the outliers into a GPT2LMHeadModel (in place); returns what bundle.json records about them."""
    import torch

    config = model.config
    dims = [dim % config.n_embd for dim in MASSIVE_DIMS]
    channels = [channel % config.n_embd for channel in OUTLIER_CHANNELS]
    with torch.no_grad():
        for block, sign in ((MASSIVE_BLOCK % config.n_layer, 1.0), (config.n_layer - 1, -1.0)):
            mlp = model.transformer.h[block].mlp
            for unit, dim in enumerate(dims):  # one MLP unit per massive dimension, the same for every token
                mlp.c_fc.weight[:, unit] = 0.0  # Conv1D weights are [in, out]
                mlp.c_fc.bias[unit] = MASSIVE_UNIT_ACTIVATION
                mlp.c_proj.weight[unit, :] = 0.0
                mlp.c_proj.weight[unit, dim] = sign * MASSIVE_VALUE / MASSIVE_UNIT_ACTIVATION
        for layer in model.transformer.h:
            for norm in (layer.ln_1, layer.ln_2):
                norm.weight[dims] = MASSIVE_GAIN
                norm.weight[channels] *= OUTLIER_GAIN
        model.transformer.ln_f.weight.mul_(LOGIT_GAIN)
        model.transformer.ln_f.weight[dims] = MASSIVE_GAIN
    return {
        "massive_dims": dims,
        "massive_block": MASSIVE_BLOCK % config.n_layer,
        "massive_value": MASSIVE_VALUE,
        "massive_unit_activation": MASSIVE_UNIT_ACTIVATION,
        "outlier_channels": channels,
        "outlier_gain": OUTLIER_GAIN,
        "logit_gain": LOGIT_GAIN,
        "see": "export/outliers.py",
    }
