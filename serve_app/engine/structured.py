"""Structured output: a reply constrained to JSON that matches a JSON Schema, through llguidance.

    grammars = Grammars(tokenizer, n_vocab=config.padded_vocab_size)
    matcher = grammars.matcher(schema_text)        # InvalidRequest for a schema it cannot compile
    allowed = matcher.compute_bitmask()            # before each token: 1 bit per vocabulary id
    matcher.consume_token(token)                   # after it

llguidance compiles a schema into a grammar over bytes and computes, from the ChatGLM2 vocabulary's bytes, which
token ids may come next. The engine sends that bitmask with the row and `sampling.sample` sets every other id's logit
to -inf on the device, before the bias, the penalties and the filters; greedy and sampled rows alike then choose only
ids that keep the reply inside the grammar, and the reply ends when the grammar is complete. Compiled grammars are
cached per schema text (a compiled matcher, copied for each request). JSON is written compactly with `", "` and `": "` between items, like `json.dumps`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

from serve_app.engine.errors import InvalidRequest

GRAMMAR_CACHE = 256  # compiled schemas kept per engine
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = json.dumps({"type": "object"})  # response_format {"type": "json_object"}


def canonical_schema(schema: dict | bool) -> str:
    """The schema as the JSON text a request carries: compact, its keys in the order given (the reply's properties
    come in the order the schema lists them, which clients rely on: "reasoning" before "answer")."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every id's bytes, eos, specials and an encoder."""

    def __init__(self, tokenizer, n_vocab: int):
        # The model's embedding rows past the tokenizer's ids (padding) are tokens no grammar allows.
        tokens = tokenizer.token_bytes()
        self.tokens = tokens + [b"\xff[PAD%d]" % i for i in range(len(tokens), n_vocab)]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._encode = tokenizer.encode_continuation

    def __call__(self, text: bytes | str) -> list[int]:
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class Grammars:
    """JSON Schema -> llguidance matchers over one vocabulary; compiled grammars cached (thread-safe)."""

    def __init__(self, tokenizer, n_vocab: int, cache_size: int = GRAMMAR_CACHE):
        import llguidance

        self._llg = llguidance
        self.n_vocab = n_vocab
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, n_vocab)))
        if self.tokenizer.vocab_size != n_vocab:
            raise ValueError(f"llguidance read {self.tokenizer.vocab_size} tokens, not the model's {n_vocab}")
        self._cache: OrderedDict[str, object] = OrderedDict()  # schema -> its pristine LLMatcher
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matcher(self, schema: str):
        """A fresh llguidance LLMatcher for a reply constrained to `schema` (JSON text): a copy of the schema's
        compiled matcher, compiled on first use (milliseconds; up to a second for huge schemas, so callers on an event
        loop run this on a thread). InvalidRequest naming what is wrong with a schema it cannot compile."""
        with self._lock:
            compiled = self._cache.get(schema)
            if compiled is not None:
                self._cache.move_to_end(schema)
        if compiled is None:
            compiled = self._compile(schema)
            with self._lock:
                self._cache[schema] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return compiled.deep_copy()

    def _compile(self, schema: str):
        llg = self._llg
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidRequest(f"unsupported JSON schema: {messages[0] if messages else 'it does not compile'}")
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"unsupported JSON schema: {matcher.get_error()}")
        return matcher
