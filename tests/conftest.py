"""Test-wide setting, applied before any test module imports transformers: never touch the Hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
