"""Inference: batch generation with sampling, streaming text and reusable states.

    out = generate(model, [ids_a, ids_b], max_new_tokens=64, temperature=0.8, top_p=0.9, seed=0)
    out.tokens            # generated ids per prompt
"""

from kaggletrain.infer.generate import GenerationOutput, generate
from kaggletrain.infer.runner import run_last
from kaggletrain.infer.sampling import SamplingParams, select_next
from kaggletrain.infer.text import TextStream, tokenizer_for

__all__ = ["generate", "GenerationOutput", "SamplingParams", "select_next", "run_last", "TextStream",
           "tokenizer_for"]
