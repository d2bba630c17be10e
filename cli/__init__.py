"""The ``mmbatch`` command: the command line, its HTTP client, and the embedded stack runner."""
