"""From the engine's token ids to the text a pool streams: incremental detokenizing, stop strings, usage.

    reply = ReplyText(tokenizer, stop=["\\n\\n"], prompt_tokens=len(prompt_ids))
    for token_delta in engine_stream:
        if (text_delta := reply.push(token_delta)) is not None:
            send(text_delta)                 # the last one has finish_reason and usage
        if reply.finished:
            break                            # a stop string ends the reply before the engine does

No Ray and no model: unit-tested with the demo tokenizer alone (tests/server/test_reply_text.py).
"""

from __future__ import annotations

from serve_app.engine.engine import TokenDelta
from serve_app.model.tokenizer import ChatGLM2Tokenizer, IncrementalDetokenizer
from serve_app.engine.outputs import TokenLogprob
from serve_app.server.messages import LogprobEntry, TextDelta, TokenText, Usage


class TokenTexts:
    """Token ids -> `TokenText` as OpenAI's logprobs show them: the token's bytes, as text where they are UTF-8
    ("bytes:\\xe4" where a byte-fallback token holds part of a character), special tokens by name."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer):
        self.table = tokenizer.token_bytes()

    def __call__(self, token_id: int) -> TokenText:
        raw = self.table[token_id] if 0 <= token_id < len(self.table) else b"\xff<pad>"
        if raw.startswith(b"\xff"):
            return TokenText(raw[1:].decode(), None)
        try:
            return TokenText(raw.decode("utf-8"), list(raw))
        except UnicodeDecodeError:
            return TokenText("bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw))

    def entry(self, token_id: int, logprob: TokenLogprob) -> LogprobEntry:
        return LogprobEntry(self(token_id), logprob.logprob, [(self(t), value) for t, value in logprob.top])


class StopStringMatcher:
    """Cuts a streamed text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        if final or not self.hold:
            out, self.pending = self.pending, ""
        else:
            out, self.pending = self.pending[: -self.hold], self.pending[-self.hold :]
        return out, False


class ReplyText:
    """One reply's token deltas in, its text deltas out."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer, stop: list[str], prompt_tokens: int, index: int = 0,
                 texts: TokenTexts | None = None):
        """`index`: the choice this reply is (n > 1); `texts` names tokens for logprobs (made when first needed)."""
        self.detok = IncrementalDetokenizer(tokenizer)
        self.tokenizer, self.index, self.texts = tokenizer, index, texts
        self.stops = StopStringMatcher(stop)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finished = False

    def push(self, delta: TokenDelta) -> TextDelta | None:
        """The text delta for `delta`, or None when there is nothing to send yet (a held-back tail, a partial
        character). After the one with finish_reason, `finished` is set and nothing more may be pushed."""
        assert not self.finished, "the reply is finished"
        self.completion_tokens += len(delta.token_ids)
        text = "".join(self.detok.push(token) for token in delta.token_ids)
        if delta.finish_reason:
            text += self.detok.finish()
        text, hit = self.stops.feed(text, final=bool(delta.finish_reason))
        finish = "stop" if hit else delta.finish_reason
        logprobs = None
        if delta.logprobs:  # every generated token's, a stop string's included
            self.texts = self.texts or TokenTexts(self.tokenizer)
            logprobs = [self.texts.entry(token, lp) for token, lp in zip(delta.token_ids, delta.logprobs)]
        if finish:
            self.finished = True
            cached = delta.stats.cached_prompt_tokens if delta.stats else 0
            return TextDelta(text, finish, Usage(self.prompt_tokens, self.completion_tokens, cached),
                             logprobs=logprobs, index=self.index)
        return TextDelta(text, logprobs=logprobs, index=self.index) if text or logprobs else None
