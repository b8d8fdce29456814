"""Fine-tuning: the per-rank training loop, its msrun launcher, held-out evaluation and the MindFormers YAML.

Entry points: finetune.finetune (one rank, in process), worker (`python -m qwenbuild.train.worker --config
run.json`), launch.run_msrun (data-parallel CPU workers), evaluate.evaluate_heldout, mindformers_yaml.write_yaml.
"""
