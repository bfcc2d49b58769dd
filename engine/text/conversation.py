"""Fitting a conversation to the context: the oldest turns go first, the system prompt never does.

`fit_conversation` keeps the leading system messages and the newest user message, and drops whole
exchanges from the oldest: a user message with the replies that follow it, so that roles still alternate
as chat templates expect. Callers that keep the history (the chat REPL) drop to a target well below the
limit, as llama.cpp's context shift discards half: the kept turns then stay an unchanged prefix for the
next several turns, and the prefix cache (LLM._prepare_cache) reuses their K/V instead of prefilling
them again after every drop.
"""

from __future__ import annotations

from typing import Callable

from engine.errors import ContextLengthError


def answer_room(n_ctx: int, max_tokens: int | None) -> int:
    """The tokens a fitted conversation leaves for the answer: max_tokens, or a quarter of the context;
    at most half of it."""
    return min(max_tokens or n_ctx // 4, n_ctx // 2)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The chat prompt of `messages`: the model's template with the generation prompt, as token ids."""
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def fit_conversation(messages: list[dict], count: Callable[[list[dict]], int], limit: int
                     ) -> tuple[list[dict], int]:
    """(kept messages, how many were dropped): the fewest oldest exchanges dropped so that
    count(kept) <= limit, where count is the rendered prompt's token count. ContextLengthError when
    the system prompt and the newest message alone exceed the limit."""
    if count(messages) <= limit:
        return list(messages), 0
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    system, turns = list(messages[:head]), list(messages[head:])
    dropped = 0
    while len(turns) > 1:
        # one exchange: the oldest message and every following one up to the next user message
        end = 1
        while end < len(turns) - 1 and turns[end].get("role") != "user":
            end += 1
        turns = turns[end:]
        dropped += end
        if count(system + turns) <= limit:
            return system + turns, dropped
    raise ContextLengthError(f"the system prompt and the last message take {count(system + turns)} tokens, over the "
                             f"{limit} the context leaves; shorten them or load with a larger n_ctx")
