"""`scale-hyper doctor`: is this cluster ready? Environment, collectives, kernels, a short training
run and a save/resume, in about two minutes, launched exactly like `train`.

    main         the verb: bad input, the rendezvous, the checks in order, the table and the JSON
    results      a check's result (PASS / FAIL / SKIPPED, figure, detail), the table, test-only faults
    environment  versions, GPU, bf16, DeepSpeed ops per rank; the same versions on every rank
    collectives  the store rendezvous (a rank that never joins is named), all-reduce/all-gather busbw
    kernels      the Triton HyperMixing kernel against the torch reference; the SDPA backend
    storage      write/fsync/read throughput of train.output_dir and data.output; free space
    training     a few steps of the real trainer (`scale-hyper train`, a subprocess per rank), save, resume
    probe        the trainer's wrapper: counts the hypernetwork's ZeRO-3 all-gathers and peak memory

A sibling of ``engine``, ``evaluation`` and ``bench`` in the import layers: it never imports the
trainer; it runs it. Nothing is imported here, so the CLI stays instant.
"""
