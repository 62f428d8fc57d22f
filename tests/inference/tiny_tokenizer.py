"""A tiny byte-level BPE tokenizer built in-process (nothing downloaded): 512 ids, like the
tiny presets' vocabulary, so any id a tiny model samples decodes to text."""

from __future__ import annotations

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<eos>",)
_WORDS = ("the router picks two experts for every token and replay keeps the same routing in training "
          "<tool_call> </tool_call> <answer> </answer> café naïve über résumé 你好 世界").split()


def tiny_tokenizer():
    """An HF fast tokenizer: byte-level (multi-byte characters may span several tokens),
    ``<eos>`` special (id 0), exactly VOCAB_SIZE ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(12)) for i in range(400)]
    # Letter soup (a fixed sequence) for enough distinct pairs to reach VOCAB_SIZE merges.
    corpus += [" ".join("".join(chr(97 + (i * 131 + j * 17 + k * k) % 26) for k in range(3 + (i + j) % 5))
                        for j in range(10)) for i in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    if len(tokenizer) != VOCAB_SIZE:
        raise AssertionError(f"the tiny tokenizer has {len(tokenizer)} ids, not {VOCAB_SIZE}: add training text")
    return tokenizer


def batch_decoder(tokenizer):
    """The engine's detokenizer: a batch of id lists -> texts, special tokens skipped."""
    return lambda batch: tokenizer.batch_decode(batch, skip_special_tokens=True)
