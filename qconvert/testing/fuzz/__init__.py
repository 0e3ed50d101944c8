"""The fuzz campaign on every reader (scripts/fuzz.py): seeds, mutators, a worker that runs one case at a time."""
