"""`cm3leon demo`: the main job end to end on the built-in shapes data (job.py)."""
