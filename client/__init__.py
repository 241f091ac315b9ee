"""modelpeer: the command-line client of a modelpeerd daemon."""
