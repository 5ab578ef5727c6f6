"""The multiturn task's prompts are the chat template's rendering of the
conversation: each answer closed by one end-of-turn token, never two."""

from __future__ import annotations

import types

import pytest

from experiments.tasks.multiturn import after_answer, next_prompt
from experiments.tasks.reuse import chat_pieces
from lmcache_jax.models import assets
from lmcache_jax.models.tokenizer import Tokenizer

PASSAGE = "Enter Ghost. It spreads its arms."
MESSAGES = ("Summarize the passage above in one sentence.",
            "Who is the most important character?",
            "What might happen next?")
ANSWERS = ("The Ghost appears and spreads its arms.", "Hamlet.")


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.from_gguf(assets.default_gguf_path())


@pytest.mark.parametrize("finished", [True, False])
def test_later_turns_render_the_conversation_as_the_template_does(tok,
                                                                  finished):
  """A finished answer ends on the model's end-of-turn token (SmolLM2's
  <|im_end|>, which the next turn's piece opens with); a cut one does not."""
  ctx = types.SimpleNamespace(lm=types.SimpleNamespace(tokenizer=tok),
                              config=types.SimpleNamespace(model="smollm2"))
  opening, _, _ = chat_pieces(tok)
  end_of_turn = tok.encode("<|im_end|>")
  assert len(end_of_turn) == 1 and end_of_turn[0] in tok.eos_ids
  history = tok.encode(opening) + tok.encode(PASSAGE)
  conversation = []
  for turn, message in enumerate(MESSAGES):
    prompt = next_prompt(ctx, history, turn, message)
    conversation.append({"role": "user", "content": (
        f"{PASSAGE}\n\n{message}" if turn == 0 else message)})
    assert tok.decode(prompt) == tok.apply_chat_template(conversation)
    if turn == len(ANSWERS):
      break
    answer = tok.encode(ANSWERS[turn]) + (end_of_turn if finished else [])
    history = after_answer(prompt, answer, finished)
    conversation.append({"role": "assistant", "content": ANSWERS[turn]})
  assert "<|im_end|><|im_end|>" not in tok.decode(prompt)
