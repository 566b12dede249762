"""``python -m dsv4_jax.convert``: the ``dsv4-convert`` command line (see ``dsv4_jax.convert.cli``)."""

from dsv4_jax.convert.cli import run

run()
