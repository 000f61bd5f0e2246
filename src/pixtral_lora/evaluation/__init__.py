"""Evaluation: modes (generate, constrained, score), metrics, reports (markdown, HTML), run comparison."""
