"""scale-hyper: pre-train HyperBERT (and its baselines) at scale with DeepSpeed.

Importing the package registers the model classes with transformers' Auto classes, so an
exported directory loads with `AutoModelForMaskedLM.from_pretrained(dir)` without
`trust_remote_code`.
"""

__version__ = "0.1.0"

from scale_hyper import models as _models  # noqa: F401,E402  (registers the Auto classes)
