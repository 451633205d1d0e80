"""Training tasks: what the harness (:mod:`mmflow.train`) trains, one module per model family
(``clip``, ``vqgan``), on shared pieces: ``data`` (per-rank assignment, the training stream and
the held-out set, skips counted by reason) and ``evaluation`` (chunked evaluation, the final
metrics as a stage's). Tasks take plain values, never a stage context: stages build them."""
