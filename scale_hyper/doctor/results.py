"""A check's result, the table rank 0 prints, the JSON beside it, and the test-only fault hooks."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
CHECKS = ("environment", "collectives", "kernels", "sdpa", "storage", "training", "resume")
FAULTS_ENV = "SCALE_HYPER_TEST_DOCTOR_FAULTS"


@dataclass
class Result:
    """One row: ``check`` is the check's name, optionally ``check/aspect``."""

    check: str
    status: str
    figure: str = ""
    detail: str = ""
    data: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def format_table(results: List[Result], width: int = 110) -> str:
    """One fixed-width table; long details wrap under the detail column."""
    names = max([len("check"), *(len(r.check) for r in results)])
    figures = max([len("figure"), *(min(len(r.figure), 40) for r in results)])
    head = f"{'check':<{names}}  {'status':<7}  {'figure':<{figures}}  detail"
    lines = [head, "-" * max(len(head), 60)]
    indent = names + 2 + 7 + 2 + figures + 2
    room = max(30, width - indent)
    for r in results:
        words, rows, line = r.detail.split(), [], ""
        for w in words:
            if line and len(line) + 1 + len(w) > room:
                rows.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        rows.append(line)
        lines.append(f"{r.check:<{names}}  {r.status:<7}  {r.figure:<{figures}}  {rows[0]}")
        lines.extend(" " * indent + row for row in rows[1:])
    return "\n".join(lines)


def overall(results: List[Result]) -> str:
    return FAIL if any(r.status == FAIL for r in results) else PASS


def faults() -> Dict[str, Optional[str]]:
    """Test-only: SCALE_HYPER_TEST_DOCTOR_FAULTS=version:1,kernel — only what one machine cannot produce.

    version:R  rank R reports a different DeepSpeed version
    kernel     the fused kernel's output is perturbed before it is compared with the reference
    (A non-finite loss: SCALE_HYPER_TEST_NONFINITE_STEPS=3,4, honoured by the trainer itself. A full
    disk, a rank never launched and a read-only mount are made for real by tests/test_doctor.py.)
    """
    out: Dict[str, Optional[str]] = {}
    for item in os.environ.get(FAULTS_ENV, "").split(","):
        name, _, value = item.strip().partition(":")
        if name:
            out[name] = value or None
    return out


def fault_rank(name: str) -> Optional[int]:
    value = faults().get(name)
    return int(value) if value is not None and value.isdigit() else None
