"""Training data: alpaca -> ChatML conversion, ChatML -> MindRecord preprocessing, the project's own dataset."""
