"""Chaos runs against a real server (``scripts/chaos.py``, ``tests/test_durability.py``).

- ``traffic``: closed-loop clients that log every request (its own X-Request-Id, status, record ids)
- ``tally``: the count from both sides: answered, stored, lost, duplicated
- ``harness``: the servers of one run, and what can be seen of them from outside (/health, RSS, spool bytes)
- ``scenarios``: SIGKILL, outages, full spool, two processes, another DATABASE_URL, NUL text, large spool
- ``report``: the table (text and markdown) and the section of docs/RELIABILITY.md it fills
"""
