"""``peftkit bench``: a grid of methods × models × tasks × precisions × seeds, each run in its own
process (``python -m peftkit.bench.runner RUN.yaml RESULT.json``), and the report built from the rows."""
