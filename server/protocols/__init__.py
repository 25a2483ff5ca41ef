"""Protocol adapters: the ecosystem's request and response shapes over the one ``server.serving.classify``."""
