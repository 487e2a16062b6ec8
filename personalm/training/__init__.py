"""Training: the LightningModules (SFT, DPO, reward model) on a shared base, their components (the DPO loss
and log-probs, the reference and its precomputed cache), the callbacks (throughput, NaN guard, checkpoints),
resuming, sharded strategies (FSDP2) and the export command.

Owns ``base`` (loading, optimizer and schedule, export), ``precision`` (what a run computes in, settings
refused, fp32 trainable weights), ``callbacks`` (tokens/s, NaN guard), ``checkpoints``
(step and time checkpoints, ``last.ckpt``), ``resume`` (RNG states, LoRA checkpoints, the schedule's length),
``decoding`` (``predict``'s settings for both backends, where a response ends), ``generation`` (``predict``: the
HF backend, the row-wise repetition penalty), ``vllm_generation`` (the vLLM backend, imported only when asked for),
``logprobs``, ``attention`` (packed rows' SDPA kernel and FlexAttention's BlockMask), ``dpo_loss``, ``reference``,
``reference_cache``,
``sft``, ``dpo``, ``reward``, ``phase_metrics`` (the per-community metric hooks DPO and the reward model share),
``group_robust`` (weights over communities for DPO and the reward model),
``sharding`` (FSDP2, HSDP), ``sharded_loading`` (a model loaded straight into its FSDP2 shards) and ``export``
(``python -m personalm export``). May import ``personalm.paths``, ``configs``,
``models``, ``data`` and ``evaluation``; not the CLI or the study.
"""
