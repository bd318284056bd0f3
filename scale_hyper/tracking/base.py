"""The Tracker interface the training loop and the verbs use, and the tracker of ranks that log
nothing (every rank but 0, or ``tracking.enabled=false``). The MLflow implementation, with its
background writer, is in ``trackers``."""

from __future__ import annotations

from typing import Dict, Optional

from scale_hyper.tracking.redaction import redact_text

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
UI_INSTALL_NOTE = "needs the full mlflow: pip install 'scale-hyper[ui]'"


def sync_hint(output_dir: Optional[str]) -> str:
    """The command that back-fills a run's MLflow history from its metrics.jsonl."""
    return f"scale-hyper track sync {output_dir or 'RUN_DIR'}"


class Tracker:
    """The interface the training loop uses. This base class does nothing: it is what every rank
    but 0 gets (see :class:`NullTracker`). Nothing here ever raises during training."""

    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    tracking_uri: Optional[str] = None  # resolved (absolute) store URI; may hold credentials
    enabled: bool = False

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        pass

    def set_tags(self, tags: Dict[str, str]) -> None:
        pass

    def flush(self, timeout: float = 60.0) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass

    @property
    def display_uri(self) -> str:
        """The store URI with credentials masked: safe to print."""
        return redact_text(self.tracking_uri or "")

    @property
    def ui_hint(self) -> str:
        return ""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")


class NullTracker(Tracker):
    """Non-zero ranks and ``tracking.enabled=false``: same methods, no store, no mlflow import."""
