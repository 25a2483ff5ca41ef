"""The revisions, a package so that setuptools ships them with the server."""
