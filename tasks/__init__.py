"""p2v stages, in pipeline order. Each stage module declares one `STAGE`."""

from tasks.lib.pipeline import Stage

# Stages are added here as they are built; dodo.py wires whatever is listed.
STAGES: list[Stage] = []
