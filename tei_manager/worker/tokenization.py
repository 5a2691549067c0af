"""Turning request text into token ids, with TEI's validation, truncation and prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec
from tokenizers import Tokenizer

from tei_manager.worker.errors import validation

Direction = Literal["right", "left"]

# TEI refuses (or cuts, when truncating) text longer than this many characters per
# allowed token before tokenizing, so one huge request cannot stall the tokenizer.
MAX_CHARS_PER_TOKEN = 250


class Encoding(msgspec.Struct, frozen=True):
    """One tokenized sequence, special tokens included, ready to be batched."""

    ids: list[int]
    type_ids: list[int]


class Token(msgspec.Struct, frozen=True):
    """One token as the Tokenize call reports it; special tokens have no offsets."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class Tokenization:
    """Encodes requests with a fast tokenizer, validating them against ``max_input_length``."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_input_length: int,
        prompts: Mapping[str, str],
        default_prompt: str | None,
    ) -> None:
        self.max_input_length = max_input_length
        self.prompts = dict(prompts)
        self.default_prompt = default_prompt
        # tokenizer.json files often carry a truncation and padding setting of their own.
        # Truncation is per request here, so keep one copy per way of truncating rather
        # than reconfiguring a shared tokenizer on every call.
        self._plain = _copy(tokenizer)
        self._truncating = {
            direction: _copy(tokenizer, truncate_to=max_input_length, direction=direction)
            for direction in ("right", "left")
        }

    def prompt(self, prompt_name: str | None) -> str | None:
        """The prompt to put before a text: the named one, else the default (if any)."""
        if prompt_name is None:
            return self.default_prompt
        try:
            return self.prompts[prompt_name]
        except KeyError:
            available = ", ".join(sorted(self.prompts)) or "none"
            raise validation(
                f"`prompt_name` {prompt_name!r} is not one of the model's prompts "
                f"(available: {available})"
            ) from None

    def encode(
        self,
        text: str,
        *,
        truncate: bool,
        direction: Direction = "right",
        prompt_name: str | None = None,
    ) -> Encoding:
        """Tokenize one text after its prompt; too long without ``truncate`` is VALIDATION."""
        if not text:
            raise validation("`inputs` cannot be empty")
        prompt = self.prompt(prompt_name)
        if self._too_many_chars(len(text), truncate):
            text = text[: self._char_limit]
        if prompt:
            text = prompt + text
        tokenizer = self._truncating[direction] if truncate else self._plain
        encoding = tokenizer.encode(text)
        return self._checked(encoding.ids, encoding.type_ids)

    def encode_pair(
        self, first: str, second: str, *, truncate: bool, direction: Direction = "right"
    ) -> Encoding:
        """Tokenize a (query, text) pair; truncation trims the longer side first."""
        if not first and not second:
            raise validation("`inputs` cannot be empty")
        if self._too_many_chars(len(first) + len(second), truncate):
            # Split the character budget between the two sides, as TEI does.
            half = self._char_limit // 2
            first, second = first[:half], second[:half]
        tokenizer = self._truncating[direction] if truncate else self._plain
        encoding = tokenizer.encode(first, second)
        return self._checked(encoding.ids, encoding.type_ids)

    def tokenize(
        self, text: str, *, add_special_tokens: bool, prompt_name: str | None = None
    ) -> list[Token]:
        """The tokens of ``text`` (after its prompt), with character offsets into that string."""
        if not text:
            raise validation("`inputs` cannot be empty")
        prompt = self.prompt(prompt_name)
        self._too_many_chars(len(text), truncate=False)
        if prompt:
            text = prompt + text
        encoding = self._plain.encode(text, add_special_tokens=add_special_tokens)
        tokens = []
        for token_id, token, (start, stop), special in zip(
            encoding.ids,
            encoding.tokens,
            encoding.offsets,
            encoding.special_tokens_mask,
            strict=True,
        ):
            if special:
                tokens.append(Token(token_id, token, True, None, None))
            else:
                tokens.append(Token(token_id, text[start:stop], False, start, stop))
        return tokens

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """The text of ``ids``; unknown ids decode to nothing, as the fast tokenizer does."""
        if not ids:
            raise validation("`input_ids` cannot be empty")
        return self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def _char_limit(self) -> int:
        return self.max_input_length * MAX_CHARS_PER_TOKEN

    def _too_many_chars(self, chars: int, truncate: bool) -> bool:
        """Whether the text must be cut before tokenizing; without ``truncate`` that is an error."""
        if chars <= self._char_limit:
            return False
        if not truncate:
            raise validation(
                f"`inputs` must have less than {self._char_limit} characters. Given: {chars}"
            )
        return True

    def _checked(self, ids: list[int], type_ids: list[int]) -> Encoding:
        if len(ids) > self.max_input_length:
            raise validation(
                f"`inputs` must have less than {self.max_input_length} tokens. Given: {len(ids)}"
            )
        return Encoding(ids, type_ids)


def _copy(
    tokenizer: Tokenizer, *, truncate_to: int | None = None, direction: Direction = "right"
) -> Tokenizer:
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    if truncate_to is None:
        copy.no_truncation()
    else:
        copy.enable_truncation(truncate_to, strategy="longest_first", direction=direction)
    return copy
