"""Training: the LightningModules (SFT, DPO, reward model) on a shared base, their components (the DPO loss
and log-probs, the reference and its precomputed cache, the NaN guard), sharded strategies (FSDP2) and the
export command.

Owns ``base`` (loading, optimizer, throughput, generation, export), ``nan_guard``, ``sft``, ``dpo_loss``,
``reference``, ``reference_cache``, ``dpo``, ``reward``, ``sharding`` and ``export`` (``python -m personalm
export``). May import ``personalm.paths``, ``models``, ``data`` and ``evaluation``; not the study.
"""
