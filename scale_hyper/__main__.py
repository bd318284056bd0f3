"""`python -m scale_hyper` (also what `deepspeed --module scale_hyper` runs)."""

from scale_hyper.cli import run

if __name__ == "__main__":
    run()
