"""Train a small byte-level BPE chat tokenizer locally, with a ChatML chat template.

Byte-level BPE encodes any text (no unknown tokens), so a tokenizer trained on a few
kilobytes still round-trips whatever a user types. The chat template is ChatML
(`<|im_start|>role\\n...<|im_end|>`), the end-of-turn token doubles as EOS, and a
dedicated pad token keeps padding distinct from EOS (padding with EOS would hide the
end of every training completion from the loss mask).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_chat_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer trained on ``texts`` with a chat template and a pad token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        padding_side="left",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
