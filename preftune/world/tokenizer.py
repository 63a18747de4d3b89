"""Byte-level BPE tokenizers trained locally with ``tokenizers`` (no hub download).

Why byte-level: any text a user or a sampled policy produces can be encoded, including words the
corpus never had (held-out slot values). The result is wrapped as a
:class:`transformers.PreTrainedTokenizerFast` so that every step loads it with
``AutoTokenizer.from_pretrained(path)`` like any other model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
"""End of a response; also the beginning-of-sequence token (GPT-2 convention)."""
PAD_TOKEN = "<|pad|>"
"""Padding only; distinct from EOS so that a padded position is never mistaken for a stop."""


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    padding_side: str = "left",
    model_max_length: int = 256,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it; deterministic for the same texts and size.

    ``padding_side`` is saved with the tokenizer: ``left`` for a policy (batched generation needs
    the prompts right-aligned), ``right`` for a reward model that reads whole texts.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side=padding_side,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return wrapped
