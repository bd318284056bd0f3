"""Benchmarks that print figures (`scale-hyper bench data|train`; dated results in docs/benchmarks.md).

    train   training-step throughput of every mixer against Hugging Face BERT (plain torch, one device)
    data    masked tokens/s of one data-loader worker
    comm    ZeRO-3 communication volume (CollectiveCounter) and the analytic step-time model
    device  device and precision choice, peak memory, device names
    table   result rows and their markdown table

A sibling of ``engine`` and ``evaluation`` in the import layers: it may use models, data, config,
but not the trainer. Nothing is imported here, so the CLI stays instant.
"""
