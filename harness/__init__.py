"""A benchmark harness for memory-efficient fine-tuning of flan-t5 (see README.md)."""
