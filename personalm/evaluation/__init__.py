"""Evaluation: per-community preference metrics (torchmetrics, each row once across processes), the
resumable predictions writer, and pairwise judging of generations (a reward-model judge, an
OpenAI-compatible LLM judge that stores its verdicts, or on the synthetic data its own tastes) with win rates and
bootstrap intervals.

Owns ``metrics``, ``predict_writer``, ``judge`` (comparison, win rates, chart), ``reward_judge``,
``llm_judge`` with its questions and answers (``llm_prompt``) and its ``verdicts`` store, and ``synthetic_judge``
(the synthetic data's tastes, from ``personalm.data.synthetic_texts``). May import
``personalm.paths``, ``personalm.jsonl``, ``personalm.models`` and ``personalm.data``; training modules use it
(their logged metrics), never the other way round.
"""
