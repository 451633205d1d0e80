"""Building blocks shared by mmflow's model families: the decoder-only transformer (``transformer``)."""
