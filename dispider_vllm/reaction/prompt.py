"""The reaction prompt (DISPIDER.md section 4, template ``qwen``, separator style PHI).

The released code never shows the model its earlier answers; the paper says the k-th answer sees the k-1
before it. ``build_reaction_prompt`` follows the paper when ``previous_answers`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_PLACEHOLDER = "<image>"
TURN_END = "<|im_end|>"


def build_reaction_prompt(
    question: str,
    previous_answers: Sequence[str] = (),
    *,
    image_placeholder: str = IMAGE_PLACEHOLDER,
) -> str:
    """``SYSTEM USER: <image>\\n{question} ASSISTANT:`` with earlier answers as earlier assistant turns."""
    prompt = f"{SYSTEM} USER: {image_placeholder}\n{question} ASSISTANT:"
    for answer in previous_answers:
        # An earlier answer closes its assistant turn the way the model ends one (<|im_end|>, where its
        # generation stops); the question is asked again for the new moment.
        prompt += f" {answer.strip()}{TURN_END} USER: {question} ASSISTANT:"
    return prompt
