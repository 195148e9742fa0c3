"""Ready-made connection pools on real engines: ``sqlite`` (the embedded default, nothing to
install) and ``postgres`` (psycopg 3, the ``postgres`` extra)."""
