"""qwenbuild: a declarative, incremental build of Qwen1.5 fine-tuning and deployment with MindSpore."""

__version__ = "0.1.0"
