"""Tokenizer: ChatGLM2 ids and prompt format, demo training, and the streaming detokenizer's guarantees."""

import random

import pytest

from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer, TokenizerError, train_demo_tokenizer

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the seeded-random property test below still runs
    given = None

TINY_VOCAB = 1000
SMALL_VOCAB = 8000
NEWLINE_ID = 13  # <0x0A>, as in the real ChatGLM2 vocabulary


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_demo_tokenizer(path, TINY_VOCAB)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return ChatGLM2Tokenizer(tokenizer_path)


def stream(tok, ids):
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finish())
    return deltas, detok


# --- prompt format --------------------------------------------------------------------------------------------------


def test_prompt_without_history(tok):
    assert tok.build_prompt("你好", []) == "[Round 1]\n\n问：你好\n\n答："


def test_prompt_with_one_round(tok):
    prompt = tok.build_prompt("那上海呢？", [("北京在哪里？", "北京在华北。")])
    assert prompt == "[Round 1]\n\n问：北京在哪里？\n\n答：北京在华北。\n\n[Round 2]\n\n问：那上海呢？\n\n答："


def test_prompt_with_two_rounds(tok):
    history = [["hi", "Hello!"], ("1+1?", "2")]
    assert tok.build_prompt("thanks", history) == (
        "[Round 1]\n\n问：hi\n\n答：Hello!\n\n[Round 2]\n\n问：1+1?\n\n答：2\n\n[Round 3]\n\n问：thanks\n\n答："
    )


def test_prompt_colons_are_full_width(tok):
    prompt = tok.build_prompt("q", [("a", "b")])
    assert prompt.count("\uff1a") == 4 and ":" not in prompt


def test_chat_input_is_prefix_plus_prompt(tok):
    history = [("你好", "你好！")]
    ids = tok.build_chat_input("今天天气怎么样？", history)
    assert ids[:2] == tok.prefix_ids() == [tok.gmask_id, tok.sop_id]
    assert ids[2:] == tok.encode(tok.build_prompt("今天天气怎么样？", history))
    assert tok.decode(ids) == tok.build_prompt("今天天气怎么样？", history)


def test_system_message_goes_into_the_first_round(tok):
    assert tok.build_chat_input("你好", system="你是助手。") == tok.build_chat_input("你是助手。你好")
    with_history = tok.build_chat_input("再见", [("你好", "你好！")], system="S:")
    assert with_history == tok.build_chat_input("再见", [("S:你好", "你好！")])
    assert tok.build_chat_input("你好", system="") == tok.build_chat_input("你好")


# --- ids --------------------------------------------------------------------------------------------------------------


def test_special_ids_follow_the_sentencepiece_vocab(tok):
    n = tok.sp_vocab_size
    assert n == TINY_VOCAB
    assert (tok.mask_id, tok.gmask_id, tok.smask_id, tok.sop_id, tok.eop_id) == (n, n + 1, n + 2, n + 3, n + 4)
    assert tok.vocab_size == n + 5
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.special_ids == frozenset({0, 1, 2, n, n + 1, n + 2, n + 3, n + 4})


def test_newline_is_byte_fallback_13(tok):
    ids = tok.encode("问\n\n答")
    assert ids.count(NEWLINE_ID) == 2
    assert tok.decode([NEWLINE_ID]) == "\n"


def test_decode_drops_special_padded_and_negative_ids(tok):
    ids = tok.encode("hello 世界")
    noisy = [tok.gmask_id, tok.sop_id, *ids[:2], tok.pad_id, tok.bos_id, tok.mask_id, tok.smask_id]
    noisy += [*ids[2:], tok.eop_id, tok.vocab_size, tok.vocab_size + 100, -1, tok.eos_id]
    assert tok.decode(noisy) == tok.decode(ids) == "hello 世界"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! 1234.5",
        "  two leading spaces",
        "你好，世界。今天天气怎么样？",
        "mixed 中英文 text：a=1, b=2！",
        "line one\nline two\n\n  indented\n",
        "\n\nstarts and ends with newlines\n\n",
        "def f(x):\n    return x * 2\n",
        "full-width　space and\ttab",
        "𠀀 😀👍🏽 龘",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("vocab_size", [TINY_VOCAB, SMALL_VOCAB])
