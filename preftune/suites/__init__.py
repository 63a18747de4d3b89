"""Behaviour suites shipped with preftune (package data: ``<name>.yaml``; format in docs/suites.md).

Suites are versioned by file name (``demo-v1.yaml``): a changed suite is a new file, so figures
logged against ``demo-v1`` always mean the same cases, judges and sampling settings.
"""
