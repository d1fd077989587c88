"""--mode=evaluate: the guidance-weight sweep (`sweep.py`), the real data's reference
statistics, the metrics (FID, IS, precision/recall), the feature extractors and reports."""
