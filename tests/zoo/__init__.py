"""The zoo: real-world NaN bugs, each produced naturally by a small model, run under ``recommended()``."""
