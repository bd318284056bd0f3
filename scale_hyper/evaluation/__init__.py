"""Evaluation instruments: MLM validation (`eval`), GLUE fine-tuning (`glue`), the transplant
protocol (`transplant`) and run reports from MLflow (`report`).

Everything here runs on one device with plain torch (no DeepSpeed) and takes a model as a
scale-hyper checkpoint (``runs/x/checkpoints/step_N``), a run's ``output_dir`` (its newest
checkpoint) or a Hugging Face directory (our export, or a stock BERT).
"""
