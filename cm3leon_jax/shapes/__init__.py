"""The built-in shapes world: scenes and their pixels (world), scene edits and condition maps
(edits), reading images back (detector) and scoring answers against a scene (scores)."""
