"""StopChecker: stop strings split across chunks, overlapping stops, and chunking independence."""

import pytest
from hypothesis import given, settings, strategies as st

from engine.text.stopping import StopChecker


def run(stop, chunks):
    """Feed all chunks; return (emitted text, stopped, matched)."""
    checker = StopChecker(stop)
    out = []
    stopped = False
    for chunk in chunks:
        text, stopped = checker.feed(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(checker.flush())
    return "".join(out), stopped, checker.matched


def reference(stop, text):
    """The text before the earliest-ending stop occurrence, found one character at a time."""
    for end in range(1, len(text) + 1):
        hits = [(end - len(s), s) for s in stop if text[:end].endswith(s)]
        if hits:
            start, s = min(hits)
            return text[:start], True, s
    return text, False, None


def test_no_stop_passes_everything_through():
    checker = StopChecker([])
    assert checker.feed("hello") == ("hello", False)
    assert checker.flush() == ""


def test_stop_split_across_three_chunks():
    checker = StopChecker(["<|end|>"])
    assert checker.feed("Hello <|") == ("Hello ", False)
    assert checker.feed("en") == ("", False)
    assert checker.feed("d|> trailing") == ("", True)
    assert checker.matched == "<|end|>"
    assert checker.feed("more") == ("", True)
    assert checker.flush() == ""


def test_held_prefix_released_when_it_stops_matching():
    checker = StopChecker(["STOP"])
    assert checker.feed("a ST") == ("a ", False)
    assert checker.feed("ART") == ("START", False)
    assert checker.feed("x S") == ("x ", False)
    assert checker.flush() == "S"


def test_stop_at_the_very_start():
    assert StopChecker(["User:"]).feed("User: hi") == ("", True)
    assert run(["User:"], ["U", "ser", ":"]) == ("", True, "User:")


def test_text_before_stop_in_the_same_chunk():
    assert StopChecker(["\n\n"]).feed("line one\n\nline two") == ("line one", True)


def test_overlapping_stop_strings():
    # "abc" completes before "bcd": stop there, even though "bcd" would start later anyway.
    assert run(["bcd", "abc"], ["xabcd"]) == ("x", True, "abc")
    # Both end at the same character: the one that starts first (longer) wins.
    assert run(["lo", "hello"], ["say hel", "lo"]) == ("say ", True, "hello")
    # A shorter stop inside a longer one ends first and wins, however the text is chunked.
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True, "bc")
    assert run(["abcd", "bc"], list("abcd")) == ("a", True, "bc")


def test_self_overlapping_stop_string():
    # "aab" inside "aaab": the held tail must be the longest prefix, not the first one found.
    assert run(["aab"], ["a", "a", "a", "b"]) == ("a", True, "aab")
    assert run(["abab"], ["xab", "aba", "b"]) == ("x", True, "abab")


def test_bare_string_is_one_stop_and_duplicates_collapse():
    assert StopChecker("END").stop == ("END",)
    assert StopChecker(["x", "x", "y"]).stop == ("x", "y")


@pytest.mark.parametrize("bad", [[""], ["ok", ""], ""])
def test_empty_stop_string_rejected(bad):
    with pytest.raises(ValueError, match="empty stop string"):
        StopChecker(bad)


def test_non_str_stop_rejected():
    with pytest.raises(ValueError, match="must be str"):
        StopChecker(["ok", 3])  # type: ignore[list-item]


def test_unicode_stop_strings():
    assert run(["。\n"], ["日本語", "。", "\n次"]) == ("日本語", True, "。\n")


stop_alphabet = st.sampled_from(list("ab\n😀"))


@settings(max_examples=400, deadline=None)
@given(
    stop=st.lists(st.text(stop_alphabet, min_size=1, max_size=4), max_size=3),
    text=st.text(stop_alphabet, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_any_chunking_matches_char_by_char_reference(stop, text, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(stop, chunks) == reference(stop, text)


@settings(max_examples=200, deadline=None)
@given(stop=st.lists(st.text(stop_alphabet, min_size=1, max_size=4), min_size=1, max_size=3),
       text=st.text(stop_alphabet, max_size=30))
def test_nothing_emitted_contains_a_stop_string(stop, text):
    emitted, stopped, _ = run(stop, list(text))
    assert not any(s in emitted for s in stop)
    if not stopped:
        assert emitted == text