def test_training_is_deterministic(tmp_path, vocab_size):
    first, second = tmp_path / "a.model", tmp_path / "b.model"
    train_demo_tokenizer(first, vocab_size)
    train_demo_tokenizer(second, vocab_size)
    assert first.read_bytes() == second.read_bytes()
    assert ChatGLM2Tokenizer(first).sp_vocab_size == vocab_size


def test_training_matches_the_fixture(tmp_path, tokenizer_path):
    train_demo_tokenizer(tmp_path / "tokenizer.model", TINY_VOCAB)
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=300"):
        train_demo_tokenizer(tmp_path / "tokenizer.model", 300)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_loads_from_a_checkpoint_directory(tokenizer_path):
    assert ChatGLM2Tokenizer(tokenizer_path.parent).sp_vocab_size == TINY_VOCAB


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        ChatGLM2Tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        ChatGLM2Tokenizer(tmp_path)


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        ChatGLM2Tokenizer(bad)


@pytest.mark.parametrize(
    "history",
    ["q", [("q",)], [("q", "a", "extra")], [("q", 1)], ["qa"], {"q": "a"}, [None], 5],
)
def test_bad_history_is_a_clear_error(tok, history):
    with pytest.raises(TokenizerError, match="history"):
        tok.build_prompt("hi", history)
    with pytest.raises(ValueError):
        tok.build_chat_input("hi", history)


def test_non_string_inputs_are_clear_errors(tok):
    with pytest.raises(TokenizerError, match="query"):
        tok.build_prompt(None, [])
    with pytest.raises(TokenizerError, match="system"):
        tok.build_chat_input("hi", system=["not", "text"])
    with pytest.raises(TokenizerError):
        tok.encode(b"bytes")


def test_none_history_means_no_history(tok):
    assert tok.build_prompt("hi", None) == tok.build_prompt("hi", [])


# --- streaming --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["𠀀", "😀👍🏽", "龘", "答：𠀀龘 😀👍🏽！\n\n好的 😀", "  😀 lead and trail 👍🏽  \n"])
def test_streamed_multibyte_characters_are_never_split(tok, text):
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids).strip() == text.strip()


def test_a_split_character_is_held_until_its_last_byte(tok):
    ids = tok.encode("ok😀")
    emoji_bytes = ids[-4:]  # 😀 is not in the tiny vocab: four byte-fallback ids
    assert tok.decode(emoji_bytes) == "😀"
    detok = IncrementalDetokenizer(tok)
    assert detok.push_many(ids[:-4]) == "ok"
    assert [detok.push(i) for i in emoji_bytes] == ["", "", "", "😀"]


def test_invalid_bytes_are_flushed(tok):
    # A stray continuation byte can never complete: it is emitted (as U+FFFD) as soon as it arrives.
    stray = 3 + 0x80
    detok = IncrementalDetokenizer(tok)
    assert detok.push_many(tok.encode("ok")) == "ok"
    assert detok.push(stray) == "\ufffd"
    # A truncated character is held until finish(), which flushes what the full decode gives.
    truncated = [3 + 0xF0, 3 + 0x9F]
    assert detok.push_many(truncated) == ""
    assert detok.finish() == "\ufffd\ufffd"
    assert detok.text == tok.decode([*tok.encode("ok"), stray, *truncated]).strip()


def test_whitespace_is_stripped_like_chat(tok):
    text = "\n\n  first line\n\n  second   line  \n\n"
    ids = tok.encode(text)
    deltas, detok = stream(tok, ids)
    assert detok.text == "first line\n\n  second   line"
    assert not deltas[0] and deltas[-1] == ""  # nothing before "first", trailing whitespace dropped
    assert "".join(deltas) == detok.text


def test_only_whitespace_gives_empty_text(tok):
    deltas, detok = stream(tok, tok.encode("  \n\n \n"))
    assert detok.text == "" and not any(deltas)


def test_special_ids_in_the_stream_are_ignored(tok):
    ids = [tok.gmask_id, tok.sop_id, *tok.encode("你好！"), tok.eop_id, tok.vocab_size + 3, tok.eos_id]
    deltas, detok = stream(tok, ids)
    assert detok.text == "你好！" == "".join(deltas)


