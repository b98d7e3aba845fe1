"""offload/serve/textstream.py: stop strings end the text and are not returned; nothing that could still become one
is sent early; split UTF-8 is held back; the pieces add up to the decoded text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.serve.textstream import TextStream, find_stop, partial_stop

PIECES = ["a", "b", "ab", "\n", "\n\n", "END", "E", "ND", " ", "x y"]


def piece_decoder(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def utf8_decoder(ids: list[int]) -> str:
    """Byte-level tokens, as a byte BPE without merges: a split character decodes as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], bool]:
    pieces = []
    for token in ids:
        delta, stopped = stream.push(token)
        pieces.append(delta)
        if stopped:
            return pieces, True
    return [*pieces, stream.finish()], False


def test_find_and_partial_stop():
    assert find_stop("abcabc", ["ca", "bc"]) == 1 and find_stop("abc", ["x"]) is None
    assert find_stop("abcabc", ["bc"], start=2) == 4
    assert partial_stop("hello EN", ["END"]) == 2 and partial_stop("hello E", ["END", "Eve"]) == 1
    assert partial_stop("hello", ["END"]) == 0 and partial_stop("END", ["END"]) == 0  # a whole stop is no prefix


def test_a_stop_string_across_tokens_is_cut_and_never_sent():
    stream = TextStream(piece_decoder, ["END"])
    # "a" "E" "ND" "b": "E" could start END, so it waits; "ND" completes it
    assert stream.push(0) == ("a", False)
    assert stream.push(6) == ("", False)
    assert stream.push(7) == ("", True)
    assert stream.text == "a" and stream.finish() == ""


def test_held_back_text_is_released_when_it_does_not_become_a_stop():
    stream = TextStream(piece_decoder, ["END"])
    assert stream.push(6) == ("", False)         # "E"
    assert stream.push(0) == ("Ea", False)       # "Ea" is no prefix of END
    assert stream.push(6) == ("", False)
    assert stream.finish() == "E"                # the sequence ended: the held "E" is text after all
    assert stream.text == "EaE"


def test_a_stop_inside_one_token_keeps_the_text_before_it():
    stream = TextStream(piece_decoder, [" "])
    assert stream.push(0) == ("a", False)
    assert stream.push(9) == ("x", True)         # "x y": stop at the space
    assert stream.text == "ax"


def test_the_earliest_of_several_stops_wins():
    stream = TextStream(piece_decoder, ["b", "\n"])
    assert run(stream, [0, 3, 1]) == (["a", ""], True)
    assert stream.text == "a"


def test_split_utf8_is_held_until_its_last_byte():
    snowman = list("☃".encode())                 # three bytes
    stream = TextStream(utf8_decoder)
    assert [stream.push(b) for b in [104, *snowman]] == [("h", False), ("", False), ("", False), ("☃", False)]
    assert stream.finish() == "" and stream.text == "h☃"


def test_no_stops_streams_every_piece_at_once():
    stream = TextStream(piece_decoder)
    assert run(stream, [0, 1, 5]) == (["a", "b", "END", ""], False)


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        TextStream(piece_decoder, ["x", ""])


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(PIECES) - 1), max_size=12),
       stops=st.lists(st.sampled_from(["END", "\n\n", "ab", "b a", "x", "y\n", "aa"]), max_size=3))
def test_pieces_add_up_to_the_text_cut_at_the_first_stop(ids, stops):
    stream = TextStream(piece_decoder, stops)
    pieces, stopped = run(stream, ids)
    full = piece_decoder(ids)
    cut = find_stop(full, stops)
    assert "".join(pieces) == stream.text == (full if cut is None else full[:cut])
    assert stopped == (cut is not None)
    for s in stops:
        assert s not in stream.text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="aé☃\n", max_size=10), stops=st.lists(st.sampled_from(["é\n", "☃☃", "a"]), max_size=2))
def test_byte_tokens_add_up_to_the_decoded_text(text, stops):
    ids = list(text.encode())
    stream = TextStream(utf8_decoder, stops)
    pieces, _ = run(stream, ids)
    cut = find_stop(text, stops)
    assert "".join(pieces) == (text if cut is None else text[:cut])
    assert all("\ufffd" not in p for p in pieces)
