"""Data: ComPreD from the Hub or a local copy (or the synthetic ``embedded:compred``), validated, paired,
subsampled, put in the one prompt template, tokenized with truncation in tokens, and collated; one
LightningDataModule serves every phase.

Owns ``prompt`` (the template), ``compred`` (the schema, reading files in validated chunks), ``sources`` (a
split's files: the local Hub layout or the Hub), ``pairs`` (skips, A/B to chosen/rejected, the paper's
subsample), ``encoding`` (one tokenization of the prompt, lengths in tokens), ``prepare`` (a split prepared
once, in parallel, memory-mapped by every process: ``spec``, ``planning``, ``tasks``, ``progress``),
``prepare_command`` (``python -m personalm prepare``), ``cache_key`` (the prepared split's key), ``collate``
(padded tensors, labels on responses), ``packing`` (packed rows, prefix-shared DPO pairs, their 4D masks),
``batching`` (evaluation order by length), ``datamodule`` with its ``prepared_splits``, ``synthetic`` (the offline
demo data; its texts in ``synthetic_texts``) and ``tokenizer_training`` (the embedded model's tokenizer, trained on
it). May import ``personalm.paths``, ``personalm.jsonl``, ``personalm.configs`` and ``personalm.models`` (for the
tokenizer); nothing from training, evaluation or the study.
"""
