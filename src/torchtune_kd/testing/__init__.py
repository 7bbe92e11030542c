"""Test support, not product code: deterministic stand-in tokenizer, tiny teacher/student and data."""
