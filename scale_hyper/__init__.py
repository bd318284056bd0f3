"""scale-hyper: pre-train HyperBERT (and its baselines) at scale with DeepSpeed.

Importing the package imports nothing heavy (no torch, transformers or DeepSpeed), so the CLI starts
instantly. ``import scale_hyper.models`` registers the model classes with transformers' Auto classes:
after it, an exported directory loads with ``AutoModelForMaskedLM.from_pretrained(dir)`` without
``trust_remote_code``; without it (or without scale_hyper installed at all) pass
``trust_remote_code=True``.
"""

__version__ = "0.1.0"
