"""The command-line interface (``ditaccel``)."""
