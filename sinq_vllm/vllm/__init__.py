"""Everything vLLM-facing: registration, ``SinqConfig``, the linear, lm_head and MoE methods,
online quantization and memory accounting. Only ``compat`` imports vLLM internals
(docs/design.md §3, §8)."""
