"""r1platform's ML library: formats, stages, compile backends, benchmark.

It imports neither Django nor Celery, so it runs from a notebook or a script with no server.
"""
