"""The files of a run: its directory, metrics.jsonl, checkpoint.npz, summary.json, the
progress shown while it runs, and stopping and resuming.  No Ray."""
