"""Interface files: names, modes, formats and parsers, and the table that serves them."""
