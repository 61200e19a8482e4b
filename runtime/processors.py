"""TEMPORARY stand-in until the processors branch lands (not committed)."""

import numpy as np


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def build_logits_processors(options, prompt_length, eos_token_ids):
    def chain(input_ids, scores):
        if options.min_new_tokens and input_ids.shape[1] - prompt_length < options.min_new_tokens:
            scores = scores.copy()
            scores[:, list(eos_token_ids)] = -np.inf
        return scores

    return chain
