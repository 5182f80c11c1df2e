"""Weight sharing (per-layer k-means of the weights): the ``cluster`` stage."""
