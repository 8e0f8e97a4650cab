"""A character-level tokenizer with a chat template, for the demo teacher and student.

Built with the `tokenizers` library as a BPE model with no merges (so every character is one
token) and wrapped as a transformers fast tokenizer, which round-trips through `save_pretrained`
and loads with plain `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, USER, ASSISTANT, SYSTEM, UNK = "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, USER, ASSISTANT, SYSTEM, UNK]
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;!?'\"-+*/=()\n"

# <|system|>text<|user|>question<|assistant|>answer<eos> ... ; the generation prompt ends with <|assistant|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% else %}<|assistant|>{{ message['content'] }}<eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()  # join characters without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
