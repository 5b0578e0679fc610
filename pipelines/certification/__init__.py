"""Compatibility certification: the suite of checks an engine passes on a hardware profile.

``profiles`` says where an engine runs (what a worker reports), ``report`` is the shape of a
suite's result, ``suite`` runs the checks. No Django, no Celery: the certify stage calls the suite
and the platform stores and renders what it returns.
"""
