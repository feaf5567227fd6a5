"""Tokenizers, from a local model directory only.

A sentencepiece `tokenizer.model` (LLaMA-1/2, Mistral) is read directly with sentencepiece (ids as
LLaMA: unk 0, bos 1, eos 2; pad = 0 as LLM-Adapters sets `pad_token_id = 0`). A directory without one
(LLaMA-3, Qwen2, GPT-J: `tokenizer.json` and its companions) is read through `AutoTokenizer`, local
files only, no remote code; pad is id 0 when the tokenizer has none.
"""

from __future__ import annotations

import os

from .errors import PeftDsError

TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_MODEL, TOKENIZER_JSON)  # a model directory needs one of these


class SentencePieceTokenizer:
    """The slice of the HF tokenizer interface peft-ds uses, over a sentencepiece model."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.model_file = model_file
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as err:
            raise PeftDsError(f"cannot read sentencepiece model {model_file}: {err}") from None
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = 0  # LLM-Adapters: tokenizer.pad_token_id = 0 (unk)
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids the sentencepiece model has no piece for decode to nothing, as Hugging Face's tokenizers
        skip them: a model's vocabulary can be larger than its tokenizer's (GPT-J's 50400 rows for 50257
        tokens; a real-width preset's over the shipped tiny tokenizer) and generation can pick one."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)


def load_tokenizer(model_dir: str):
    path = os.path.join(model_dir, TOKENIZER_MODEL)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise PeftDsError(f"model directory {model_dir} has no usable tokenizer files: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token_id = 0
    return tok
