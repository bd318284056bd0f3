"""`python -m scale_hyper` (also what `deepspeed --module scale_hyper` runs)."""

from scale_hyper.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