def test_leading_space_piece_after_the_first_token_is_kept(tok):
    # SentencePiece drops the "▁" of only the first piece it decodes; later one-piece windows must keep theirs.
    ids = tok.encode("a b c d e f")
    assert len(ids) == 6  # "▁a" "▁b" ... in the tiny vocab
    deltas, _ = stream(tok, ids)
    assert deltas == ["a", " b", " c", " d", " e", " f", ""]


def test_push_after_finish_is_an_error(tok):
    detok = IncrementalDetokenizer(tok)
    detok.push_many(tok.encode("hi"))
    assert detok.finish() == ""
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.push(5)


class _CountingProcessor:
    """Wraps a SentencePieceProcessor to record how many ids each decode call gets."""

    def __init__(self, sp):
        self._sp = sp
        self.decode_lengths = []

    def decode(self, ids):
        self.decode_lengths.append(len(ids))
        return self._sp.decode(ids)

    def __getattr__(self, name):
        return getattr(self._sp, name)


def test_streaming_decodes_a_bounded_window(tokenizer_path):
    tok = ChatGLM2Tokenizer(tokenizer_path)
    ids = tok.encode("很长的回答：" + "😀 龘 hello 世界\n" * 300)
    expected = tok.decode(ids).strip()
    counting = _CountingProcessor(tok._sp)
    tok._sp = counting
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == detok.text == expected
    # At most one decode per id, each of the anchor plus an incomplete character (<= 3 ids) and the new id:
    # the work per token does not grow with the length of the response.
    assert len(counting.decode_lengths) <= len(ids) + 1
    assert max(counting.decode_lengths) <= 5


def _random_id_pools(tok):
    n = tok.sp_vocab_size
    x_ids = tok.encode("x")
    space_pieces = [i for i in range(259, n) if tok.decode([*x_ids, i])[1:].isspace()]
    # Byte-fallback ids are overweighted (with UTF-8 lead bytes among them), so partial characters are frequent.
    pools = [
        list(range(3, 259)),
        [3 + b for b in (0xC3, 0xE4, 0xE9, 0xF0, 0x9F, 0x98, 0x80, 0xBD, 0xA0)],
        list(range(259, n)),
        space_pieces + [NEWLINE_ID, 3 + 0x20, 3 + 0x09],
        sorted(tok.special_ids) + [tok.vocab_size, tok.vocab_size + 7, -1],
    ]
    return pools, [4, 4, 4, 2, 1]


def test_random_streams_concatenate_to_the_stripped_decode(tok):
    rng = random.Random(1234)
    pools, weights = _random_id_pools(tok)
    for _ in range(1500):
        ids = [rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randint(0, 40))]
        deltas, detok = stream(tok, ids)
        assert "".join(deltas) == detok.text == tok.decode(ids).strip(), ids


def test_valid_text_streams_never_emit_replacement_chars(tok):
    rng = random.Random(99)
    alphabet = list("abc xyz，。！？你好世界答问\n 　\t") + ["😀", "👍🏽", "龘", "𠀀", "é", "€"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        deltas, detok = stream(tok, tok.encode(text))
        assert all("\ufffd" not in delta for delta in deltas)
        assert detok.text == text.strip()


if given is not None:

    @settings(max_examples=300, deadline=None, database=None, derandomize=True)
    @given(data=st.data())
    def test_hypothesis_streams_concatenate_to_the_stripped_decode(tok, data):
        n = tok.sp_vocab_size
        byte_ids = st.integers(3, 258)
        any_id = st.integers(-2, tok.vocab_size + 10)
        lead_and_continuation = st.sampled_from([3 + b for b in (0xC3, 0xE4, 0xF0, 0x9F, 0x80, 0xBF, 0xFF)])
        whitespace = st.sampled_from([NEWLINE_ID, 3 + 0x20, tok.encode(" ")[0], *tok.encode("  x")[:1]])
        learned_ids = st.integers(259, n - 1)
        ids = data.draw(
            st.lists(st.one_of(byte_ids, lead_and_continuation, whitespace, learned_ids, any_id), max_size=50)
        )
        deltas, detok = stream(tok, ids)
        assert "".join(deltas) == detok.text == tok.decode(ids).strip()
