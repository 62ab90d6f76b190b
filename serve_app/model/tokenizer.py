"""The ChatGLM2 tokenizer: SentencePiece plus five special ids, prompt building, streaming detokenization.

ChatGLM2 ships a plain SentencePiece model (`tokenizer.model`: `<unk>`=0, `<s>`=1, `</s>`=2, then 256 byte-fallback
pieces, so "\\n" is `<0x0A>` = 13) and appends five special tokens after its vocabulary, in this order:
`[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop` (ids `sp_vocab_size + 0..4`). Every model input starts with
`[gMASK] sop`. This module reads that format directly, so no `trust_remote_code` file is ever executed.

`train_demo_tokenizer` writes a small tokenizer of the same shape from a corpus shipped with the package, for the tiny
demo checkpoints the tests and the CPU demo use. `IncrementalDetokenizer` turns a stream of generated ids into text
deltas that never end in a partial UTF-8 character and concatenate exactly to the stripped final text.
"""

from __future__ import annotations

import importlib.resources
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
TOKENIZER_FILE = "tokenizer.model"

# 3 control pieces (<unk> <s> </s>) + 256 byte-fallback pieces come before any learned piece.
_META_PIECES = 3 + 256
# The character coverage SentencePiece recommends for CJK; lowered only when the vocabulary cannot hold that many
# distinct characters (see `_character_coverage`).
_CJK_CHARACTER_COVERAGE = 0.9995
_MIN_CHARACTER_COVERAGE = 0.98  # the lowest value the SentencePiece trainer accepts
_MIN_MERGES = 64  # learned multi-character pieces a small vocabulary keeps room for
_SPACE_SYMBOL = "\u2581"  # "▁": how SentencePiece writes a space inside pieces


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or input the tokenizer cannot turn into a prompt."""


def _corpus_lines() -> list[str]:
    corpus = importlib.resources.files("serve_app").joinpath("data", "corpus.txt").read_text(encoding="utf-8")
    # SentencePiece trains on lines, so "\n" never becomes a learned piece and encodes through byte fallback as
    # <0x0A> (id 13), exactly as in the real ChatGLM2 vocabulary. Blank lines carry nothing.
    return [line for line in corpus.split("\n") if line.strip()]


def _character_coverage(lines: list[str], vocab_size: int) -> float:
    """The CJK coverage, or less when the vocabulary cannot hold the characters it would require.

    Each character SentencePiece keeps takes one vocabulary slot, and the trainer refuses a vocabulary smaller than
    the kept characters. For a small vocabulary we keep the most frequent characters that fit while leaving
    `_MIN_MERGES` slots for merged pieces; rarer characters fall back to bytes (which streaming must handle anyway).
    SentencePiece accepts coverages from 0.98 only, which sets the smallest vocabulary the corpus can train.
    """
    # Count the text the trainer sees: identity normalization, spaces escaped as "▁", a dummy "▁" prefix per line.
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(_SPACE_SYMBOL + line.replace(" ", _SPACE_SYMBOL))
    budget = vocab_size - _META_PIECES - _MIN_MERGES
    freqs = sorted(counts.values(), reverse=True)
    if len(freqs) <= budget:
        return _CJK_CHARACTER_COVERAGE
    if budget < 1:
        return _MIN_CHARACTER_COVERAGE  # the trainer then reports the vocabulary as too small
    total = sum(freqs)
    covered_before = sum(freqs[: budget - 1])
    covered_at = covered_before + freqs[budget - 1]
    # The trainer keeps characters until the covered share reaches the target; aiming between the share of the
    # first budget-1 and the first budget characters keeps exactly `budget` of them, whatever float rounding does.
    coverage = (covered_before + covered_at) / 2 / total
    return min(_CJK_CHARACTER_COVERAGE, max(_MIN_CHARACTER_COVERAGE, coverage))


def train_demo_tokenizer(out_path: Path, vocab_size: int) -> None:
    """Train a ChatGLM2-shaped SentencePiece model on the shipped corpus and write it to `out_path`.

    The model matches the real one where it matters to this project: BPE with byte fallback, `<unk>`=0, `<s>`=1,
    `</s>`=2, no pad piece, identity normalization that keeps every space and newline (so "\\n\\n" round-trips as
    two `<0x0A>` = 13 ids). Training is single-threaded on a fixed, unshuffled corpus fed from memory, so the same
    `vocab_size` always yields the same bytes (no file path is recorded in the model). It takes well under a second.
    The corpus supports vocabularies up to about 16,000 ids; the tiny and small presets use ~1,000 and ~8,000.

    Raises `TokenizerError` when the vocabulary size cannot be trained from the corpus.
    """
    lines = _corpus_lines()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=_character_coverage(lines, vocab_size),
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces
            max_sentence_length=1 << 16,  # never silently drop a long corpus line
            input_sentence_size=0,  # use every line: no sampling, hence no randomness
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:  # sentencepiece reports every training failure as RuntimeError
        raise TokenizerError(f"cannot train a tokenizer with vocab_size={vocab_size}: {exc}") from exc
    Path(out_path).write_bytes(model.getvalue())


def _validate_history(history: object) -> list[tuple[str, str]]:
    if history is None:
        return []
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TokenizerError(f"history must be a list of [query, response] pairs, got {type(history).__name__}")
    rounds = []
    for i, turn in enumerate(history):
        if (
            isinstance(turn, (str, bytes))
            or not isinstance(turn, Sequence)
            or len(turn) != 2
            or not all(isinstance(part, str) for part in turn)
        ):
            raise TokenizerError(f"history[{i}] must be a [query, response] pair of strings, got {turn!r:.80}")
        rounds.append((turn[0], turn[1]))
    return rounds


class ChatGLM2Tokenizer:
    """ChatGLM2's SentencePiece tokenizer with its five special ids and chat prompt format.

    Ids: `0 .. sp_vocab_size-1` are SentencePiece pieces; `[MASK]`, `[gMASK]`, `[sMASK]`, `sop`, `eop` follow at
    `sp_vocab_size + 0..4`, so `vocab_size = sp_vocab_size + 5` (64794 for the real model). The model's embedding is
    padded beyond that (65024 rows); `decode` ignores such padded ids.
    """

    def __init__(self, path: str | Path) -> None:
        """Load `tokenizer.model` from a file path or from a checkpoint directory holding it.

        Raises `TokenizerError` when the file is missing or is not a SentencePiece model.
        """
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except (RuntimeError, OSError) as exc:
            raise TokenizerError(f"not a SentencePiece model: {path} ({exc})") from exc
        self.path = path

        self.sp_vocab_size: int = self._sp.get_piece_size()
        self.vocab_size: int = self.sp_vocab_size + len(SPECIAL_TOKENS)
        self.mask_id, self.gmask_id, self.smask_id, self.sop_id, self.eop_id = (
            self.sp_vocab_size + i for i in range(len(SPECIAL_TOKENS))
        )
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        # ChatGLM2 pads with <unk> (id 0): its sp model has no pad piece.
        self.pad_id: int = self._sp.unk_id()
        # Ids that decode to nothing: the five specials plus <s>, </s> and <unk>/pad.
        self.special_ids: frozenset[int] = frozenset(range(self.sp_vocab_size, self.vocab_size)) | {
            self.bos_id,
            self.eos_id,
            self.pad_id,
        }
        # Byte-fallback pieces ("<0x0A>") by id -> byte value; the detokenizer needs them to spot partial characters.
        self._byte_values: dict[int, int] = {
            i: int(self._sp.id_to_piece(i)[3:5], 16) for i in range(self.sp_vocab_size) if self._sp.is_byte(i)
        }
        self._anchor_id, self._anchor_text = self._find_anchor()
        self._plain: spm.SentencePieceProcessor | None = None  # without the dummy "▁" prefix (encode_continuation)
        self._token_bytes: list[bytes] | None = None

    def _find_anchor(self) -> tuple[int, str]:
        # SentencePiece drops the leading "▁" of the first piece it decodes. Decoding a window behind a fixed piece
        # that has no "▁" and decodes to itself keeps every later "▁" as a space, so a window's text is exact.
        for i in range(self.sp_vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i) or i in self._byte_values:
                continue
            piece = self._sp.id_to_piece(i)
            if piece.strip() and _SPACE_SYMBOL not in piece and self._sp.decode([i]) == piece:
                return i, piece
        raise TokenizerError(f"{self.path} has no plain piece to anchor streaming decodes")

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of `text`, without the `[gMASK] sop` prefix."""
        if not isinstance(text, str):
            raise TokenizerError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
            raise TokenizerError("text is not valid Unicode (it contains a lone surrogate)") from None
        return self._sp.encode(text)

    def prefix_ids(self) -> list[int]:
        """The `[gMASK] sop` prefix every ChatGLM2 input starts with."""
        return [self.gmask_id, self.sop_id]

    def build_prompt(self, query: str, history: Sequence[Sequence[str]] | None = ()) -> str:
        """The ChatGLM2 chat prompt: one `[Round i]` block per past (query, response) pair, then the new query.

        Rounds are 1-based and the colons are full-width (U+FF1A), exactly as the official `build_prompt`:
        `[Round 1]\\n\\n问：{q1}\\n\\n答：{a1}\\n\\n[Round 2]\\n\\n问：{query}\\n\\n答：`.
        Raises `TokenizerError` when `query` is not a string or `history` is not a sequence of string pairs.
        """
        if not isinstance(query, str):
            raise TokenizerError(f"query must be a string, got {type(query).__name__}")
        rounds = _validate_history(history)
        prompt = "".join(
            f"[Round {i}]\n\n问：{past_query}\n\n答：{response}\n\n"
            for i, (past_query, response) in enumerate(rounds, 1)
        )
        return prompt + f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："

    def build_chat_input(
        self, query: str, history: Sequence[Sequence[str]] | None = (), system: str | None = None
    ) -> list[int]:
        """Model input ids for a chat turn: `[gMASK] sop` + the encoded `build_prompt(query, history)`.

        ChatGLM2's format has no slot for a system message. A non-empty `system` is prepended verbatim (no separator,
        as the official OpenAI-style server does) to the query of the first round: `history[0]`'s query when there
        is history, else `query`. The official server prepends it to the newest query instead; keeping it in round 1
        makes every turn of a conversation share the previous turn's prompt as a prefix, so prefix caching keeps
        working across turns.
        Raises `TokenizerError` for a non-string query or system, or a malformed history.
        """
        rounds = _validate_history(history)
        if system is not None and not isinstance(system, str):
            raise TokenizerError(f"system must be a string, got {type(system).__name__}")
        if system:
            if rounds:
                rounds[0] = (system + rounds[0][0], rounds[0][1])
            elif isinstance(query, str):
                query = system + query
        return self.prefix_ids() + self.encode(self.build_prompt(query, rounds))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special, eos, bos and pad ids and ids outside the tokenizer (padded rows, < 0).

        The text is not stripped; `IncrementalDetokenizer` strips it as the official `chat()` does.
        """
        return self._sp.decode(self._text_ids(ids))

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in a reply, by id (vocab_size of them): a piece's UTF-8 with "▁" as a space,
        a byte-fallback piece's one byte, and for control and special ids b"\\xff" + their name (the marker grammar
        engines use for tokens that are not text)."""
        if self._token_bytes is not None:
            return self._token_bytes
        out = []
        for i in range(self.vocab_size):
            if i >= self.sp_vocab_size:
                out.append(b"\xff" + SPECIAL_TOKENS[i - self.sp_vocab_size].encode())
            elif i in self._byte_values:
                out.append(bytes([self._byte_values[i]]))
            elif self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
                out.append(b"\xff" + self._sp.id_to_piece(i).encode())
            else:
                out.append(self._sp.id_to_piece(i).replace(_SPACE_SYMBOL, " ").encode())
        self._token_bytes = out
        return out

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as it would continue a reply: without the "▁" SentencePiece puts before a text's start."""
        if self._plain is None:
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto()
            model.ParseFromString(self.path.read_bytes())
            model.normalizer_spec.add_dummy_prefix = False
            self._plain = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        return self._plain.encode(text)

    def _text_ids(self, ids: Iterable[int]) -> list[int]:
        # Every id >= sp_vocab_size is either one of the five specials or an embedding padding row.
        return [i for i in map(int, ids) if 0 <= i < self.sp_vocab_size and i not in self.special_ids]

    def _decode_continuation(self, ids: list[int]) -> str:
        """Text that `ids` add when they follow at least one earlier text id (no leading-"▁" stripping)."""
        text = self._sp.decode([self._anchor_id, *ids])
        return text[len(self._anchor_text) :]


