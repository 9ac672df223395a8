"""Built-in texts, their splits, calibration and retrieval sets."""
