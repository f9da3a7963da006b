"""Teacher-forced tokenisation shared by editing and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def join(prompt: str, answer: str) -> str:
    """``prompt`` followed by ``answer`` with exactly one separating space (as KnowEdit writes it)."""
    if prompt[-1:].isspace() or answer[:1].isspace():
        return prompt + answer
    return prompt + " " + answer


@dataclass(frozen=True)
class TeacherForced:
    """Token ids of ``prompt + answer`` and where the answer sits."""

    input_ids: torch.Tensor  # int64 [1, P + T]
    prompt_len: int  # P
    answer_ids: torch.Tensor  # int64 [T]

    @property
    def answer_positions(self) -> torch.Tensor:
        """Positions whose logits predict the answer tokens: P-1 .. P+T-2."""  # [T]
        return torch.arange(self.prompt_len - 1, self.prompt_len - 1 + len(self.answer_ids))


def teacher_forced(tokenizer, prompt: str, answer: str, device=None) -> TeacherForced:
    """Tokenise prompt (with the tokenizer's special tokens) and answer separately, then concatenate.

    Tokenising the answer on its own, with its leading space, keeps the prompt's tokens a
    prefix of the sequence whatever the BPE merges would do across the boundary.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    spaced = join(prompt, answer)[len(prompt) :]
    answer_ids = tokenizer(spaced, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + answer_ids], device=device)
    return TeacherForced(ids, len(prompt_ids), torch.tensor(answer_ids, device=device))
