"""Fault-injection suite (issue 7): real Ray clusters on 127.0.0.1 running the quickstart sweep made tiny.

    .venv/bin/python -m pytest tests/faults -q

Results and what each fault costs: RELIABILITY.md.
"""
