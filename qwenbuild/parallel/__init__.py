"""The distributed plan as files: rank tables, strategy files, per-rank checkpoints and launch scripts."""
