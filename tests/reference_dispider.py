"""A spec-literal, uncached Dispider perception + decision, to check the batched engine against.

Written from DISPIDER.md sections 2-4 alone, independently of dispider_vllm.perception.encoder and
dispider_vllm.decision: explicit loops for the merge and the pooling, ``Qwen2Model(inputs_embeds=...)`` and
``CLIPVisionModel(output_hidden_states=True)`` as transformers ships them, and every decision sequence rebuilt
from scratch and run in one full forward. Slow on purpose; tiny models only.

The two state bounds of the engine are mirrored here as plain rules:
- max_kept_clips: retrieval and G only see the newest ``max_kept_clips`` clips;
- max_context_clips / context_keep_clips: when clip t would make the window of unanswered clips longer than
  max_context_clips, the window restarts at clip t - context_keep_clips + 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.types import Clip, ClipFeatures


# ---- perception ---------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_clip_features(modules: PerceptionDecisionModules, clip: Clip) -> ClipFeatures:
    pixels = clip.pixels.to(modules.device, modules.dtype)
    outputs = modules.vision_tower(pixel_values=pixels, output_hidden_states=True)
    patches = outputs.hidden_states[modules.select_layer][:, 1:]  # [16, 256, C], CLS dropped
    side = int(round(patches.shape[1] ** 0.5))
    merged_frames = []
    for frame in patches:
        grid = frame.reshape(side, side, -1)
        tokens = []
        for row in range(0, side, 2):
            for col in range(0, side, 2):
                top_left, top_right = grid[row, col], grid[row, col + 1]
                bottom_left, bottom_right = grid[row + 1, col], grid[row + 1, col + 1]
                tokens.append(torch.cat([top_left, top_right, bottom_left, bottom_right]))
        merged_frames.append(torch.stack(tokens))  # [64, 4C], row-major
    raw = torch.cat(merged_frames)  # [1024, 4C], frame-major

    pooled = []
    for merged in merged_frames:
        grid = merged.reshape(8, 8, -1)
        for cell_row in range(2):
            for cell_col in range(2):
                block = grid[cell_row * 4 : cell_row * 4 + 4, cell_col * 4 : cell_col * 4 + 4]
                pooled.append(block.reshape(16, -1).mean(dim=0))
    tokens = torch.cat([raw, torch.stack(pooled), raw.mean(dim=0, keepdim=True)])  # [1089, 4C]
    projected = modules.mm_projector(tokens)

    text = f"This contains a clip sampled in {round(clip.start)} to {round(clip.end)} seconds"
    ids = torch.tensor(modules.tokenizer(text, add_special_tokens=False)["input_ids"], device=modules.device)
    embeds = torch.cat([modules.language_model.embed_tokens(ids), projected])
    hidden = modules.language_model(inputs_embeds=embeds[None]).last_hidden_state[0]
    image_start = len(ids)
    memory = hidden[image_start + 1024 : image_start + 1088]
    indicator = hidden[image_start + 1088]
    return ClipFeatures(index=clip.index, start=clip.start, end=clip.end, raw=raw, memory=memory, indicator=indicator)


# ---- decision -----------------------------------------------------------------------------------------------
@dataclass
class ReferenceDecision:
    clip_index: int
    question_id: int
    logit: float
    todo: torch.Tensor
    responded: bool
    retrieved: tuple[int, ...] = ()
    raw: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    global_memory: torch.Tensor | None = None
    sequence_length: int = 0


@dataclass
class _Question:
    text: str
    ids: list[int]
    summaries: list[torch.Tensor] = field(default_factory=list)
    window_start: int = 0  # position (into the clip list) of the first unanswered clip


def _embed(modules: PerceptionDecisionModules, ids: Sequence[int]) -> torch.Tensor:
    return modules.language_model.embed_tokens(torch.tensor(list(ids), device=modules.device))


def _token_ids(modules: PerceptionDecisionModules, text: str) -> list[int]:
    return list(modules.tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def reference_summary(modules: PerceptionDecisionModules, clips: Sequence[ClipFeatures]) -> torch.Tensor:
    """[M of the clips, T of the clips] from position 0 -> the hidden states of the last r positions."""
    sequence = torch.cat([torch.cat([c.memory for c in clips]), torch.stack([c.indicator for c in clips])])
    hidden = modules.language_model(inputs_embeds=sequence[None]).last_hidden_state[0]
    return hidden[-len(clips) :]


@torch.no_grad()
def reference_stream(
    modules: PerceptionDecisionModules,
    clips: Sequence[ClipFeatures],
    questions: dict[int, str],
    respond: Callable[[int], bool | None] = lambda clip_index: None,
    *,
    max_kept_clips: int | None = None,
    max_context_clips: int | None = None,
    context_keep_clips: int | None = None,
    top_k: int = 4,
) -> list[ReferenceDecision]:
    """Decide each clip of one stream from scratch.

    ``questions[p]`` is asked before the clip at position p (position 0 must be given); a later question starts a
    fresh sequence [ANS][Q'] and sees only clips from its own position on, while retrieval and G still see every
    kept clip. ``respond(clip_index)`` overrides the logit's verdict when it returns a bool.
    """
    ans = _embed(modules, _token_ids(modules, "<has_answer>"))
    todo = _embed(modules, _token_ids(modules, "<to_do>"))
    if context_keep_clips is None and max_context_clips is not None:
        context_keep_clips = max(1, max_context_clips // 2)
    decisions: list[ReferenceDecision] = []
    question: _Question | None = None
    question_id = -1
    for t, clip in enumerate(clips):
        if t in questions:
            question = _Question(questions[t], _token_ids(modules, questions[t] + "<to_do>"), window_start=t)
            question_id += 1
        assert question is not None, "a question must be asked before the first clip"
        if max_context_clips is not None and t - question.window_start + 1 > max_context_clips:
            question.window_start = t - context_keep_clips + 1
        window = clips[question.window_start : t + 1]
        q = _embed(modules, question.ids)

        parts = [ans, q]
        for summary in question.summaries:
            parts += [summary, ans]
        parts += [c.memory for c in window] + [q, todo]
        sequence = torch.cat(parts)
        hidden = modules.language_model(inputs_embeds=sequence[None]).last_hidden_state[0]
        state = hidden[-1]
        logit = float(modules.silent_head(state).item())
        forced = respond(clip.index)
        responded = forced if forced is not None else logit > 0
        decision = ReferenceDecision(clip.index, question_id, logit, state, responded, sequence_length=len(sequence))
        if responded:
            kept = list(clips[: t + 1])
            if max_kept_clips is not None:
                kept = kept[-max_kept_clips:]
            similarity = torch.stack([F.cosine_similarity(state, c.indicator, dim=0) for c in kept])
            chosen = sorted(torch.topk(similarity, min(top_k, len(kept))).indices.tolist())
            decision.retrieved = tuple(kept[i].index for i in chosen)
            decision.raw = torch.stack([kept[i].raw for i in chosen])
            decision.memory = torch.stack([kept[i].memory for i in chosen])
            decision.global_memory = reference_summary(modules, kept)
            question.summaries.append(reference_summary(modules, window))
            question.window_start = t + 1
        decisions.append(decision)
    return decisions
