"""Data: sources (folders, JSONL, CSV, HF datasets, multi-band rasters), validation, synthetic scenes."""
