"""Evaluation: per-community preference metrics (torchmetrics, summed across processes), the predictions
writer, and pairwise judging of generations (a reward-model judge or an OpenAI-compatible LLM judge) with
win rates and bootstrap intervals.

Owns ``metrics``, ``predict_writer``, ``judge`` (comparison, win rates, chart), ``reward_judge`` and
``llm_judge``. May import ``personalm.paths``, ``personalm.models`` and ``personalm.data``; training modules
use it (their logged metrics), never the other way round.
"""
