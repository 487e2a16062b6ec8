"""Evaluation: per-community preference metrics (torchmetrics, each row once across processes), the
resumable predictions writer, and pairwise judging of generations (a reward-model judge or an
OpenAI-compatible LLM judge that stores its verdicts) with win rates and bootstrap intervals.

Owns ``metrics``, ``predict_writer``, ``judge`` (comparison, win rates, chart), ``reward_judge`` and
``llm_judge`` with its questions and answers (``llm_prompt``) and its ``verdicts`` store. May import
``personalm.paths``, ``personalm.jsonl``, ``personalm.models`` and ``personalm.data``; training modules use it
(their logged metrics), never the other way round.
"""
