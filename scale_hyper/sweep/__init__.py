"""`scale-hyper sweep SPEC.yaml`: a comparison grid as one command.

``spec`` reads and checks the YAML spec; ``expand`` turns it into runs with stable names (and the
derived transplant runs and their controls), resolving every run's config before anything starts;
``state`` says which runs are finished, running, interrupted, failed or never started (run-directory
markers plus the sweep's own state file, never ``sacct``); ``local`` runs them one after another,
``slurm`` submits them through the project's sbatch templates with ``--dependency`` chains;
``plan`` prints the dry run (tokens, GPU-hours via ``scale-hyper plan``); ``report`` and ``stats``
write the report (best lr per mixer, seed statistics, the paired test, plots); ``main`` is the verb.
"""
