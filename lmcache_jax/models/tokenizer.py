"""The model's own tokenizer, rebuilt from the metadata of its GGUF file.

A GGUF carries no `tokenizer.json`, only the pieces llama.cpp needs: the
vocabulary, the BPE merges, each token's type, the special ids, the name of
the pre-tokenizer (`tokenizer.ggml.pre`) and the chat template. We assemble the
same byte-level BPE with the `tokenizers` library. The pre-tokenizer is the part
a GGUF names but does not spell out; `_PRE_TOKENIZERS` spells out those we
support, following llama.cpp's `llama-vocab.cpp`.

Two rules hold for every model:

* BOS. `encode` puts the BOS token first exactly when the model's tokenizer
  config asks for it: the GGUF key `tokenizer.ggml.add_bos_token` (absent:
  no BOS, llama.cpp's default for byte-level BPE), or in a Hugging Face folder
  `add_bos_token` of `tokenizer_config.json`, else whether the post-processor
  of `tokenizer.json` puts BOS first. Text that already starts with the BOS
  token (a chat template that writes `bos_token`) is not given a second one.
  Llama-2/3 and Mistral ask for it; SmolLM2 and Qwen2 do not.
* Special tokens. `encode_chat` makes control tokens only of the chat
  template's own pieces: `<|im_start|>` written inside a message is plain
  text, so no message can open a turn of another role. `encode(text,
  special=False)` does the same for any text from a user.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import gguf
import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers


def _gpt2() -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
  # llama.cpp: "\p{N}" first, then the GPT-2 regex. The same as the
  # Sequence[Digits(individual_digits=True), ByteLevel] of SmolLM2's
  # tokenizer.json on Hugging Face.
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# `tokenizer.ggml.pre` -> pre-tokenizer, for the names llama.cpp splits with
# the plain GPT-2 regex, or with single digits first and then that regex.
_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _gpt2, "mpt": _gpt2, "olmo": _gpt2, "jais": _gpt2,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2, "command-r": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2, "exaone": _digits_then_gpt2,
}

# llama.cpp's token types (gguf.TokenType): CONTROL tokens are special (never
# produced by splitting text, skipped on request when decoding); USER_DEFINED
# ones are matched whole in text but decode as plain text.
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# Besides the EOS/EOT/EOM ids, tokens that end generation wherever present, as
# in llama.cpp's end-of-generation set: instruct models end a turn with these,
# and not every GGUF names them as its EOS.
_END_OF_GENERATION = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                      "<|endoftext|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>")


def _field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
  """Byte-level BPE text <-> ids, plus the model's chat template.

  Build with `Tokenizer.from_gguf(path)` or `Tokenizer.from_hf_dir(path)`.
  `add_bos`: whether the model expects BOS first (the module's BOS rule).
  """

  backend: tokenizers.Tokenizer
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  eos_ids: tuple[int, ...]
  chat_template: str | None
  add_bos: bool = False

  def __post_init__(self):
    if self.add_bos and self.bos_id is None:
      raise ValueError("the tokenizer config asks to add BOS but defines no "
                       "BOS token")

  @classmethod
  def from_gguf(cls, source: str | os.PathLike | gguf.GGUFReader) -> Tokenizer:
    """Reads the tokenizer of a GGUF file (metadata only; tensors stay on disk).

    Args:
      source: path of the `.gguf`, or a `gguf.GGUFReader` already open on it
        (the model loader's, to parse the file once).

    Raises:
      ValueError: the file's tokenizer is not byte-level BPE, or its
        pre-tokenizer is not one this module knows.
    """
    reader = (source if isinstance(source, gguf.GGUFReader)
              else gguf.GGUFReader(source))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
          f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is "
          "supported")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
      raise ValueError(
          f"tokenizer.ggml.pre is {pre!r}; supported pre-tokenizers: "
          f"{sorted(_PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
      raise ValueError("the GGUF has no tokenizer.ggml.tokens or merges")
    types = _field(reader, "tokenizer.ggml.token_type",
                   [int(gguf.TokenType.NORMAL)] * len(tokens))
    if len(types) != len(tokens):
      raise ValueError(f"the GGUF has {len(types)} token types for "
                       f"{len(tokens)} tokens")

    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab,
                     merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    control = [t for t, k in zip(tokens, types, strict=True) if k == _CONTROL]
    backend.add_special_tokens([
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t in control])
    backend.add_tokens([
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED])

    def token_id(key: str) -> int | None:
      value = _field(reader, f"tokenizer.ggml.{key}")
      return None if value is None else int(value)

    eos_ids = [token_id(key) for key in ("eos_token_id", "eot_token_id",
                                         "eom_token_id")]
    eos_ids += [vocab[t] for t in _END_OF_GENERATION if t in vocab]
    eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
    return cls(backend=backend, bos_id=token_id("bos_token_id"),
               eos_id=token_id("eos_token_id"),
               pad_id=token_id("padding_token_id"), eos_ids=eos_ids,
               chat_template=_field(reader, "tokenizer.chat_template"),
               add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token",
                                   False)))

  @classmethod
  def from_hf_dir(cls, directory: str | os.PathLike) -> Tokenizer:
    """Reads ``tokenizer.json`` (and ``tokenizer_config.json`` for the chat
    template, the bos/eos tokens and ``add_bos_token``) of a Hugging Face
    model directory."""
    directory = pathlib.Path(directory)
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}

    def token_id(key: str) -> int | None:
      token = config.get(key)
      if isinstance(token, dict):
        token = token.get("content")
      return None if token is None else backend.token_to_id(token)

    vocab = backend.get_vocab(with_added_tokens=True)
    eos_ids = [token_id("eos_token")]
    eos_ids += [vocab[t] for t in _END_OF_GENERATION if t in vocab]
    eos_ids = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
    bos_id = token_id("bos_token")
    add_bos = config.get("add_bos_token")
    if add_bos is None:
      add_bos = _post_processor_puts_first(backend, bos_id)
    return cls(backend=backend, bos_id=bos_id,
               eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
               eos_ids=eos_ids, chat_template=config.get("chat_template"),
               add_bos=bool(add_bos))

  @property
  def vocab_size(self) -> int:
    """Number of ids, the rows of the embedding table."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool | None = None, *,
             special: bool = True) -> list[int]:
    """Ids of `text`.

    Args:
      add_bos: put BOS first. None follows the model (`self.add_bos`), unless
        `text` already starts with the BOS token; True or False force it.
      special: read control tokens written in `text` (`<|im_start|>`) as
        their ids. False encodes them as plain text, as text from a user
        must be.

    Empty text gives [] (or [bos]); callers decide if that is an error.
    """
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    backend = self.backend if special else self._plain
    ids = backend.encode(text, add_special_tokens=False).ids if text else []
    return self._with_bos(ids, add_bos)

  def encode_chat(self, messages: Sequence[Mapping[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    """Ids of a conversation in the model's chat template.

    Only the template's own pieces become control tokens: one written in a
    message's content is encoded as plain text. BOS as `encode` with
    `add_bos=None`.
    """
    _check_messages(messages)
    mark = _unused_char([m["content"] for m in messages])
    written: list[str] = []

    def hide(match: re.Match) -> str:
      written.append(match.group())
      return f"{mark}{len(written) - 1}{mark}"

    hidden = [{**m, "content": self._special_pattern.sub(hide, m["content"])}
              for m in messages]
    rendered = self.apply_chat_template(hidden, add_generation_prompt)
    ids = []
    # The capturing split alternates text (even places) and control tokens.
    for i, piece in enumerate(self._special_pattern.split(rendered)):
      if i % 2:
        ids.append(self.backend.token_to_id(piece))
      elif piece:
        text = re.sub(f"{mark}(\\d+){mark}", lambda m: written[int(m[1])],
                      piece)
        ids += self._plain.encode(text, add_special_tokens=False).ids
    return self._with_bos(ids, None)

  def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
    if add_bos is None:
      add_bos = self.add_bos and ids[:1] != [self.bos_id]
    if not add_bos:
      return ids
    if self.bos_id is None:
      raise ValueError("add_bos=True, but the tokenizer defines no BOS token")
    return [self.bos_id, *ids]

  @functools.cached_property
  def _plain(self) -> tokenizers.Tokenizer:
    """The backend with control tokens read as plain text."""
    plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
    plain.encode_special_tokens = True
    return plain

  @functools.cached_property
  def _special_pattern(self) -> re.Pattern:
    """Matches any control token, the longest first; one capturing group."""
    specials = sorted((t.content for t in
                       self.backend.get_added_tokens_decoder().values()
                       if t.special), key=len, reverse=True)
    return re.compile(f"({'|'.join(map(re.escape, specials)) or '(?!)'})")

  def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of `ids`; `skip_special` drops control tokens like `<|im_end|>`."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary "
                       f"[0, {self.vocab_size})")
    return self.backend.decode(ids, skip_special_tokens=skip_special)

  def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """A conversation rendered by the model's own template (sandboxed).

    The text shows the prompt; for its ids use `encode_chat`, which keeps
    control tokens written in the messages plain.

    Args:
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
      add_generation_prompt: end with the header of the assistant's turn.
    """
    if self.chat_template is None:
      raise ValueError("the GGUF has no tokenizer.chat_template")
    _check_messages(messages)
    return _compile(self.chat_template).render(
        messages=[dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id))

  def _text(self, token_id: int | None) -> str:
    return "" if token_id is None else self.backend.id_to_token(token_id)


def _post_processor_puts_first(backend: tokenizers.Tokenizer,
                               bos_id: int | None) -> bool:
  """Whether `tokenizer.json`'s post-processor starts a sequence with BOS."""
  return (bos_id is not None
          and backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id])


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
  for i, message in enumerate(messages):
    if (not isinstance(message, Mapping)
        or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)):
      raise ValueError(
          f"messages[{i}] is {message!r}; each message must be a dict with "
          "str 'role' and 'content'")


def _unused_char(texts: Sequence[str]) -> str:
  """A private-use character that none of `texts` holds."""
  return next(c for c in map(chr, range(0xE000, 0xF900))
              if not any(c in text for text in texts))


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
  # As Hugging Face renders chat templates, whose authors write for it.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols"])
  env.globals["raise_exception"] = _raise_exception
  return env.from_string(template)
