"""Chat templates for supervised samples (the Alpaca tool): prompt tokens negated, no loss on them.

``internlm`` (InternEvo's ``alpaca_tokenizer.py``, for the InternLM v1 tokenizer)::

    [bos] + -( enc("<|User|>:{instruction}\\n{input}") + [<eoh>=103167, \\n=13]
               + enc("<|Bot|>:") )
          + enc(output) + [<eoa>=103166, \\n=13]

``chatml`` (this project's template for every other tokenizer; InternLM2's chat format)::

    [bos] + -( [<|im_start|>] + enc("user\\n{instruction}\\n{input}") + [<|im_end|>] + enc("\\n")
               + [<|im_start|>] + enc("assistant\\n") )
          + enc(output) + [<|im_end|>]

(``\\n{input}`` is left out when the input is empty.)  Both are cut to ``max_length - 1`` tokens
and end with ``[eos]``, so a sample has at most ``max_length`` tokens.  The negative ids feed the
model as ``|id|`` with label -100; the first response token is the first target.
"""

from __future__ import annotations

from internevo.data.errors import DataError
from internevo.data.tokenizer import Tokenizer

TEMPLATES = ("auto", "internlm", "chatml")
INTERNLM_V1_VOCAB = 103168
EOH, EOA, NEWLINE = 103167, 103166, 13  # InternEvo's hard-coded InternLM v1 ids
# InternLM2's .model stores the chat markers as [UNUSED_TOKEN_146]/[UNUSED_TOKEN_145]; its
# Hugging Face tokenizer names them <|im_start|>/<|im_end|>.
INTERNLM2_VOCAB, IM_START_V2, IM_END_V2 = 92544, 92543, 92542


def pick_template(tok: Tokenizer, name: str = "auto") -> str:
    """``auto`` -> ``internlm`` for InternLM v1's vocabulary, else ``chatml``."""
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "auto":
        return "internlm" if tok.vocab_size == INTERNLM_V1_VOCAB else "chatml"
    if name == "internlm" and tok.vocab_size <= EOH:
        raise DataError(f"{tok.path}: the internlm template needs InternLM v1's vocabulary "
                        f"(ids {EOA}/{EOH}), this tokenizer has {tok.vocab_size} ids")
    return name


def _marker(tok: Tokenizer, name: str, v2_id: int) -> list[int]:
    if tok.vocab_size == INTERNLM2_VOCAB and tok.token_to_id(name) is None:
        return [v2_id]
    idx = tok.token_to_id(name)
    return [idx] if idx is not None else tok.encode(name)  # no such token: spell it out


def prompt_and_response(record: dict, tok: Tokenizer, template: str) -> tuple[list, list]:
    """Token ids of the prompt (to be negated) and of the supervised response."""
    ins, inp, out = record["instruction"], record.get("input") or "", record["output"]
    if template == "internlm":
        user = f"<|User|>:{ins}" + (f"\n{inp}" if inp else "")
        prompt = tok.encode(user) + [EOH, NEWLINE] + tok.encode("<|Bot|>:")
        return prompt, tok.encode(out) + [EOA, NEWLINE]
    start = _marker(tok, "<|im_start|>", IM_START_V2)
    end = _marker(tok, "<|im_end|>", IM_END_V2)
    user = "user\n" + ins + (f"\n{inp}" if inp else "")
    prompt = (start + tok.encode(user) + end + tok.encode("\n") + start
              + tok.encode("assistant\n"))
    return prompt, tok.encode(out) + end


def alpaca_sample(record: dict, tok: Tokenizer, template: str,
                  max_length: int) -> tuple[list[int], bool]:
    """One supervised sample ``[bos] + -prompt + response`` cut to ``max_length-1``, + eos;
    and whether it was cut."""
    prompt, response = prompt_and_response(record, tok, template)
    head = [] if tok.bos_id is None else [tok.bos_id]
    tokens = head + [-t for t in prompt] + response
    tail = [] if tok.eos_id is None else [tok.eos_id]
    keep = max_length - len(tail)
    return tokens[:keep] + tail, len(tokens) > keep
