"""Causal LMs: evaluation the way LLM users measure, and the data that recovery and evaluation need.

- `evaluation.py`: `perplexity` (token perplexity of held-out text at a stated length, each text alone or in sliding
  windows) and `answer_choice_accuracy` (multiple choice by log-likelihood, lm-evaluation-harness style).
- `data.py`: `answer_choice_questions` (SQuAD questions against other answers of their article) and
  `teacher_generations` (a training set the dense teacher writes from prompts: data-free distillation).
- `synthetic.py`: `byte_tokenizer`, a byte-level tokenizer built in code, for tests and offline demos.

Distillation of a causal LM from its dense teacher is `hf_sparse.DistillationLoss` (KL of the next-token
distributions over the labelled tokens, and the per-layer normalised hidden-state loss, `hidden_loss="normalized_mse"`).
"""

from .data import ChoiceQuestion, answer_choice_questions, teacher_generations
from .evaluation import AnswerChoiceResult, PerplexityResult, answer_choice_accuracy, perplexity
from .synthetic import byte_tokenizer

__all__ = [
    "AnswerChoiceResult",
    "ChoiceQuestion",
    "PerplexityResult",
    "answer_choice_accuracy",
    "answer_choice_questions",
    "byte_tokenizer",
    "perplexity",
    "teacher_generations",
]
