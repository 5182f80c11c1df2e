"""Low-rank factorization (truncated SVD) of Linear and Conv layers: the ``lowrank`` stage."""
