"""SAM 3 itself, through Hugging Face transformers: the engine that encodes an image once and answers clicks,
boxes and text prompts on it (`engine`), video tracking (`tracking`), the process-wide model loaded once and
its identity (`model`), the `Detections` type the engine returns, and random checkpoints in the hub's
layout for tests and benchmarks (`checkpoints`).

May import: the base modules (`config`, `errors`, `metrics`). It knows nothing of Label Studio, label configs,
ontologies or jobs: callers pass prompts, thresholds and frames.
"""
