"""A 2-layer attention-only transformer trained to copy: on random tokens repeated twice it
predicts the second half from the first (induction heads, Olsson et al. 2022).

    >>> from attention_hooker.examples.induction import load_induction_model, repeated_random_tokens
    >>> model, config = load_induction_model()
    >>> ids = repeated_random_tokens(4, config)        # (batch, 2 * half)
    >>> model(ids).shape                               # (batch, tokens, vocab)
    torch.Size([4, 48, 64])

The weights were trained by ``scripts/train_induction.py``; ``induction.json`` beside them records
the seed, the hyper-parameters and the losses measured when they were saved.
"""

from .model import AttentionOnlyTransformer, CausalSelfAttention, InductionConfig
from .task import HalfLosses, half_losses, repeated_random_tokens, training_tokens
from .weights import WEIGHTS, load_induction_model, read_record, save_induction_model

__all__ = ["AttentionOnlyTransformer", "CausalSelfAttention", "InductionConfig", "HalfLosses", "half_losses",
           "repeated_random_tokens", "training_tokens", "WEIGHTS", "load_induction_model", "read_record", "save_induction_model"]
