"""Operator scripts: thin command-line entry points over ``scripts.benchlib``."""
