"""References the specification compares against: PyTorch, transformers, mlx-lm. Never imports impl/."""
