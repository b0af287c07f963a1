"""Supervised fine-tuning (CM3Leon §4): task formats (tasks, jsonl), the built-in shapes suite,
the task mixture, framed and packed training rows, and the per-task evaluation."""