class IncrementalDetokenizer:
    """Turns generated ids, one at a time, into text deltas for streaming.

    Guarantees: a delta never ends inside a UTF-8 character (a character split over byte-fallback ids is held back
    until its last byte arrives; bytes that can never complete are flushed, as U+FFFD, once that is certain, at
    `finish()` at the latest); emitted text is never revised; the concatenated deltas equal
    `tokenizer.decode(ids).strip()` once `finish()` has run. Leading whitespace is held until the first other
    character and trailing whitespace until more text follows (it is dropped at `finish()`), matching the stripped
    response of the official `chat()`.

    Each `push` decodes only a window of at most a few ids (those after the last character boundary), so streaming
    costs O(1) per token rather than re-decoding the whole response.
    """

    def __init__(self, tokenizer: ChatGLM2Tokenizer) -> None:
        self._tok = tokenizer
        self._pending: list[int] = []  # text ids after the last committed boundary (an incomplete char at most)
        self._seen_text = False  # whether a non-whitespace character has been emitted (leading strip is over)
        self._held_space: list[str] = []  # trailing whitespace not emitted yet
        self._parts: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """Everything emitted so far (the concatenation of all deltas)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (often "", never a partial character)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if not self._tok._text_ids([token_id]):
            return ""
        self._pending.append(int(token_id))
        held = self._incomplete_char_ids()
        if held == len(self._pending):
            return ""
        ready, self._pending = self._pending[: len(self._pending) - held], self._pending[len(self._pending) - held :]
        return self._emit(self._decode_window(ready))

    def push_many(self, token_ids: Iterable[int]) -> str:
        """`push` each id in order; return the joined deltas."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def finish(self) -> str:
        """End the stream: flush held bytes (invalid ones decode to U+FFFD), drop trailing whitespace."""
        if self._finished:
            return ""
        delta = self._emit(self._decode_window(self._pending)) if self._pending else ""
        self._pending = []
        self._held_space = []
        self._finished = True
        return delta

    def _decode_window(self, ids: list[int]) -> str:
        # Windows start at character boundaries, which is exact: SentencePiece decodes each run of byte pieces left
        # to right one character at a time. Every window decodes as a continuation, even the first: the only
        # difference from a full decode is the one leading "▁" SentencePiece drops, whitespace the strip removes.
        return self._tok._decode_continuation(ids)

    def _incomplete_char_ids(self) -> int:
        """How many trailing pending ids are bytes of a UTF-8 character that later bytes could still complete."""
        tail: list[int] = []
        for token_id in reversed(self._pending):
            byte = self._tok._byte_values.get(token_id)
            if byte is None or len(tail) == 4:
                break
            tail.append(byte)
        tail.reverse()
        # Find the last byte that is not a continuation byte (0b10xxxxxx): it starts the character that may be cut.
        for start in range(len(tail) - 1, -1, -1):
            lead = tail[start]
            if lead & 0xC0 != 0x80:
                # Sequence length from the lead byte. This accepts a superset of what SentencePiece decodes as valid
                # (it also rejects overlong and surrogate forms), so holding back is never too eager to emit.
                need = 2 if 0xC0 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF7 else 1
                have = len(tail) - start
                return have if have < need else 0
        return 0

    def _emit(self, raw: str) -> str:
        # Apply the final .strip() incrementally: skip leading whitespace; keep trailing whitespace back until a
        # non-whitespace character follows it.
        if not self._seen_text:
            raw = raw.lstrip()
            if not raw:
                return ""
            self._seen_text = True
        body = raw.rstrip()
        if not body:
            self._held_space.append(raw)
            return ""
        delta = "".join(self._held_space) + body
        self._held_space = [raw[len(body) :]]
        self._parts.append(delta)
        return delta
