"""The HTTP front (aiohttp) and the ``graft`` command line."""
