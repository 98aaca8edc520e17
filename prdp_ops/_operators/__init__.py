"""Linear operators (private; the public names are re-exported by ``prdp_ops``)."""
