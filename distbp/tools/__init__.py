"""The tools around training: ``distbp verify``, ``distbp plot`` and the cost model that
scripts/scaling.py fits."""
