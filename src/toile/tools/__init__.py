"""Developer tools run as ``python -m toile.tools.<name>`` (not part of the ``toile`` CLI)."""
