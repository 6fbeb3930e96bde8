"""Traffic analysis on exchanges: top-N talkers and per-edge baselines with anomaly alerts."""
